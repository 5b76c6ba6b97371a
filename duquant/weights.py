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
  rather than of the weight, which is what matters when inputs are correlated
  (docs/fidelity.md measures it on MiniLM).
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import LayerBits
from .codes import QuantizedWeight
from .quantizer import fake_quant, fake_quant_on_grid, qrange, row_grid

# Clip ratios the MSE search tries besides the fixed one (which it keeps on ties).
MSE_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Columns GPTQ rounds before it propagates their errors to the rest in one matmul.
GPTQ_BLOCK = 128


def quantize_weight(w: torch.Tensor, bits: LayerBits, hessian: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize ``w`` [C_out, C] with ``bits.w_quantizer``; ``hessian`` [C, C] is needed for gptq only."""
    clip = bits.w_clip if bits.w_quantizer == "minmax" else mse_clip(w, bits)
    scale, zero = row_grid(w, bits.w_bits, bits.w_sym, clip)
    if bits.w_quantizer != "gptq":
        values = fake_quant_on_grid(w, scale, zero, bits.w_bits, bits.w_sym)
    elif hessian is None:
        raise ValueError("w_quantizer=gptq needs the layer's input Hessian, but none was recorded")
    else:
        # GPTQ rounds in float32 (as the reference implementation): its values lie on the float32 scales.
        scale = scale.float().to(w.dtype)
        values = gptq(w, hessian, scale, zero, bits)
    return QuantizedWeight(values, scale, zero, bits.w_bits, bits.w_sym)


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
    """GPTQ rounding of ``w`` [C_out, C] onto the fixed grid (``scale``, ``zero``: [C_out, 1]).

    Channels that never fired (zero Hessian diagonal) get weight 0, since any
    value there gives the same output, and diagonal 1 so H stays invertible;
    the damping ``bits.gptq_damp`` x mean diagonal keeps the Cholesky stable
    when inputs are nearly collinear. The Hessian algebra runs in float64,
    the column loop in float32 (as the reference implementation) on the
    transposed weight, so each column is a contiguous row: within a block of
    :data:`GPTQ_BLOCK` columns each error updates the block's later columns,
    then the block's errors update all later columns in one matmul. A
    column keeps its error-corrected value until the block ends, so the
    whole block is rounded in one call then.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(bits.gptq_damp * torch.diagonal(h).mean())
    inverse = _inverse_cholesky(h).float()
    columns = w.T.float().contiguous()  # [C, C_out]
    columns[dead] = 0.0
    qmin, qmax = qrange(bits.w_bits, bits.w_sym)
    scale = scale.float().reshape(-1)
    zero = torch.zeros_like(scale) if zero is None else zero.float().reshape(-1)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(x, scale, zero, x.dim() - 1, qmin, qmax)

    for start in range(0, columns.shape[0], GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, columns.shape[0])
        block, feedback = columns[start:end], inverse[start:end, start:end]
        for i in range(end - start - 1):
            error = (block[i] - rounded(block[i])).div_(feedback[i, i])
            block[i + 1 :].addr_(feedback[i, i + 1 :], error, alpha=-1.0)
        errors = (block - rounded(block)).div_(feedback.diagonal()[:, None])
        columns[end:] -= inverse[start:end, end:].T @ errors
        block.copy_(rounded(block))
    return columns.T.to(w.dtype)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U); row i holds column i's error feedback onto columns > i.

    With J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is
    upper triangular: one Cholesky and one triangular inverse instead of forming H^-1 and factoring it.
    """
    flipped = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(flipped, eye, upper=False).flip(0, 1)
