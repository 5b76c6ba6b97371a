"""Weight quantizers: how a (transformed) weight is rounded onto its per-output-channel grid.

All three keep the layout the rest of the library relies on: one scale (and
zero point when asymmetric) per output channel, integer codes in between.
They differ in where the grid sits and how values are rounded onto it:

- ``minmax``: each row's range shrunk by the fixed clip ratio, round to nearest.
- ``mse``: each row picks its clip ratio from :data:`MSE_CLIPS` (and the fixed
  one) to minimise its own squared rounding error, round to nearest. At 4 bits
  the best clip differs a lot between rows, so one fixed ratio is a compromise.
- ``gptq``: the ``mse`` grid, but columns are rounded one at a time and each
  rounding error is pushed onto the columns not rounded yet through the
  inverse Hessian H = X^T X of the layer's calibration inputs (Frantar et al.,
  ICLR 2023). It minimises the error of the layer's *output* on those inputs
  rather than of the weight, which is what matters, and is what makes 4-bit
  weights close to 8-bit ones on correlated inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import LayerBits
from .quantizer import fake_quant, quantize_to_grid, row_grid

# Clip ratios the MSE search tries besides the fixed one (which it keeps on ties).
MSE_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Columns GPTQ rounds before it propagates their errors to the rest in one matmul.
GPTQ_BLOCK = 128


def quantize_weight(w: torch.Tensor, bits: LayerBits, hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fake-quantize ``w`` [C_out, C] with ``bits.w_quantizer``; ``hessian`` [C, C] is needed for gptq only."""
    if bits.w_quantizer == "minmax":
        return fake_quant(w, bits.w_bits, bits.w_sym, bits.w_clip)
    clip = mse_clip(w, bits)
    if bits.w_quantizer == "mse":
        return fake_quant(w, bits.w_bits, bits.w_sym, clip)
    if hessian is None:
        raise ValueError("quant.w_quantizer=gptq needs the layer's input Hessian, but none was recorded")
    scale, zero = row_grid(w, bits.w_bits, bits.w_sym, clip)
    return gptq(w, hessian, scale, zero, bits)


def mse_clip(w: torch.Tensor, bits: LayerBits) -> torch.Tensor:
    """Per row, the clip ratio with the smallest squared rounding error ([C_out, 1], same dtype as ``w``).

    The fixed clip ``bits.w_clip`` is the first candidate and ties keep the
    first, so the search never does worse than minmax on this objective.
    """
    candidates = torch.tensor((bits.w_clip, *MSE_CLIPS), dtype=w.dtype, device=w.device)
    errors = torch.stack([(fake_quant(w, bits.w_bits, bits.w_sym, c) - w).pow(2).sum(1) for c in candidates])
    return candidates[errors.argmin(0)][:, None]


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: LayerBits
) -> torch.Tensor:
    """GPTQ rounding of ``w`` [C_out, C] onto the fixed grid (``scale``, ``zero``: [C_out, 1]), in float64.

    Channels that never fired (zero Hessian diagonal) get weight 0, since any
    value there gives the same output, and diagonal 1 so H stays invertible;
    the damping ``bits.gptq_damp`` x mean diagonal keeps the Cholesky stable
    when inputs are nearly collinear. Within each block of
    :data:`GPTQ_BLOCK` columns errors are propagated column by column; to
    the later columns in one matmul per block.
    """
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    columns = w.shape[1]
    h.diagonal().add_(bits.gptq_damp * torch.diagonal(h).mean())
    # Upper Cholesky factor of H^-1: row i holds the error-feedback weights of column i onto columns > i.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero = scale.double(), None if zero is None else zero.double()
    out = torch.empty_like(w)
    for start in range(0, columns, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, columns)
        block = w[:, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = block[:, i : i + 1]
            rounded = quantize_to_grid(column, scale, zero, bits.w_bits, bits.w_sym)
            out[:, start + i] = rounded[:, 0]
            error = (column - rounded) / inverse[start + i, start + i]
            block[:, i:] -= error @ inverse[start + i : start + i + 1, start + i : end]
            errors[:, i : i + 1] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return out
