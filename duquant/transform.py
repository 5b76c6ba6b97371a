"""The per-layer equivalent transform of DuQuant and the code that fits it to calibration data.

For input x [N, C] and weight w [C_out, C] the transform is

    x' = pad(x / s) R1 P R2        w' = pad(w * s) R1 P R2

so x' w'^T == x w^T while x' has far smaller peaks than x: smoothing moves
activation range into the weight, the block rotation R1 spreads each block's
outliers over the block, the zigzag permutation P balances outlier mass
between blocks and R2 spreads what is left. ``pad`` appends zero channels so
the width is a multiple of the block size (a zero channel stays harmless
under any rotation). Every piece is optional, which gives the baselines:
RTN uses none, SmoothQuant only ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from .config import LayerBits, QuantConfig
from .permutation import zigzag_permutation
from .quantizer import percentile_scale
from .rotation import block_rotate, greedy_rotation, hadamard, svd_rotation
from .seeds import derive_seed
from .codes import QuantizedWeight
from .weights import quantize_weight

_MIN_SCALE = 1e-5


@dataclass
class Transform:
    """Fitted transform of one layer; tensors are float32 (``perm`` int64) on the layer's device."""

    in_features: int
    block: int = 0  # 0: no rotation, so no padding either
    smooth: Optional[torch.Tensor] = None  # s [C]
    r1: Optional[torch.Tensor] = None  # [G, b, b]
    perm: Optional[torch.Tensor] = None  # [C_pad]
    r2: Optional[torch.Tensor] = None  # [G, b, b]
    row_rotation: Optional[torch.Tensor] = None  # [G, b_out, b_out], output rows
    act_scale: Optional[torch.Tensor] = None  # static per-channel activation scales [C_pad]

    @property
    def width(self) -> int:
        """Channel count after padding, the inner dimension of the quantized matmul."""
        return math.ceil(self.in_features / self.block) * self.block if self.block else self.in_features

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C] -> x' [N, C_pad], step by step (the reference the fast layer folds)."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        x = F.pad(x, (0, self.width - self.in_features))
        return self._rotate(x)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """w [C_out, C] -> w' [C_out, C_pad], the weight that pairs with :meth:`activations`."""
        if self.smooth is not None:
            w = w * self.smooth.to(w.dtype)
        w = F.pad(w, (0, self.width - self.in_features))
        return self._rotate(w)

    def unweight(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight`: map a transformed (e.g. quantized) weight back to the input basis."""
        if self.r2 is not None:
            w = block_rotate(w, self.r2.to(w.dtype).transpose(1, 2))
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.r1 is not None:
            w = block_rotate(w, self.r1.to(w.dtype).transpose(1, 2))
        w = w[:, : self.in_features]
        return w / self.smooth.to(w.dtype) if self.smooth is not None else w

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """H [C, C] of the inputs -> T^T H T [C_pad, C_pad], the Hessian of x' = x T."""
        return self.activations(self.activations(h).T)

    def quantize_weight(self, w: torch.Tensor, bits: LayerBits, hessian: Optional[torch.Tensor] = None) -> QuantizedWeight:
        """Transform and quantize per output channel, in float64, once.

        The result lies on its grid in the transformed input basis, and in
        rotated output rows when the transform has a row rotation
        (:meth:`restore_rows` maps it back, which equals a quantized matmul
        followed by undoing the output rotation). ``hessian`` is the input
        Hessian X^T X in the input basis (GPTQ only).
        """
        w = self.weight(w.double())
        h = None if hessian is None else self.hessian(hessian.float())  # as accumulated; GPTQ factors it in float64
        if self.row_rotation is not None:
            rows = w.shape[0]
            padded = math.ceil(rows / self.row_rotation.shape[-1]) * self.row_rotation.shape[-1]
            w = block_rotate(F.pad(w.T, (0, padded - rows)), self.row_rotation.double()).T
        return quantize_weight(w, bits, h)

    def restore_rows(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        """Undo the row rotation of a weight from :meth:`quantize_weight` (identity without one)."""
        if self.row_rotation is None:
            return w
        r = self.row_rotation.to(w.dtype).transpose(1, 2)
        return block_rotate(w.T.contiguous(), r).T[:rows]

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.r1 is not None:
            x = block_rotate(x, self.r1.to(x.dtype))
        if self.perm is not None:
            x = x[:, self.perm]
        if self.r2 is not None:
            x = block_rotate(x, self.r2.to(x.dtype))
        return x

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors by field name (what a pack stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


def effective_block(width: int, cfg: QuantConfig) -> int:
    """Block size actually used for ``width`` channels: never wider than the layer (rounded up to 2^k for Hadamard)."""
    if width >= cfg.block_size:
        return cfg.block_size
    return 1 << (width - 1).bit_length() if cfg.rotation == "hadamard" else width


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant scales s_j = max|x_j|^alpha / max|w_:,j|^(1-alpha), floored at 1e-5."""
    a = act_max.double().clamp(min=_MIN_SCALE)
    w = weight.double().abs().amax(0).clamp(min=_MIN_SCALE)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_MIN_SCALE).float()


def fit_rotation(x: torch.Tensor, block: int, cfg: QuantConfig, stage: str) -> torch.Tensor:
    """Fit one block rotation to the rows of ``x`` [N, K*b]; float64 [G, b, b] with G = 1 or K.

    ``stage`` names the rotation (r1, r2, rows) so each draws its own random sequence.
    """
    rows, width = x.shape
    if cfg.rotation == "hadamard":
        return hadamard(block).to(x.device)[None]
    if cfg.per_block_rotation:
        groups = x.reshape(rows, width // block, block).transpose(0, 1)
    else:
        groups = x.reshape(1, -1, block)
    if cfg.rotation == "svd":
        return svd_rotation(groups)
    return greedy_rotation(groups, cfg.rotation_steps, derive_seed(cfg.seed, "greedy", stage), cfg.rotation_patience)


def fit_transform(
    cfg: QuantConfig,
    bits: LayerBits,
    weight: torch.Tensor,
    act_max: Optional[torch.Tensor],
    sample: Optional[torch.Tensor],
) -> Transform:
    """Fit the transform of one layer from its weight and calibration statistics.

    ``act_max`` is the running per-channel max |x| over every calibration call
    (it drives smoothing); ``sample`` is a bounded sample of input rows (it
    drives the rotations, the permutation and static activation scales).
    """
    in_features = weight.shape[1]
    static = cfg.act_scales == "static" and bits.a_bits < 16
    if (cfg.smooths or cfg.rotates or static) and (sample is None or act_max is None):
        raise ValueError(f"mode={cfg.mode} with these options needs calibration inputs, but none were recorded")
    t = Transform(in_features)
    if cfg.smooths:
        t.smooth = smoothing_scales(act_max, weight, cfg.smooth_alpha)
    x = None if sample is None else sample.float()
    if x is not None and t.smooth is not None:
        x = x / t.smooth
    if cfg.rotates:
        t.block = effective_block(in_features, cfg)
        x = F.pad(x, (0, t.width - in_features))
        t.r1 = fit_rotation(x, t.block, cfg, "r1").float()
        x = block_rotate(x, t.r1)
        if cfg.permutes and t.width > t.block:
            t.perm = zigzag_permutation(x.abs().amax(0), t.block)
            x = x[:, t.perm]
        t.r2 = fit_rotation(x, t.block, cfg, "r2").float()
        x = block_rotate(x, t.r2)
        if cfg.row_rotation == "restore" and bits.w_bits < 16:
            t.row_rotation = _fit_row_rotation(t.weight(weight.float()), cfg)
    if static:
        t.act_scale = percentile_scale(x, cfg.act_percentile, bits.a_bits)
    return t


def _fit_row_rotation(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Rotation of the output rows, fitted to the transformed weight's columns."""
    rows = w.shape[0]
    block = effective_block(rows, cfg)
    padded = math.ceil(rows / block) * block
    return fit_rotation(F.pad(w.T, (0, padded - rows)), block, cfg, "rows").float()
