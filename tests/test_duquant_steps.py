"""Each DuQuant step against a plain float64 reference written from its definition."""

from __future__ import annotations

import math

import pytest
import torch

from duquant.config import QuantConfig
from duquant.permutation import zigzag_permutation
from duquant.quantizer import fake_quant, fake_quant_static, percentile_scale
from duquant.rotation import block_rotate, greedy_rotation, hadamard, random_orthogonal, spread_steps, uniform_rotation
from duquant.transform import fit_transform, smoothing_scales


def _orthogonality_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return (r.double() @ r.double().transpose(-1, -2) - eye).abs().max().item()


def test_smoothing_matches_formula():
    g = torch.Generator().manual_seed(0)
    act_max = torch.rand(16, generator=g) * 10
    act_max[3] = 0.0  # a dead channel must not give inf or nan
    weight = torch.randn(8, 16, generator=g)
    s = smoothing_scales(act_max, weight, alpha=0.6)
    a = act_max.double().clamp(min=1e-5)
    w = weight.double().abs().max(dim=0).values.clamp(min=1e-5)
    expected = torch.tensor([max(a[j] ** 0.6 / w[j] ** 0.4, 1e-5) for j in range(16)], dtype=torch.float64)
    torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=0)


def test_uniform_rotation_spreads_channel_zero():
    u = uniform_rotation(64)
    assert _orthogonality_error(u) < 1e-12
    torch.testing.assert_close(u[0], torch.full((64,), 1 / 8, dtype=torch.float64))
    spike = torch.zeros(64, dtype=torch.float64)
    spike[0] = 8.0
    torch.testing.assert_close((spike @ u).abs(), torch.ones(64, dtype=torch.float64))


def test_hadamard_and_random_orthogonal_are_orthogonal():
    assert _orthogonality_error(hadamard(128)) < 1e-12
    q = random_orthogonal(31, 4, torch.Generator().manual_seed(1))
    assert q.shape == (4, 31, 31) and _orthogonality_error(q) < 1e-12
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(96)


