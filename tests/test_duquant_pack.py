"""Pack cache: reuse on identical inputs only, and corrupt files are named and rebuilt."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from duquant import CorruptPackError, LayerSelection, PackStore, QuantConfig, quantize_

CFG = QuantConfig(w_bits=4, a_bits=8, block_size=32, rotation_steps=8)


def _run(cfg: QuantConfig, cache_dir, calib_seed: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    calib = quantize_(model, cfg, LayerSelection(), cache_dir=cache_dir)
    g = torch.Generator().manual_seed(calib_seed)
    for _ in range(2):
        x = torch.randn(12, 64, generator=g)
        x[:, 4] *= 20
        model(x)
    report = calib.finish().to_dict()
    return model, report


def _packs(directory) -> set[str]:
    return {p.name for p in directory.glob("*.safetensors")}


def test_rerun_hits_the_cache_and_gives_identical_layers(tmp_path):
    first, report = _run(CFG, tmp_path)
    assert report["cache_misses"] == 2 and report["cache_hits"] == 0
    assert len(_packs(tmp_path)) == 2
    second, report = _run(CFG, tmp_path)
    assert report["cache_hits"] == 2 and report["cache_misses"] == 0
    _assert_same_state(first, second)


@pytest.mark.parametrize(
    "change", [dict(block_size=16), dict(w_bits=8), dict(a_bits=4), dict(smooth_alpha=0.5), dict(seed=1)]
)
def test_any_changed_knob_misses(tmp_path, change):
    _run(CFG, tmp_path)
    before = _packs(tmp_path)
    _, report = _run(dataclasses.replace(CFG, **change), tmp_path)
    assert report["cache_hits"] == 0 and report["cache_misses"] == 2
    assert len(_packs(tmp_path) - before) == 2


def test_changed_calibration_data_misses(tmp_path):
    _run(CFG, tmp_path)
    _, report = _run(CFG, tmp_path, calib_seed=1)
    assert report["cache_hits"] == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-tensor"])
def test_corrupt_pack_is_named_and_rebuilt(tmp_path, damage):
    reference, _ = _run(CFG, tmp_path)
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
    else:
        with safe_open(victim, framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["perm"] = torch.zeros_like(tensors["perm"])
        save_file(tensors, victim, metadata=metadata)
    with pytest.warns(UserWarning, match=victim.name):
        rebuilt, report = _run(CFG, tmp_path)
    assert report["cache_rebuilt"] == 1 and report["cache_hits"] == 1
    _assert_same_state(reference, rebuilt)
    _, report = _run(CFG, tmp_path)  # the rebuilt pack was written back
    assert report["cache_hits"] == 2


def test_load_names_the_corrupt_file(tmp_path):
    path = PackStore(tmp_path).path("layer", "0" * 40)
    tmp_path.mkdir(exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptPackError, match=path.name):
        PackStore(tmp_path).load("layer", "0" * 40, 64, torch.device("cpu"))


def _tensor_bytes(path, name: str) -> tuple[int, int]:
    """(start, end) file offsets of one tensor's data, read from the safetensors header."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def test_altered_tensor_bytes_behind_an_intact_header_are_named_and_rebuilt(tmp_path):
    reference, _ = _run(CFG, tmp_path)
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    start, end = _tensor_bytes(victim, "smooth")
    raw = bytearray(victim.read_bytes())
    smooth = torch.frombuffer(raw[start:end], dtype=torch.float32)
    raw[start:end] = (smooth * 3).numpy().tobytes()  # still finite, right shape: only the content hash can tell
    victim.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=victim.name):
        rebuilt, report = _run(CFG, tmp_path)
    assert report["cache_rebuilt"] == 1 and report["cache_hits"] == 1
    _assert_same_state(reference, rebuilt)


def _assert_same_state(a, b) -> None:
    """The same quantized model: equal tensors and equal extra state (mode, bits, block size), key by key."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        same = torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]
        assert same, key
