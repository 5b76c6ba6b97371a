"""Integer execution (backend=int) against fake quantization, and quantized models saved, loaded and round-tripped."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from duquant import DuQuantLinear, QuantConfig, QuantizedCheckpointError, load_quantized, quantize_, save_quantized
from duquant.codes import load, store
from duquant.kernels import Int8Matmul

# Integer sums are exact; what differs from fake quantization is float accumulation and the float32 scale rounding.
REL_TOL = 1e-5


def _model(width: int, out: int = 72, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 96), nn.GELU(), nn.Linear(96, out))


def _inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, 3] *= 30.0  # a channel outlier, as in real activations
    return x


def _quantized(cfg: QuantConfig, width: int) -> nn.Sequential:
    model = _model(width)
    calibration = quantize_(model, cfg)
    for seed in range(2):
        model(_inputs(40, width, seed))
    calibration.finish()
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = list(itertools.product(("rtn", "smoothquant", "duquant"), ((4, 8), (8, 8), (4, 4), (8, 4), (4, 16), (8, 16)),
                               (True, False), (96, 100)))  # fmt: skip


@pytest.mark.parametrize(("mode", "bits", "a_sym", "width"), CASES)
def test_integer_path_equals_fake_quantization(mode, bits, a_sym, width):
    """Every mode, bit width and symmetry, with widths a multiple of the block (96) and padded ones (100)."""
    cfg = dict(mode=mode, w_bits=bits[0], a_bits=bits[1], a_sym=a_sym, block_size=32, rotation_steps=8)
    fake, integer = _quantized(QuantConfig(**cfg), width), _quantized(QuantConfig(**cfg, backend="int"), width)
    x = _inputs(33, width, seed=5)
    hidden = fake[1](fake[0](x))
    assert _rel_err(integer[0](x), fake[0](x)) < REL_TOL  # layer by layer, on the same inputs
    assert _rel_err(integer[2](hidden), fake[2](hidden)) < REL_TOL
    assert _rel_err(integer(x), fake(x)) < 10 * REL_TOL
    assert integer[0].weight is None
    assert (integer[0].kernel is not None) == (bits[1] < 16)  # weight-only layers dequantize packed codes at use


def test_the_int8_kernel_is_exact_on_worst_case_codes():
    """Largest activation codes against the largest weights (where int16 pair sums would saturate without VNNI)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 64, 24), (40, 200, 72), (1, 13, 7)):
        m, k, n = shape
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        w[0] = 127
        w[-1] = -128
        a = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
        a[0] = 255
        kernel = Int8Matmul(w)
        exact = a.double() @ w.double().T
        assert torch.equal(kernel(a).double(), exact), kernel.kernel
        assert torch.equal(kernel.weight(), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_codes_are_stored_two_per_byte(bits):
    codes = torch.randint(0, 2**bits, (6, 11), dtype=torch.uint8)
    stored = store(codes, bits)
    assert stored.shape == (6, 6) and stored.dtype == torch.uint8
    assert torch.equal(load(stored, bits, 11), codes)


@pytest.mark.parametrize(
    ("cfg", "reason"),
    [
        (dict(act_scales="static"), "act_scales=static"),
        (dict(w_bits=16, a_bits=8), "keeps the weight in floating point"),
        (dict(w_bits=8, a_bits=8, w_sym=False), "asymmetric 8-bit weights"),
        (dict(row_rotation="restore"), "row_rotation=restore"),
    ],
)
def test_unsupported_integer_combinations_are_refused_in_one_line(cfg, reason):
    with pytest.raises(ValueError) as err:
        quantize_(_model(64), QuantConfig(backend="int", **cfg))
    message = str(err.value)
    assert "\n" not in message and reason in message and "supported:" in message and "backend=fake" in message


@pytest.mark.parametrize(("saved", "loaded"), [("fake", "fake"), ("fake", "int"), ("int", "fake"), ("int", "int")])
def test_state_dict_round_trips_into_a_freshly_built_model(saved, loaded):
    cfg = QuantConfig(w_bits=4, a_bits=8, block_size=32, rotation_steps=8)
    model = _quantized(QuantConfig(**{**cfg.to_dict(), "backend": saved}), 100)
    fresh = _model(100, seed=1)  # other FP weights: everything must come from the state dict
    quantize_(fresh, QuantConfig(**{**cfg.to_dict(), "backend": loaded}))
    fresh.load_state_dict(model.state_dict())
    x = _inputs(9, 100, seed=3)
    assert _rel_err(fresh(x), model(x)) < (0 if saved == loaded else REL_TOL) + 1e-12
    assert fresh[0].bits == model[0].bits and fresh[0].block_size == 32 and fresh[0].quantized


def test_saved_model_loads_into_a_fresh_fp_model_and_weighs_what_its_bits_say(tmp_path):
    model = _quantized(QuantConfig(mode="rtn", w_bits=4, a_bits=8), 96)
    path = save_quantized(model, tmp_path / "saved", {"model": "test"})
    with safe_open(path, framework="pt") as f:
        qweight = f.get_tensor("0.qweight")
    assert qweight.shape == (96, 48) and qweight.dtype == torch.uint8  # 96 four-bit codes in 48 bytes per row
    for backend in ("fake", "int"):
        fresh = _model(96, seed=1)
        assert load_quantized(fresh, tmp_path / "saved", backend) == {"model": "test"}
        assert isinstance(fresh[0], DuQuantLinear) and fresh[0].backend == backend
        x = _inputs(5, 96, seed=2)
        assert _rel_err(fresh(x), model(x)) < REL_TOL


def test_damaged_or_mismatched_saved_models_are_refused_naming_the_file(tmp_path):
    model = _quantized(QuantConfig(w_bits=8, a_bits=8, block_size=32, rotation_steps=8), 96)
    path = save_quantized(model, tmp_path / "saved")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # tensor bytes, behind an intact header
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / path.name).write_bytes(bytes(data))
    with pytest.raises(QuantizedCheckpointError, match="damaged.*sha256"):
        load_quantized(_model(96), tmp_path / "damaged")
    with pytest.raises(QuantizedCheckpointError, match="does not fit this model"):
        load_quantized(_model(100), tmp_path / "saved")
    with pytest.raises(QuantizedCheckpointError, match="no saved quantized model"):
        load_quantized(_model(96), tmp_path / "nothing")
    with pytest.raises(QuantizedCheckpointError, match="needs a quantized model"):
        save_quantized(_model(96), tmp_path / "fp")


def test_embedded_policy_gives_the_same_actions_with_integer_execution():
    """The shipped policy, W8A8 and W4A8: integer and fake quantization agree on every action of a sequence of
    calls (10 flow-matching steps each) to within 5e-3, on actions in [-1, 1]. Not exactly: a float rounding
    difference can move an activation across a rounding boundary, one code step, and 35 layers x 10 steps add up."""
    from libero_eval.config import QuantRunConfig
    from libero_eval.quantize import quantizing
    from policies.embedded import EmbeddedPolicy
    from test_embedded_policy import batch

    for w_bits in (8, 4):
        actions = {}
        for backend in ("fake", "int"):
            cfg = QuantRunConfig(mode="duquant", w_bits=w_bits, a_bits=8, backend=backend, calib_steps=2)
            policy = quantizing(EmbeddedPolicy(None), cfg, "unused")
            policy._calibration.store = None  # no pack cache: nothing written
            actions[backend] = np.stack([policy.predict(batch([0, 1], [step, step])) for step in range(0, 40, 5)])
        diff = np.abs(actions["int"] - actions["fake"])[2:]
        assert diff.max() < 5e-3 and diff.mean() < 1e-3  # measured: W8A8 2.4e-3 / 3.2e-4
