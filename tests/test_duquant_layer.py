"""DuQuantLinear end to end: equivalence, accuracy against the baselines, and forward hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duquant import DuQuantLinear, LayerSelection, QuantConfig, quantize_


def _outlier_inputs(n: int, width: int, seed: int, channels=(3, 17, 90)) -> torch.Tensor:
    """Activations with a few channels 30-60x larger than the rest, as in transformer layers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    for i, c in enumerate(channels):
        x[:, c % width] *= 30.0 + 15.0 * i
    return x


def _quantized(cfg: QuantConfig, in_features=256, out_features=96, bias=True, calls=3, seed=0):
    """A one-layer model quantized with ``cfg`` after ``calls`` calibration calls, plus its FP twin."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    fp = nn.Linear(in_features, out_features, bias=bias)
    fp.load_state_dict(model[0].state_dict())
    calib = quantize_(model, cfg, LayerSelection())
    for i in range(calls):
        model(_outlier_inputs(48, in_features, seed=100 + i))
    report = calib.finish()
    return model, fp, report


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "in_features,block,per_block",
    [(256, 64, False), (200, 64, False), (200, 64, True), (40, 64, False)],
    ids=["divisible", "not-divisible", "per-block", "narrower-than-block"],
)
def test_transform_without_quantization_reproduces_fp(in_features, block, per_block):
    cfg = QuantConfig(w_bits=16, a_bits=8, block_size=block, rotation_steps=16, per_block_rotation=per_block)
    model, fp, _ = _quantized(cfg, in_features=in_features)
    layer = model[0]
    x = _outlier_inputs(32, in_features, seed=7)
    h = layer.transform_input(x)
    assert h.shape[1] % layer.block_size == 0 and layer.block_size == min(block, in_features)
    assert _rel_err(F.linear(h, layer.weight, layer.bias), fp(x)) < 1e-5


def test_weight_only_layer_folds_the_transform_into_the_weight():
    model, fp, _ = _quantized(QuantConfig(w_bits=4, a_bits=16, rotation_steps=16, block_size=64))
    layer = model[0]
    # The codes live in the transformed basis (the transform stays in the state), the fake forward is one F.linear.
    assert layer.weight.shape == fp.weight.shape and layer.r1 is not None and layer.fwd_r1 is None
    assert "weight" not in layer.state_dict() and layer.state_dict()["qweight"].dtype == torch.uint8
    x = _outlier_inputs(16, 256, seed=5)
    assert torch.equal(model(x), F.linear(x, layer.weight, layer.bias))
    assert _rel_err(model(x), fp(x)) < 0.1


def test_duquant_w4a4_beats_rtn_and_smoothquant_on_channel_outliers():
    x = _outlier_inputs(64, 256, seed=9)
    errors = {}
    for mode in ("rtn", "smoothquant", "duquant"):
        model, fp, report = _quantized(QuantConfig(mode=mode, w_bits=4, a_bits=4, block_size=64, rotation_steps=64))
        errors[mode] = _rel_err(model(x), fp(x))
        assert report.layers[0].sqnr_db is not None
    assert errors["duquant"] < 0.6 * errors["smoothquant"], errors
    assert errors["duquant"] < 0.6 * errors["rtn"], errors


def test_options_all_run_and_stay_close_to_fp():
    x = _outlier_inputs(32, 256, seed=11)
    options = [
        dict(rotation="hadamard"),
        dict(rotation="svd"),
        dict(rotation="none"),
        dict(permute="none"),
        dict(smooth_alpha=0.0),
        dict(row_rotation="restore"),
        dict(act_scales="static"),
        dict(per_block_rotation=True),
        dict(w_sym=True, a_sym=True),
    ]
    for extra in options:
        cfg = QuantConfig(w_bits=8, a_bits=8, block_size=64, rotation_steps=16, **extra)
        model, fp, _ = _quantized(cfg, calls=1)
        assert _rel_err(model(x), fp(x)) < 0.05, extra


def test_forward_is_pure_and_differentiable():
    model, _, _ = _quantized(QuantConfig(w_bits=4, a_bits=8, block_size=64, rotation_steps=8))
    x = _outlier_inputs(8, 256, seed=3).requires_grad_(True)
    before = x.detach().clone()
    y = model(x.view(2, 4, 256))
    assert y.shape == (2, 4, 96)
    y.square().sum().backward()
    assert x.grad is not None and torch.equal(x.detach(), before)
    view = x.detach().clone()[:, :]
    model(view)
    assert torch.equal(view, before)


def test_inference_mode_and_compile():
    model, _, _ = _quantized(QuantConfig(w_bits=4, a_bits=4, block_size=64, rotation_steps=8))
    x = _outlier_inputs(8, 256, seed=4)
    eager = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


def test_buffers_follow_the_module_and_repr_tells_the_setup():
    model, _, _ = _quantized(QuantConfig(w_bits=4, a_bits=8, block_size=64, rotation_steps=8))
    layer = model[0]
    assert isinstance(layer, DuQuantLinear)
    state = layer.state_dict()
    assert {"qweight", "w_scale", "w_zero", "bias", "smooth", "r1", "perm", "r2", "_extra_state"} == set(state)
    assert not [p for p in layer.parameters()]
    layer.double()
    assert layer.r1.dtype == torch.float64 and layer.perm.dtype == torch.int64
    assert model(_outlier_inputs(4, 256, seed=1).double()).dtype == torch.float64
    text = repr(layer)
    assert "mode=duquant" in text and "bits=W4A8" in text and "block_size=64" in text and "state=quantized" in text


def test_bfloat16_model():
    model, fp, _ = _quantized(QuantConfig(w_bits=8, a_bits=8, block_size=64, rotation_steps=8), calls=1)
    model.bfloat16()
    x = _outlier_inputs(8, 256, seed=2)
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16 and _rel_err(y.float(), fp(x)) < 0.05
