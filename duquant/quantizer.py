"""Fake quantization: quantize to integers and dequantize at once, in floating point.

The result is exactly what integer kernels would produce (integer codes times
scale, minus zero point), so accuracy measured with it is the accuracy of the
deployed model. Everything here is a pure function of its inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

_EPS = 1e-8


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Integer code range: two's complement when symmetric, unsigned when asymmetric."""
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Scale arithmetic in half precision loses integer codes above 256, so work in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fake_quant(x: torch.Tensor, bits: int, sym: bool, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize-dequantize with one scale per row (per token, or per output channel of a weight).

    ``clip`` shrinks the range before the scale is chosen, trading clipping
    error on the few largest values for resolution on all the others; a
    tensor gives each row its own clip ([rows, 1]).
    """
    h = _upcast(x)
    scale, zero = row_grid(h, bits, sym, clip)
    return fake_quant_on_grid(h, scale, zero, bits, sym).to(x.dtype)


def fake_quant_on_grid(
    h: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, sym: bool
) -> torch.Tensor:
    """Quantize-dequantize ``h`` onto a given per-row grid (from :func:`row_grid`)."""
    qmin, qmax = qrange(bits, sym)
    return _dequantize(row_codes(h, scale, zero), zero, scale, qmin, qmax)


def row_codes(h: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Unrounded integer codes of ``h`` on the grid (zero point included): h / scale (+ zero)."""
    return h / scale if zero is None else torch.addcdiv(zero, h, scale)


def row_grid(
    h: torch.Tensor, bits: int, sym: bool, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The per-row grid of :func:`fake_quant`: scale [rows, 1] and, when asymmetric, zero point [rows, 1].

    The asymmetric range always contains zero so the zero point is a valid code.
    """
    _, qmax = qrange(bits, sym)
    hi, lo = h.amax(-1, keepdim=True), h.amin(-1, keepdim=True)
    if sym:
        return (torch.maximum(hi, -lo) * (clip / qmax)).clamp(min=_EPS), None
    hi, lo = hi.clamp(min=0) * clip, lo.clamp(max=0) * clip
    scale = ((hi - lo) / qmax).clamp(min=_EPS)
    return scale, torch.round(-lo / scale)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric quantize-dequantize with fixed per-channel scales (``scale`` broadcasts over the last dim)."""
    qmin, qmax = qrange(bits, sym=True)
    return _dequantize(_upcast(x) / scale, None, scale, qmin, qmax).to(x.dtype)


def _dequantize(
    codes: torch.Tensor, zero: Optional[torch.Tensor], scale: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Round and clamp unrounded ``codes`` (zero point included), then map back: (q - zero) * scale.

    ``codes`` is always a fresh intermediate, so when autograd is not tracking
    it the steps run in place: on large activations allocation, not
    arithmetic, dominates these elementwise passes.
    """
    if codes.requires_grad:
        q = codes.round().clamp(qmin, qmax)
        return (q if zero is None else q - zero) * scale
    q = codes.round_().clamp_(qmin, qmax)
    return (q if zero is None else q.sub_(zero)).mul_(scale)


def percentile_scale(sample: torch.Tensor, percentile: float, bits: int) -> torch.Tensor:
    """Per-channel static scales: the ``percentile`` of |x| over the sample rows, mapped to the top code."""
    k = max(1, min(sample.shape[0], round(sample.shape[0] * percentile / 100.0)))
    level = sample.abs().float().kthvalue(k, dim=0).values
    _, qmax = qrange(bits, sym=True)
    return (level / qmax).clamp(min=_EPS)
