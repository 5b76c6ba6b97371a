"""What quantization did: per-layer error and activation ranges, and a summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

WORST_LAYERS = 5


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class LayerReport:
    """One quantized layer. SQNR and activation peaks are measured on its calibration sample."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features), as nn.Linear.weight
    w_bits: int
    a_bits: int
    block_size: int = 0
    sqnr_db: Optional[float] = None
    act_max_before: Optional[float] = None
    act_max_after: Optional[float] = None
    calib_calls: int = 0
    calib_rows: int = 0
    cache: str = "off"  # off | hit | miss | rebuilt

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape)
        row["sqnr_db"] = _finite(self.sqnr_db)
        return row


@dataclass
class QuantReport:
    """Summary of one ``quantize_`` ... ``finish()`` run."""

    mode: str
    w_bits: int
    a_bits: int
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # selected but left in FP by a 16/16 override
    seconds: float = 0.0

    @property
    def average_sqnr_db(self) -> Optional[float]:
        values = [r.sqnr_db for r in self.layers if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
        return sum(values) / len(values) if values else None

    def worst_layers(self, k: int = WORST_LAYERS) -> list[LayerReport]:
        rated = [r for r in self.layers if r.sqnr_db is not None]
        return sorted(rated, key=lambda r: r.sqnr_db)[:k]

    def cache_counts(self) -> dict[str, int]:
        return {state: sum(r.cache == state for r in self.layers) for state in ("hit", "miss", "rebuilt")}

    def to_dict(self) -> dict[str, Any]:
        counts = self.cache_counts()
        return {
            "mode": self.mode,
            "bits": f"W{self.w_bits}A{self.a_bits}",
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "config": self.config,
            "layers_quantized": len(self.layers),
            "layers_skipped": list(self.skipped),
            "average_sqnr_db": _finite(self.average_sqnr_db),
            "worst_layers": [{"name": r.name, "sqnr_db": _finite(r.sqnr_db)} for r in self.worst_layers()],
            "cache_hits": counts["hit"],
            "cache_misses": counts["miss"],
            "cache_rebuilt": counts["rebuilt"],
            "seconds": round(self.seconds, 3),
            "layers": [r.to_dict() for r in self.layers],
        }

    def summary(self) -> str:
        avg = self.average_sqnr_db
        worst = ", ".join(f"{r.name} {r.sqnr_db:.1f} dB" for r in self.worst_layers(3))
        text = f"{self.mode} W{self.w_bits}A{self.a_bits}: {len(self.layers)} layers"
        text += f", average SQNR {avg:.1f} dB" if avg is not None else ""
        return text + (f", worst: {worst}" if worst else "")
