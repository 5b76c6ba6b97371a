"""DuQuantLinear: the module that replaces a selected ``nn.Linear``.

It lives in two states. While CALIBRATING it computes the exact FP output and
records activation statistics. After :meth:`DuQuantLinear.quantize` it is
QUANTIZED: the FP weight is gone, replaced by the transformed, fake-quantized
weight, and the forward transforms and quantizes its input with precomputed
tensors only (one batched matmul per rotation, one gather for the
permutation, no Python loop over blocks, nothing computed twice).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .stats import ActivationStats
from .config import LayerBits
from .quantizer import fake_quant, fake_quant_static
from .rotation import block_rotate
from .transform import Transform


class DuQuantLinear(nn.Module):
    """Fake-quantized linear layer (``mode`` is rtn, smoothquant or duquant).

    All precomputed tensors are buffers, so ``.to(device)`` and
    ``state_dict()`` work as for any module. Smoothing is folded into
    per-block first rotations (a shared one stays a single GEMM after an
    elementwise scale); when activations stay in floating point the whole
    transform is folded back into the weight and the forward is a plain
    ``F.linear``.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    in_scale: Optional[torch.Tensor]
    r1: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    r2: Optional[torch.Tensor]
    act_scale: Optional[torch.Tensor]

    def __init__(self, linear: nn.Linear, mode: str, bits: LayerBits, stats: Optional[ActivationStats] = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.mode = mode
        self.bits = bits
        self.block_size = 0
        self.stats = stats
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        for name in ("in_scale", "r1", "perm", "r2", "act_scale"):
            self.register_buffer(name, None)

    @property
    def calibrating(self) -> bool:
        return self.stats is not None

    @torch.no_grad()
    def quantize(self, transform: Transform) -> None:
        """Switch to QUANTIZED: quantize the weight once, fold the transform into buffers, drop stats."""
        t = transform
        self.block_size = t.block
        dtype = self.weight.dtype
        weight = t.quantize_weight(self.weight, self.bits, None if self.stats is None else self.stats.hessian)
        if self.bits.a_bits >= 16:
            self.weight = t.unweight(weight).to(dtype)
        else:
            self.weight = weight.to(dtype)
            fold = t.smooth is not None and t.r1 is not None and t.r1.shape[0] > 1
            self.r1 = self._fold_smoothing(t) if fold else t.r1
            self.in_scale = None if t.smooth is None or fold else t.smooth.reciprocal()
            self.perm, self.r2, self.act_scale = t.perm, t.r2, t.act_scale
        self.stats = None

    @staticmethod
    def _fold_smoothing(t: Transform) -> torch.Tensor:
        """Per-block R1 with diag(1/s) folded in.

        A shared R1 is kept shared instead: one GEMM over all blocks plus an
        elementwise scale is faster than the batched matmul folding would force.
        """
        inv = F.pad(t.smooth.reciprocal(), (0, t.width - t.in_features), value=1.0)
        return t.r1 * inv.view(-1, t.block, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.observe(x)
            return F.linear(x, self.weight, self.bias)
        if self.bits.a_bits >= 16:
            return F.linear(x, self.weight, self.bias)
        h = self.transform_input(x.reshape(-1, self.in_features))
        if self.act_scale is not None:
            h = fake_quant_static(h, self.act_scale, self.bits.a_bits)
        else:
            h = fake_quant(h, self.bits.a_bits, self.bits.a_sym, self.bits.a_clip)
        return F.linear(h, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def transform_input(self, h: torch.Tensor) -> torch.Tensor:
        """x [N, C] -> x' [N, C_pad] in the compute dtype of ``h``."""
        if self.in_scale is not None:
            h = h * self.in_scale.to(h.dtype)
        pad = self.weight.shape[1] - self.in_features
        if pad:
            h = F.pad(h, (0, pad))
        if self.r1 is not None:
            h = block_rotate(h, self.r1.to(h.dtype))
        if self.perm is not None:
            h = h.index_select(1, self.perm)
        if self.r2 is not None:
            h = block_rotate(h, self.r2.to(h.dtype))
        return h

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else "quantized"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, bits={self.bits.tag()}, block_size={self.block_size}, state={state}"
        )
