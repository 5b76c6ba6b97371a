"""Calibration flow: statistics from every call, layer selection, reports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from duquant import DuQuantLinear, LayerSelection, QuantConfig, quantize_, select_layers
from duquant.stats import ActivationStats

CFG = QuantConfig(w_bits=4, a_bits=8, block_size=32, rotation_steps=8)


class Tiny(nn.Module):
    """Two branches and a head; ``head`` is also reachable as ``alias`` (a shared module)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)
        self.alias = self.head

    def forward(self, x):
        for layer in self.encoder:
            x = torch.relu(layer(x))
        return self.head(self.norm(x))


def _inputs(seed: int, n: int = 16, spike: float = 0.0) -> torch.Tensor:
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    x[-1, 9] += spike
    return x


def _calibrate(cfg=CFG, spikes=(0.0, 0.0, 0.0), model=None):
    torch.manual_seed(0)
    model = model or Tiny()
    calib = quantize_(model, cfg, LayerSelection(include=[r"encoder\.0"]))
    for i, spike in enumerate(spikes):
        model(_inputs(i, spike=spike))
    return model, calib


def test_every_call_is_recorded_and_a_late_outlier_moves_the_scales():
    model, calib = _calibrate(spikes=(0.0, 0.0, 0.0))
    model(torch.empty(0, 64))  # an empty batch is a call without rows
    stats = model.encoder[0].stats
    assert stats.calls == 4 and stats.rows_seen == 48
    calm = calib.finish()
    calm_weight = model.encoder[0].weight.clone()
    model, calib = _calibrate(spikes=(0.0, 0.0, 500.0))  # the outlier arrives in the LAST call only
    assert model.encoder[0].stats.channel_max[9] >= 500.0
    spiked = calib.finish()
    assert spiked.layers[0].act_max_before >= 500.0 > calm.layers[0].act_max_before
    assert not torch.equal(model.encoder[0].weight, calm_weight)


def test_smoothing_uses_the_running_max_of_all_calls():
    model, calib = _calibrate(spikes=(0.0, 0.0, 0.0))
    layer = model.encoder[0]
    x = torch.cat([_inputs(i) for i in range(3)])
    torch.testing.assert_close(layer.stats.channel_max, x.abs().amax(0))


def test_reservoir_is_bounded_seeded_and_uniform():
    def run(seed):
        stats = ActivationStats(capacity=64, seed=seed)
        for i in range(20):
            stats.observe(torch.arange(i * 50, (i + 1) * 50, dtype=torch.float32)[:, None].repeat(1, 3))
        return stats

    a, b, c = run(1), run(1), run(2)
    assert a.sample.shape == (64, 3) and a.rows_seen == 1000 and a.calls == 20
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)
    picked = a.sample[:, 0].long()
    assert len(picked.unique()) == 64  # no row stored twice
    assert picked.min() < 300 and picked.max() > 700  # drawn from the whole stream, not its head or tail


def test_sample_does_not_depend_on_other_layers():
    stats_alone = ActivationStats(capacity=8, seed=5)
    stats_busy = ActivationStats(capacity=8, seed=5)
    for i in range(4):
        torch.randn(100, generator=torch.Generator().manual_seed(99))  # unrelated random draws in between
        torch.rand(3)
        x = _inputs(i)
        stats_alone.observe(x)
        stats_busy.observe(x)
    assert torch.equal(stats_alone.sample, stats_busy.sample)


def test_calibration_under_inference_mode():
    torch.manual_seed(0)
    model = Tiny()
    calib = quantize_(model, CFG, LayerSelection(include=["encoder"]))
    with torch.inference_mode():
        model(_inputs(0))
    model(_inputs(1))
    with torch.inference_mode():
        report = calib.finish()
    assert report.to_dict()["layers_quantized"] == 2
    y = model(_inputs(2).requires_grad_(True))
    y.sum().backward()


def test_selection_rules_and_shared_modules():
    model = Tiny()
    names = [n for n, _ in select_layers(model, LayerSelection())]
    assert names == ["encoder.0", "encoder.1", "head"]
    picked = select_layers(model, LayerSelection(include=["encoder"], exclude=[r"\.1$"], names=["head"]))
    assert [n for n, _ in picked] == ["encoder.0", "head"]
    with pytest.raises(ValueError, match="no layers matched"):
        select_layers(model, LayerSelection(include=["decoder"]))
    with pytest.raises(ValueError, match="not nn.Linear"):
        select_layers(model, LayerSelection(names=["norm"]))
    with pytest.raises(ValueError, match="not a module"):
        select_layers(model, LayerSelection(names=["missing"]))
    with pytest.raises(ValueError, match="invalid regex"):
        LayerSelection(include=["("])
    quantize_(model, CFG, LayerSelection(names=["head"]))
    assert isinstance(model.alias, DuQuantLinear) and model.alias is model.head


def test_quantize_refuses_fp_and_idle_layers():
    with pytest.raises(ValueError, match="mode=fp"):
        quantize_(Tiny(), QuantConfig(mode="fp"), LayerSelection())
    model = Tiny()
    calib = quantize_(model, CFG, LayerSelection())
    with pytest.raises(ValueError, match="saw no calibration input"):
        calib.finish()
    rtn = quantize_(Tiny(), QuantConfig(mode="rtn"), LayerSelection())
    assert rtn.finish().to_dict()["layers_quantized"] == 3  # dynamic RTN needs no inputs


def test_overrides_pick_bits_and_skip_layers():
    cfg = QuantConfig(
        w_bits=4, a_bits=8, block_size=32, rotation_steps=4,
        overrides=[{"pattern": "head", "w_bits": 8}, {"pattern": r"encoder\.1", "w_bits": 16, "a_bits": 16}],
    )  # fmt: skip
    model = Tiny()
    calib = quantize_(model, cfg, LayerSelection())
    assert isinstance(model.encoder[1], nn.Linear) and model.head.bits.w_bits == 8
    model(_inputs(0))
    report = calib.finish().to_dict()
    assert report["layers_skipped"] == ["encoder.1"]
    assert [r["w_bits"] for r in report["layers"]] == [4, 8]


def test_report_is_json_and_complete():
    model, calib = _calibrate(spikes=(0.0, 20.0))
    report = calib.finish()
    data = json.loads(json.dumps(report.to_dict()))
    for key in ("mode", "bits", "config", "layers_quantized", "layers", "average_sqnr_db", "worst_layers"):
        assert key in data
    row = data["layers"][0]
    assert row["name"] == "encoder.0" and row["shape"] == [64, 64] and row["calib_calls"] == 2
    assert row["sqnr_db"] > 10 and row["act_max_after"] < row["act_max_before"]
    assert data["cache_hits"] == 0 and data["worst_layers"][0]["name"] == "encoder.0"
    assert "W4A8" in report.summary()
    with pytest.raises(RuntimeError, match="already"):
        calib.finish()
