"""Weight quantizers (minmax, mse, gptq): their objectives, the Hessian they use and how they are keyed;
and the greedy rotation's early stop, which pays for GPTQ's calibration time."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from duquant import LayerSelection, QuantConfig, quantize_
from duquant.quantizer import fake_quant, row_grid
from duquant.rotation import greedy_rotation, spread_steps
from duquant.stats import ActivationStats
from duquant.transform import fit_transform
from duquant.weights import mse_clip, quantize_weight


def _correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Rows near a 16-dimensional subspace: a strongly non-diagonal Hessian, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, width, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return torch.randn(n, 16, generator=g, dtype=torch.float64) @ basis + 0.05 * torch.randn(
        n, width, generator=g, dtype=torch.float64
    )


def _weight(rows: int, cols: int) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / cols**0.5
    w[:, 3] *= 8.0  # an outlier column, and rows of different spread
    return w * torch.logspace(-1, 1, rows, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (4, True), (8, True)])
def test_mse_never_picks_a_worse_clip_than_the_fixed_one(bits, sym):
    w = _weight(64, 96)
    layer = dataclasses.replace(QuantConfig(w_bits=bits, w_sym=sym).layer_bits("x"), w_quantizer="mse")
    fixed = (fake_quant(w, bits, sym, layer.w_clip) - w).pow(2).sum(1)
    clip = mse_clip(w, layer)
    searched = (quantize_weight(w, layer).values - w).pow(2).sum(1)
    assert (searched <= fixed).all()
    if bits <= 4:  # at 8 bits no clip beats the full range on this weight's outlier column
        assert searched.sum() < fixed.sum()
    assert clip.shape == (64, 1) and ((clip >= 0.5) & (clip <= 1.0)).all()


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_lowers_held_out_output_error_against_rtn(sym):
    w = _weight(48, 64)
    calib, held_out = _correlated_inputs(1024, 64, seed=0), _correlated_inputs(512, 64, seed=1)
    hessian = calib.T @ calib
    bits = QuantConfig(w_bits=4, w_sym=sym).layer_bits("x")
    reference = held_out @ w.T

    def error(quantizer: str) -> float:
        q = quantize_weight(w, dataclasses.replace(bits, w_quantizer=quantizer), hessian).values
        return ((held_out @ q.T - reference).norm() / reference.norm()).item()

    assert error("gptq") < 0.5 * error("minmax")
    assert error("gptq") < 0.5 * error("mse")


def test_gptq_keeps_the_per_channel_grid_and_zeroes_dead_channels():
    w = _weight(32, 40)
    x = _correlated_inputs(256, 40, seed=2)
    x[:, 7] = 0.0  # a channel that never fires
    bits = dataclasses.replace(QuantConfig(w_bits=4).layer_bits("x"), w_quantizer="gptq")
    q = quantize_weight(w, bits, x.T @ x).values
    assert torch.isfinite(q).all() and (q[:, 7] == 0).all()
    scale, zero = row_grid(w, bits.w_bits, bits.w_sym, mse_clip(w, bits))
    codes = q / scale + zero
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)  # the column loop runs in float32
    assert codes.round().min() >= 0 and codes.round().max() <= 15


def test_gptq_without_a_hessian_is_refused():
    bits = dataclasses.replace(QuantConfig().layer_bits("x"), w_quantizer="gptq")
    with pytest.raises(ValueError, match="w_quantizer=gptq needs the layer's input Hessian"):
        quantize_weight(_weight(4, 8), bits)


def test_stats_sum_x_transpose_x_over_every_call_only_when_asked():
    calls = [torch.randn(n, 24, generator=torch.Generator().manual_seed(n)) for n in (5, 0, 40)]
    kept, plain = ActivationStats(capacity=8, seed=0, hessian=True), ActivationStats(capacity=8, seed=0)
    for x in calls:
        kept.observe(x)
        plain.observe(x)
    rows = torch.cat(calls)
    torch.testing.assert_close(kept.hessian, rows.T @ rows)
    assert plain.hessian is None
    assert torch.equal(kept.sample, plain.sample)  # the Hessian leaves the reservoir alone


def test_transformed_hessian_is_the_hessian_of_transformed_inputs():
    x = _correlated_inputs(128, 80, seed=3).float()
    x[:, 5] *= 30.0
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(4))
    cfg = QuantConfig(block_size=32, rotation_steps=8)
    t = fit_transform(cfg, cfg.layer_bits("x"), w, x.abs().amax(0), x)
    assert t.width == 96 and t.perm is not None and t.smooth is not None
    xt = t.activations(x.double())
    torch.testing.assert_close(t.hessian(x.double().T @ x.double()), xt.T @ xt)


def _layer_output_error(cfg: QuantConfig) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    calib = quantize_(model, cfg, LayerSelection())
    for seed in range(4):
        model(_correlated_inputs(64, 64, seed).float())
    calib.finish()
    x = _correlated_inputs(256, 64, seed=9).float()
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 32))(x)
    return ((model(x) - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("mode", ["rtn", "smoothquant", "duquant"])
def test_gptq_applies_in_every_mode(mode):
    cfg = QuantConfig(mode=mode, w_bits=4, a_bits=16, block_size=32, rotation_steps=8)
    assert _layer_output_error(dataclasses.replace(cfg, w_quantizer="gptq")) < 0.7 * _layer_output_error(cfg)


def test_changed_w_quantizer_never_reuses_a_pack(tmp_path):
    cfg = QuantConfig(w_bits=4, a_bits=8, block_size=32, rotation_steps=8)
    reports = []
    for quantizer in ("minmax", "gptq", "mse", "gptq"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32))
        calib = quantize_(model, dataclasses.replace(cfg, w_quantizer=quantizer), LayerSelection(), cache_dir=tmp_path)
        model(_correlated_inputs(64, 64, seed=0).float())
        reports.append(calib.finish())
    assert [r.layers[0].cache for r in reports] == ["miss", "miss", "miss", "hit"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(w_quantizer="awq"), "w_quantizer must be one of minmax | mse | gptq, got 'awq'"),
        (dict(gptq_damp=0.0), "gptq_damp must be in (0, 1], got 0.0"),
        (dict(rotation_patience=-1), "rotation_patience must be an integer >= 0"),
    ],
)
def test_invalid_weight_quantizer_settings_raise_one_clear_sentence(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantConfig(**values)


def test_rotation_patience_returns_a_prefix_of_the_full_search_and_all_of_it_when_patient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, dtype=torch.float64, generator=g)
    x[:, 5] *= 40.0
    x[7, 20] = -300.0
    full = greedy_rotation(x[None].float(), 64, seed=3)
    assert torch.equal(greedy_rotation(x[None].float(), 64, seed=3, patience=64), full)
    early = greedy_rotation(x[None].float(), 64, seed=3, patience=2)
    spreads, data = spread_steps(32, 64, 3), x.clone()
    total = torch.eye(32, dtype=torch.float64)
    prefixes = [total]
    for spread in spreads:  # the full search's step products, one per prefix length
        channel = int(data.abs().argmax()) % 32
        swap = list(range(32))
        swap[0], swap[channel] = channel, 0
        data, total = data @ spread[swap][:, swap], total @ spread[swap][:, swap]
        prefixes.append(total)
    assert not torch.equal(early, full)  # it did stop early here
    assert any(torch.allclose(early[0], p, rtol=0, atol=1e-9) for p in prefixes)

    def peak(r: torch.Tensor) -> float:
        return (x @ r[0]).abs().max().item()

    assert peak(full) <= peak(early) < 0.5 * x.abs().max().item()


def test_the_tag_names_a_weight_quantizer_other_than_the_default():
    """File names and comparison columns must tell a GPTQ run from a minmax one of the same mode and bits."""
    cfg = QuantConfig(mode="duquant", w_bits=4, a_bits=8)
    tags = [dataclasses.replace(cfg, w_quantizer=q).tag() for q in ("minmax", "mse", "gptq")]
    assert tags == ["duquant_w4a8", "duquant_w4a8_mse", "duquant_w4a8_gptq"]
    assert QuantConfig(mode="fp", w_bits=16, a_bits=16, w_quantizer="gptq").tag() == "fp"
