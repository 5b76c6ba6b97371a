"""DuQuantLinear: the module that replaces a selected ``nn.Linear``.

It lives in two states. While CALIBRATING it computes the exact FP output and
records activation statistics. After :meth:`DuQuantLinear.quantize` it is
QUANTIZED and holds what defines the quantized layer: the integer weight codes
(packed two per byte at <= 4 bits) with their per-row scales and zero points,
the fitted transform (smoothing, rotations, permutation) and the bias. That is
its ``state_dict``, the same for both backends, so a quantized model saves,
and loads into a freshly built one, like any module.

How it computes is the ``backend``, derived from that state:

- ``fake``: dequantize the weight once to floating point and quantize-
  dequantize activations per call (the reference; what accuracy studies use);
- ``int``: quantize activations to integer codes per call and multiply them
  with the integer weight (:mod:`duquant.kernels`), rescaling the int32 sums
  by activation and weight scales. Equal to ``fake`` up to floating-point
  accumulation order. Weight-only layers (A16) keep their packed codes and
  dequantize them at use.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import codes
from .config import LayerBits
from .kernels import Int8Matmul
from .quantizer import _upcast, fake_quant, fake_quant_static, qrange, row_codes, row_grid
from .rotation import block_rotate
from .stats import ActivationStats
from .transform import Transform

BACKENDS = ("fake", "int")
TRANSFORM_BUFFERS = ("smooth", "r1", "perm", "r2", "row_rotation", "act_scale")
CODE_BUFFERS = ("qweight", "w_scale", "w_zero")
STATE_VERSION = 1


class DuQuantLinear(nn.Module):
    """Quantized linear layer (``mode`` is rtn, smoothquant or duquant) run by ``backend`` (fake or int)."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]

    def __init__(
        self,
        linear: nn.Linear,
        mode: str,
        bits: LayerBits,
        stats: Optional[ActivationStats] = None,
        backend: str = "fake",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {' | '.join(BACKENDS)}, got {backend!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.mode = mode
        self.bits = bits
        self.backend = backend
        self.block_size = 0
        self.stats = stats
        self.quantized = False
        self.compute_dtype = linear.weight.dtype
        self.kernel: Optional[Int8Matmul] = None
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        for name in TRANSFORM_BUFFERS + CODE_BUFFERS:
            self.register_buffer(name, None)
        # Derived for the forward: 1/smooth, or the smoothing folded into a per-block R1.
        self.register_buffer("fwd_in_scale", None, persistent=False)
        self.register_buffer("fwd_r1", None, persistent=False)
        self.register_buffer("fwd_w_scale", None, persistent=False)
        self.width = self.in_features

    @property
    def calibrating(self) -> bool:
        return self.stats is not None

    def transform(self) -> Transform:
        return Transform(self.in_features, self.block_size, **{n: getattr(self, n) for n in TRANSFORM_BUFFERS})

    @torch.no_grad()
    def quantize(self, transform: Transform) -> None:
        """Switch to QUANTIZED: quantize the weight once, keep its codes and the transform, drop stats."""
        t = transform
        self.block_size = t.block
        for name in TRANSFORM_BUFFERS:
            setattr(self, name, getattr(t, name))
        hessian = None if self.stats is None else self.stats.hessian
        if self.bits.w_bits < 16:
            q = t.quantize_weight(self.weight, self.bits, hessian)
            unsigned, zero = q.unsigned_codes()
            self.qweight = codes.store(unsigned, self.bits.w_bits)
            self.w_scale, self.w_zero = q.scale.reshape(-1), zero
            self.weight = None
        else:
            self.weight = t.weight(self.weight.double())  # activation-only: the FP weight in the transformed basis
        self.stats = None
        self.quantized = True
        self._derive()

    def dequantized_weight(self) -> torch.Tensor:
        """The quantized weight in float64, in the transformed input basis (output rows restored)."""
        if self.qweight is None and self.kernel is None:
            return self.weight.double()
        signed = self._signed_codes().double()
        return self.transform().restore_rows(signed * self.w_scale.double()[:, None], self.out_features)

    def _signed_codes(self) -> torch.Tensor:
        """u - zero per row [C_out, width] int16: the integer weight the kernels multiply."""
        if self.kernel is not None:
            return self.kernel.weight().to(torch.int16)
        unsigned = codes.load(self.qweight, self.bits.w_bits, self.width)
        return unsigned.to(torch.int16) - self.w_zero.to(torch.int16)[:, None]

    def _derive(self) -> None:
        """Build the forward's buffers (and the int kernel) from the persistent state."""
        t = self.transform()
        self.width = t.width  # in_features padded to whole rotation blocks: the quantized matmul's inner dimension
        if self.bits.a_bits < 16 or self.backend == "int":  # the input is transformed at run time
            fold = t.smooth is not None and t.r1 is not None and t.r1.shape[0] > 1
            self.fwd_r1 = self._fold_smoothing(t) if fold else t.r1
            self.fwd_in_scale = None if t.smooth is None or fold else t.smooth.reciprocal()
        if self.backend == "fake":
            weight = self.dequantized_weight()
            if self.bits.a_bits >= 16:
                weight = t.unweight(weight)
            self._set_weight(weight.to(self.compute_dtype), persistent=self.qweight is None)
        else:
            self._set_weight(None, persistent=False)
            self.kernel = self._int_kernel()
            if self.kernel is not None:
                self.qweight = None  # the kernel holds the weight; state_dict() reads it back
            self.fwd_w_scale = self.w_scale.float()

    def _int_kernel(self) -> Optional[Int8Matmul]:
        """Integer activations: the int8 GEMM. Weight-only: none, the packed codes are dequantized at use (torch's
        packed-int4 CPU kernel took 190 ms where FP32 took 4 ms here, with float32 inputs; docs/integer.md)."""
        return Int8Matmul(self._signed_codes().to(torch.int8)) if self.bits.a_bits < 16 else None

    def _set_weight(self, weight: Optional[torch.Tensor], persistent: bool) -> None:
        self.weight = weight
        if persistent:
            self._non_persistent_buffers_set.discard("weight")
        else:
            self._non_persistent_buffers_set.add("weight")

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
        if self.backend == "fake" and self.bits.a_bits >= 16:
            return F.linear(x, self.weight, self.bias)
        h = self.transform_input(x.reshape(-1, self.in_features))
        if self.backend == "int":
            y = self._int_matmul(h) if self.bits.a_bits < 16 else self._dequantized_matmul(h)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.act_scale is not None:
            h = fake_quant_static(h, self.act_scale, self.bits.a_bits)
        else:
            h = fake_quant(h, self.bits.a_bits, self.bits.a_sym, self.bits.a_clip)
        return F.linear(h, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def _int_matmul(self, h: torch.Tensor) -> torch.Tensor:
        """Per-token integer codes of ``h`` (the same ones fake quantization rounds to) times the integer weight."""
        h = _upcast(h)
        bits = self.bits
        scale, zero = row_grid(h, bits.a_bits, bits.a_sym, bits.a_clip)
        qmin, qmax = qrange(bits.a_bits, bits.a_sym)
        q = row_codes(h, scale, zero).round_().clamp_(qmin, qmax)
        if zero is None:  # symmetric codes, shifted into uint8 with a constant zero point
            q, zero = q.sub_(qmin), torch.full_like(scale, -qmin)
        y = self.kernel(q.to(torch.uint8))
        y = y.addr_(zero.reshape(-1), self.kernel.row_sums, alpha=-1.0).mul_(scale).mul_(self.fwd_w_scale)
        return y if self.bias is None else y.add_(self.bias.float())

    def _dequantized_matmul(self, h: torch.Tensor) -> torch.Tensor:
        """Weight-only layers: the packed codes dequantized at use, so only they stay resident."""
        weight = (self._signed_codes().to(h.dtype) * self.w_scale.to(h.dtype)[:, None])
        return F.linear(h, self.transform().restore_rows(weight, self.out_features), self.bias)

    def transform_input(self, h: torch.Tensor) -> torch.Tensor:
        """x [N, C] -> x' [N, C_pad] in the compute dtype of ``h``."""
        if self.fwd_in_scale is not None:
            h = h * self.fwd_in_scale.to(h.dtype)
        pad = self.width - self.in_features
        if pad:
            h = F.pad(h, (0, pad))
        if self.fwd_r1 is not None:
            h = block_rotate(h, self.fwd_r1.to(h.dtype))
        if self.perm is not None:
            h = h.index_select(1, self.perm)
        if self.r2 is not None:
            h = block_rotate(h, self.r2.to(h.dtype))
        return h

    # --- state_dict: the persistent state above, plus what the layer is (mode, bits, block) as extra state ---

    def get_extra_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "quantized": self.quantized, "mode": self.mode, "bits": vars(self.bits),
                "block_size": self.block_size, "in_features": self.in_features, "out_features": self.out_features}  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DuQuantLinear state version {state.get('version')!r}, expected {STATE_VERSION}")
        shape = (state["out_features"], state["in_features"])
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"a quantized layer of shape {shape} cannot load into one of shape "
                             f"{(self.out_features, self.in_features)}")  # fmt: skip
        self.mode, self.bits, self.block_size = state["mode"], LayerBits(**state["bits"]), state["block_size"]
        self.quantized = state["quantized"]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:  # the int kernel holds the weight in its own layout: write it back as codes
            unsigned = (self._signed_codes() + self.w_zero.to(torch.int16)[:, None]).to(torch.uint8)
            destination[prefix + "qweight"] = codes.store(unsigned, self.bits.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if not (extra or {}).get("quantized"):
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        # A quantized state: take exactly the buffers it has (a calibrating layer has others), then derive.
        device = next((b.device for b in self._buffers.values() if b is not None), torch.device("cpu"))
        self.kernel, self.stats = None, None
        for name in ("weight", "bias", *TRANSFORM_BUFFERS, *CODE_BUFFERS):
            tensor = state_dict.get(prefix + name)
            self._buffers[name] = None if tensor is None else torch.empty_like(tensor, device=device)
        self._non_persistent_buffers_set.discard("weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not error_msgs:
            with torch.no_grad():
                self._derive()

    def _apply(self, fn, recurse=True):
        """``.to(device)`` and friends: the int kernel is rebuilt from the moved codes on the new device."""
        if self.kernel is None:
            return super()._apply(fn, recurse)
        unsigned = (self._signed_codes() + self.w_zero.to(torch.int16)[:, None]).to(torch.uint8)
        self.qweight, self.kernel = codes.store(unsigned, self.bits.w_bits), None
        super()._apply(fn, recurse)
        with torch.no_grad():
            self._derive()
        return self

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else "quantized"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, bits={self.bits.tag()}, block_size={self.block_size}, backend={self.backend}, "
            f"state={state}"
        )