def _reference_greedy(x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Float64, one step at a time, outlier located by explicit row/column search; shared matrix."""
    b = x.shape[-1]
    spreads = spread_steps(b, steps, seed)
    data = x.double().reshape(-1, b)
    total = torch.eye(b, dtype=torch.float64)
    best, best_peak = total.clone(), data.abs().max().item()
    for t in range(steps):
        flat_index = int(data.abs().argmax())
        column = flat_index % b  # the outlier's channel, not its row
        swap = list(range(b))
        swap[0], swap[column] = column, 0
        step = spreads[t][swap][:, swap]
        data = data @ step
        total = total @ step
        if data.abs().max().item() < best_peak:
            best, best_peak = total.clone(), data.abs().max().item()
    return best


def test_spread_steps_first_row_spreads_channel_zero():
    spreads = spread_steps(32, 5, seed=0)
    assert _orthogonality_error(spreads) < 1e-12
    torch.testing.assert_close(spreads[:, 0, 0], torch.full((5,), 32**-0.5, dtype=torch.float64))
    assert not torch.allclose(spreads[0], spreads[1])
    assert torch.equal(spreads, spread_steps(32, 5, seed=0)) and not torch.equal(spreads, spread_steps(32, 5, seed=1))


def test_greedy_rotation_matches_reference_and_lowers_the_peak():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, dtype=torch.float64, generator=g)
    x[:, 5] *= 40.0
    x[7, 20] = -300.0
    got = greedy_rotation(x[None].float(), 24, seed=3)[0]
    expected = _reference_greedy(x, 24, seed=3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert _orthogonality_error(got.float()) < 1e-6
    assert (x @ got).abs().max() < 0.5 * x.abs().max()


def test_greedy_rotation_keeps_identity_when_nothing_helps():
    x = torch.ones(4, 16)  # the uniform vector is already perfectly flat
    r = greedy_rotation(x[None], 8, seed=0)
    torch.testing.assert_close(r[0], torch.eye(16, dtype=torch.float64))


def test_greedy_rotation_per_block_groups_are_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g)
    x[1, :, 2] *= 50.0
    per_block = greedy_rotation(x, 10, seed=0)
    assert per_block.shape == (3, 16, 16)
    assert not torch.allclose(per_block[0], per_block[1])
    for k in range(3):
        assert (x[k].double() @ per_block[k]).abs().max() <= x[k].abs().max() + 1e-6


def test_block_rotate_matches_block_diagonal_matmul():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, dtype=torch.float64, generator=g)
    for groups in (1, 3):
        r = random_orthogonal(16, groups, g)
        dense = torch.block_diag(*[r[k % groups] for k in range(3)])
        torch.testing.assert_close(block_rotate(x, r), x @ dense)


def _reference_zigzag(magnitude: list[float], block: int) -> list[int]:
    order = sorted(range(len(magnitude)), key=lambda i: -magnitude[i])
    blocks = len(magnitude) // block
    dealt: list[list[int]] = [[] for _ in range(blocks)]
    cur, step = 0, 1
    for channel in order:
        dealt[cur].append(channel)
        if not 0 <= cur + step < blocks:
            step = -step  # stay on the end block once, then turn around
        else:
            cur += step
    return [c for b in dealt for c in b]


def test_zigzag_matches_reference_and_balances_blocks():
    g = torch.Generator().manual_seed(0)
    magnitude = torch.rand(96, generator=g) * torch.logspace(0, 3, 96)[torch.randperm(96, generator=g)]
    perm = zigzag_permutation(magnitude, block=16)
    assert perm.tolist() == _reference_zigzag(magnitude.tolist(), 16)
    sums = magnitude[perm].view(6, 16).sum(1)
    assert sums.max() / sums.min() < magnitude.view(6, 16).sum(1).max() / magnitude.view(6, 16).sum(1).min()
    with pytest.raises(ValueError, match="divisible"):
        zigzag_permutation(magnitude[:90], 16)


def _reference_fake_quant(x: torch.Tensor, bits: int, sym: bool, clip: float) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float64)
    for i, row in enumerate(x.double()):
        hi, lo = row.max().item(), row.min().item()
        if sym:
            scale = max(max(hi, -lo) * clip / (2 ** (bits - 1) - 1), 1e-8)
            codes = [min(max(round(v / scale), -(2 ** (bits - 1))), 2 ** (bits - 1) - 1) for v in row.tolist()]
            out[i] = torch.tensor(codes, dtype=torch.float64) * scale
        else:
            hi, lo = max(hi, 0.0) * clip, min(lo, 0.0) * clip
            scale = max((hi - lo) / (2**bits - 1), 1e-8)
            zero = round(-lo / scale)
            codes = [min(max(round(v / scale + zero), 0), 2**bits - 1) for v in row.tolist()]
            out[i] = (torch.tensor(codes, dtype=torch.float64) - zero) * scale
    return out


@pytest.mark.parametrize(
    "bits,sym,clip", [(4, False, 0.8), (4, True, 1.0), (8, True, 1.0), (8, False, 0.9), (2, False, 1.0)]
)
def test_fake_quant_matches_integer_reference(bits, sym, clip):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 40, dtype=torch.float64, generator=g) * torch.logspace(-1, 1, 6, dtype=torch.float64)[:, None]
    got = fake_quant(x, bits, sym, clip)
    torch.testing.assert_close(got, _reference_fake_quant(x, bits, sym, clip), rtol=0, atol=1e-12)
    assert all(len(row.unique()) <= 2**bits for row in got)


def test_fake_quant_keeps_half_precision_codes_exact():
    x = torch.randn(4, 300).bfloat16()
    got = fake_quant(x, 8, False, 1.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), fake_quant(x.float(), 8, False, 1.0).bfloat16().float())


def test_static_activation_scales_from_percentile():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1000, 4, generator=g)
    sample[0, 1] = 1000.0  # one rare spike is ignored by the 99.9th percentile
    scale = percentile_scale(sample, 99.9, bits=8)
    level = torch.tensor([sorted(sample[:, j].abs().tolist())[998] for j in range(4)])
    torch.testing.assert_close(scale, level / 127)
    q = fake_quant_static(sample, scale, 8)
    assert q.abs().max() <= 128 * scale.max()


def test_fitted_transform_is_exactly_equivalent_without_quantization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 200, generator=g)
    x[:, [3, 150]] *= 25.0
    w = torch.randn(48, 200, generator=g) / 14
    cfg = QuantConfig(block_size=64, rotation_steps=16)
    t = fit_transform(cfg, cfg.layer_bits("l"), w, x.abs().amax(0), x)
    assert t.width == 256 and t.perm is not None
    for r in (t.r1, t.r2):
        assert r.dtype == torch.float32 and _orthogonality_error(r) < 1e-6
    xt, wt = t.activations(x), t.weight(w)
    ref = x.double() @ w.double().T
    assert ((xt @ wt.T).double() - ref).norm() / ref.norm() < 1e-5
    assert xt.abs().max() < 0.5 * x.abs().max()
    torch.testing.assert_close(t.unweight(wt.double()), w.double(), rtol=0, atol=1e-5)
    assert math.isclose(t.smooth[3].item(), smoothing_scales(x.abs().amax(0), w, 0.6)[3].item())
