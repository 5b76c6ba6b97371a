"""Integer weight codes: what a quantized weight is, stored compactly.

A weight quantized per output channel is ``(u - zero) * scale`` with unsigned
codes ``u`` in [0, 2^bits - 1], one scale and one integer zero point per row
(a symmetric grid is the special case zero = 2^(bits-1)). Codes of 4 bits and
fewer are stored two per byte (column 2j in the low nibble, 2j+1 in the high
one); wider codes one per byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .quantizer import qrange


@dataclass
class QuantizedWeight:
    """A fake-quantized weight (``values``, float) with the per-row grid it lies on."""

    values: torch.Tensor  # [C_out, C], on the grid
    scale: torch.Tensor  # [C_out, 1]
    zero: Optional[torch.Tensor]  # [C_out, 1], integer-valued; None when symmetric
    bits: int
    sym: bool

    def unsigned_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(u [C_out, C] uint8, zero_u [C_out] uint8) with values == (u - zero_u) * scale.

        ``values`` is exactly (q - zero) * scale rounded once, so values / scale is within
        far less than 0.5 of an integer and rounding recovers q - zero exactly.
        """
        qmin, _ = qrange(self.bits, self.sym)
        signed = torch.round(self.values / self.scale)
        zero = torch.full_like(self.scale, -qmin) if self.zero is None else self.zero
        return (signed + zero).to(torch.uint8), zero.reshape(-1).to(torch.uint8)


def packs(bits: int) -> bool:
    """Whether codes of this width are stored two per byte."""
    return bits <= 4


def store(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] uint8 -> their stored form: [N, ceil(K/2)] packed at <= 4 bits, else as is."""
    if not packs(bits):
        return codes
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def load(stored: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`store`: the unsigned codes [N, columns] uint8."""
    if not packs(bits):
        return stored
    return torch.stack((stored & 15, stored >> 4), -1).reshape(stored.shape[0], -1)[:, :columns]


def stored_shape(rows: int, columns: int, bits: int) -> tuple[int, int]:
    return (rows, (columns + 1) // 2) if packs(bits) else (rows, columns)
