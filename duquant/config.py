"""Quantization settings of the library, usable as a Hydra structured config.

Only Hydra-friendly field types are used. The library never mutates a config;
defaults that depend on bit width (clip ratios, symmetry) are resolved by
methods, so a config printed from a run shows exactly what the user chose.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

MODES = ("fp", "rtn", "smoothquant", "duquant")
ROTATIONS = ("greedy", "svd", "hadamard", "none")
PERMUTES = ("zigzag", "none")
ACT_SCALES = ("dynamic", "static")
ROW_ROTATIONS = ("none", "restore")
W_QUANTIZERS = ("minmax", "mse", "gptq")
BACKENDS = ("fake", "int")
W_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
A_BITS = (4, 8, 16)
OFF = 16  # a bit width of 16 means "leave this tensor in floating point"


def _choices(values: tuple) -> str:
    return " | ".join(str(v) for v in values)


def _check_bits(name: str, value: Any, allowed: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        spec = "2..8 or 16" if allowed == W_BITS else _choices(allowed)
        raise ValueError(f"{name} must be {spec}, got {value!r}")


@dataclass
class LayerOverride:
    """Bit widths for the layers whose qualified name matches ``pattern`` (``re.search``)."""

    pattern: str = ""
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None


@dataclass(frozen=True)
class LayerBits:
    """Resolved quantizer settings of one layer (after overrides and bit-width defaults)."""

    w_bits: int
    a_bits: int
    w_sym: bool
    w_clip: float
    a_sym: bool
    a_clip: float
    w_quantizer: str
    gptq_damp: float

    @property
    def is_fp(self) -> bool:
        return self.w_bits == OFF and self.a_bits == OFF

    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


@dataclass
class QuantConfig:
    """What to quantize and how; see ``conf/quant/*.yaml`` for the shipped presets.

    ``mode`` picks the method: ``fp`` (nothing), ``rtn`` (round-to-nearest, no
    transform), ``smoothquant`` (smoothing only) or ``duquant`` (smoothing,
    rotation, zigzag permutation, rotation). Every other knob only refines it.
    """

    mode: str = "duquant"
    w_bits: int = 4
    a_bits: int = 8
    block_size: int = 128
    rotation: str = "greedy"
    rotation_steps: int = 256
    # Stop the greedy search once this many steps in a row found no lower peak (0: run all rotation_steps).
    rotation_patience: int = 16
    per_block_rotation: bool = False
    permute: str = "zigzag"
    smooth_alpha: float = 0.6
    w_sym: Optional[bool] = None
    w_clip: Optional[float] = None
    a_sym: bool = False
    a_clip: Optional[float] = None
    act_scales: str = "dynamic"
    act_percentile: float = 99.9
    row_rotation: str = "none"
    # How weights are rounded to their per-output-channel grid, in every mode: see duquant/weights.py.
    w_quantizer: str = "minmax"
    # GPTQ's Hessian damping, as a fraction of the mean diagonal.
    gptq_damp: float = 0.01
    # How quantized layers compute: fake (quantize-dequantize in floating point, the reference) or int
    # (integer codes and integer matmuls, duquant/kernels.py); the same quantized model either way.
    backend: str = "fake"
    # Input rows sampled per layer for fitting the rotations; the greedy search costs rows x steps x b^2.
    calib_max_tokens: int = 512
    seed: int = 0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    overrides: list[LayerOverride] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.overrides = [o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in self.overrides]
        self._check_choice("mode", MODES)
        self._check_choice("rotation", ROTATIONS)
        self._check_choice("permute", PERMUTES)
        self._check_choice("act_scales", ACT_SCALES)
        self._check_choice("row_rotation", ROW_ROTATIONS)
        self._check_choice("w_quantizer", W_QUANTIZERS)
        self._check_choice("backend", BACKENDS)
        _check_bits("w_bits", self.w_bits, W_BITS)
        _check_bits("a_bits", self.a_bits, A_BITS)
        self._check_int("block_size", 2)
        self._check_int("rotation_steps", 0)
        self._check_int("rotation_patience", 0)
        self._check_int("calib_max_tokens", 1)
        self._check_int("seed", 0)
        if self.rotation == "hadamard" and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two with rotation=hadamard, got {self.block_size}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1] (0 = off), got {self.smooth_alpha}")
        for name in ("w_clip", "a_clip"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or null (bit-width default), got {value}")
        if not 0.0 < self.gptq_damp <= 1.0:
            raise ValueError(f"gptq_damp must be in (0, 1], got {self.gptq_damp}")
        if not 0.0 < self.act_percentile <= 100.0:
            raise ValueError(f"act_percentile must be in (0, 100], got {self.act_percentile}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                _check_regex(f"{name}", pattern)
        for i, o in enumerate(self.overrides):
            _check_regex(f"overrides[{i}].pattern", o.pattern)
            if o.w_bits is not None:
                _check_bits(f"overrides[{i}].w_bits", o.w_bits, W_BITS)
            if o.a_bits is not None:
                _check_bits(f"overrides[{i}].a_bits", o.a_bits, A_BITS)

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {_choices(allowed)}, got {value!r}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.quant)``), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"quant has no field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The library's fields only (an application may extend the class with settings of its own)."""
        return {f.name: dataclasses.asdict(self)[f.name] for f in dataclasses.fields(QuantConfig)}

    def tag(self) -> str:
        """Short name of the setting for file names and tables: ``fp``, e.g. ``duquant_w4a8``, or with a weight
        quantizer other than the default ``duquant_w4a8_gptq`` (so tables tell those runs apart)."""
        if self.mode == "fp":
            return "fp"
        weights = "" if self.w_quantizer == "minmax" else f"_{self.w_quantizer}"
        return f"{self.mode}_w{self.w_bits}a{self.a_bits}{weights}"

    def layer_bits(self, name: str) -> LayerBits:
        """Bit widths and quantizer settings for the layer called ``name``.

        Overrides apply in order, so a later matching override wins. Defaults
        follow DuQuant: asymmetric weights at 4 bits and below, weight clip 0.8
        at <= 4 bits, activation clip 0.9 at 4 bits, no clipping at 8 bits.
        """
        w_bits, a_bits = self.w_bits, self.a_bits
        for o in self.overrides:
            if re.search(o.pattern, name):
                w_bits = o.w_bits if o.w_bits is not None else w_bits
                a_bits = o.a_bits if o.a_bits is not None else a_bits
        return LayerBits(
            w_bits=w_bits,
            a_bits=a_bits,
            w_sym=self.w_sym if self.w_sym is not None else w_bits > 4,
            w_clip=self.w_clip if self.w_clip is not None else (0.8 if w_bits <= 4 else 1.0),
            a_sym=self.a_sym,
            a_clip=self.a_clip if self.a_clip is not None else (0.9 if a_bits <= 4 else 1.0),
            w_quantizer=self.w_quantizer,
            gptq_damp=self.gptq_damp,
        )

    def int_backend_problem(self, bits: LayerBits) -> Optional[str]:
        """Why ``backend=int`` cannot run a layer with ``bits`` (None when it can)."""
        supported = "supported: weights of 2-7 bits, or 8 bits symmetric, with per-token A4/A8 or A16"
        if bits.w_bits >= 16:
            reason = f"{bits.tag()} keeps the weight in floating point"
        elif bits.w_bits == 8 and not bits.w_sym and bits.a_bits < 16:
            reason = "asymmetric 8-bit weights have codes minus zero point outside int8 (set w_sym=true)"
        elif self.act_scales == "static" and bits.a_bits < 16:
            reason = "act_scales=static quantizes activations per channel, which no integer GEMM rescales"
        elif self.row_rotation != "none":
            reason = f"row_rotation={self.row_rotation} leaves the weight off its integer grid"
        else:
            return None
        return f"backend=int cannot run {bits.tag()} here: {reason}; {supported}, or use backend=fake"

    @property
    def smooths(self) -> bool:
        return self.mode in ("smoothquant", "duquant") and self.smooth_alpha > 0

    @property
    def rotates(self) -> bool:
        return self.mode == "duquant" and self.rotation != "none"

    @property
    def permutes(self) -> bool:
        return self.mode == "duquant" and self.permute != "none"


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name} is not a valid regular expression: {pattern!r} ({err})") from None
