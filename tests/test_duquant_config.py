"""QuantConfig validation, bit-width defaults and the shipped Hydra presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from duquant import LayerOverride, QuantConfig

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "quant"


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(w_bits=9), "w_bits must be 2..8 or 16, got 9"),
        (dict(a_bits=6), "a_bits must be 4 | 8 | 16, got 6"),
        (dict(mode="gptq"), "mode must be one of fp | rtn | smoothquant | duquant, got 'gptq'"),
        (dict(rotation="random"), "rotation must be one of greedy | svd | hadamard | none"),
        (dict(permute="random"), "permute must be one of zigzag | none"),
        (dict(act_scales="minmax"), "act_scales must be one of dynamic | static"),
        (dict(row_rotation="yes"), "row_rotation must be one of none | restore"),
        (dict(block_size=1), "block_size must be an integer >= 2"),
        (dict(rotation="hadamard", block_size=96), "power of two"),
        (dict(smooth_alpha=1.5), "smooth_alpha must be in [0, 1]"),
        (dict(w_clip=0.0), "w_clip must be in (0, 1]"),
        (dict(act_percentile=0.0), "act_percentile must be in (0, 100]"),
        (dict(include=["("]), "include is not a valid regular expression"),
        (dict(overrides=[LayerOverride("mlp", w_bits=1)]), "overrides[0].w_bits must be 2..8 or 16"),
        (dict(w_bits=True), "w_bits must be"),
    ],
)
def test_invalid_values_raise_one_clear_sentence(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantConfig(**values)


def test_bit_width_defaults_and_overrides():
    overrides = [LayerOverride("proj", w_bits=8), LayerOverride("out_proj", a_bits=8)]
    cfg = QuantConfig(w_bits=4, a_bits=4, overrides=overrides)
    low = cfg.layer_bits("mlp.fc1")
    assert (low.w_sym, low.w_clip, low.a_clip) == (False, 0.8, 0.9)
    high = cfg.layer_bits("attn.out_proj")  # both overrides match; later ones win per field
    assert (high.w_bits, high.a_bits, high.w_sym, high.w_clip, high.a_clip) == (8, 8, True, 1.0, 1.0)
    assert cfg.w_bits == 4 and cfg.w_clip is None  # resolution never mutates the config
    explicit = QuantConfig(w_sym=True, w_clip=0.95, a_clip=0.7).layer_bits("x")
    assert (explicit.w_sym, explicit.w_clip, explicit.a_clip) == (True, 0.95, 0.7)


def test_from_dict_rejects_unknown_keys():
    cfg = QuantConfig.from_dict({"mode": "rtn", "overrides": [{"pattern": "a", "a_bits": 16}]})
    assert cfg.overrides[0] == LayerOverride("a", a_bits=16)
    with pytest.raises(ValueError, match="no field"):
        QuantConfig.from_dict({"wbits": 4})


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_presets_are_valid_structured_configs(preset):
    schema = OmegaConf.structured(QuantConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(PRESETS / f"{preset}.yaml"))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, QuantConfig)
    expected_mode = preset.split("_")[0] if "_" in preset else ("fp" if preset == "fp" else "duquant")
    assert cfg.mode == expected_mode


def test_all_presets_are_shipped():
    names = {p.stem for p in PRESETS.glob("*.yaml")}
    bits = ["w8a8", "w4a8", "w4a4"]
    assert {"fp", *bits, "w4a16", *(f"rtn_{b}" for b in [*bits, "w4a16"]), *(f"smoothquant_{b}" for b in bits)} <= names
