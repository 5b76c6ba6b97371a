"""Integer matrix products for ``backend="int"``: uint8 activation codes times int8 weights, exact.

:class:`Int8Matmul` computes ``a @ w.T`` for activation codes ``a`` [M, K]
(uint8) and weights ``w`` [N, K] (int8) with integer accumulation, returned
as float32 (exact while |a @ w.T| < 2^24, rounded once beyond). It picks the
kernel by device and never falls back to floating point:

- CUDA: ``torch._int_mm`` (int8 x int8 -> int32). Its shape rules (M > 16, K
  and N multiples of 8) are met by zero padding, which adds nothing to the sums.
- CPU: oneDNN's u8 x s8 GEMM (``torch.ops.onednn.qlinear_pointwise``, the
  kernel behind torch's x86 quantization), on a weight pre-packed once. Without
  VNNI it sums pairs of u8*s8 products in int16 and saturates once
  2*255*|w| > 32767; a one-time probe detects that, and such layers are run
  on the activation codes split as 2*(a >> 1) + (a & 1), both halves below 128.
  4-bit weights never need the split.
- elsewhere (no oneDNN): ``torch._int_mm``, exact but slow on the CPU.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

_INT16_MAX = 32767


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether oneDNN's int8 linear runs here and is exact on codes that cannot saturate."""
    try:
        w = torch.randint(-64, 64, (32, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        a = torch.randint(0, 128, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        return torch.equal(_onednn(a, _prepack(w)), a.float() @ w.float().T)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_saturates() -> bool:
    """Whether oneDNN sums u8*s8 pairs in int16 here (no VNNI): probed once with the worst case."""
    w = torch.full((16, 64), 127, dtype=torch.int8)
    a = torch.full((2, 64), 255, dtype=torch.uint8)
    return not torch.equal(_onednn(a, _prepack(w)), a.float() @ w.float().T)


def _prepack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(w, [1, w.shape[1]])


def _onednn(a: torch.Tensor, packed: torch.Tensor, unit: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """a @ w.T as float32: every scale 1 and zero point 0 (``unit``: those per-channel tensors, if kept)."""
    ones, zeros = unit or (torch.ones(packed.shape[1]), torch.zeros(packed.shape[1], dtype=torch.long))
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [None], "")


class Int8Matmul:
    """``a @ w.T`` in integers for a fixed int8 weight ``w`` [N, K]; see the module docstring for the kernels."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"Int8Matmul needs a 2-D int8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.device = weight.device
        self.split = False
        if weight.device.type == "cuda":
            self.kernel = "int_mm"
            n, k = (-self.out_features) % 8, (-self.in_features) % 8
            self._weight = F.pad(weight, (0, k, 0, n)).T  # [K', N'], column-major: _int_mm's fast layout
        elif weight.device.type == "cpu" and onednn_available():
            self.kernel = "onednn"
            self._weight = _prepack(weight.contiguous())
            self._unit = (torch.ones(self.out_features), torch.zeros(self.out_features, dtype=torch.long))
            self.split = onednn_saturates() and 2 * 255 * int(weight.abs().max()) > _INT16_MAX
        else:
            self.kernel = "int_mm"
            warnings.warn("no fast int8 kernel on this device: using torch._int_mm (exact, slow on the CPU)", stacklevel=2)
            self._weight = weight.T
        self.row_sums = weight.sum(1, dtype=torch.int32).float()  # sum_k w[n, k], for zero points

    def weight(self) -> torch.Tensor:
        """The int8 weight [N, K] back from the kernel's layout (for ``state_dict``)."""
        if self.kernel == "onednn":
            return self._weight.to_dense().T.contiguous()
        return self._weight.T[: self.out_features, : self.in_features].contiguous()

    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """a [M, K] uint8 -> a @ w.T [M, N] float32."""
        if self.kernel == "onednn":
            if not self.split:
                return _onednn(a, self._weight, self._unit)
            halves = _onednn(torch.cat((a >> 1, a & 1)), self._weight, self._unit)
            high, low = halves.split(a.shape[0])
            return high.mul_(2).add_(low)
        return self._int_mm(a)

    def _int_mm(self, a: torch.Tensor) -> torch.Tensor:
        """With int8 operands: a - 128 [M, K], then the 128 * row sums added back."""
        m = a.shape[0]
        centred = (a.to(torch.int16) - 128).to(torch.int8)
        pad_m = 17 - m if self.device.type == "cuda" and m <= 16 else 0
        centred = F.pad(centred, (0, self._weight.shape[0] - self.in_features, 0, pad_m))
        out = torch._int_mm(centred, self._weight)[:m, : self.out_features].float()
        return out.add_(self.row_sums, alpha=128.0)

