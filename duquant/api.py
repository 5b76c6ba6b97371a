"""Entry point: swap selected linears for calibrating DuQuant layers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .calibrate import Calibration
from .config import QuantConfig
from .linear import DuQuantLinear
from .seeds import derive_seed
from .select import LayerSelection, select_layers
from .stats import ActivationStats


def quantize_(
    model: nn.Module,
    cfg: QuantConfig,
    selection: Optional[LayerSelection] = None,
    cache_dir: Optional[Path] = None,
) -> Calibration:
    """Replace the selected ``nn.Linear`` modules of ``model`` in place by calibrating ``DuQuantLinear``.

    Run the model on calibration inputs (every forward call of every layer is
    recorded), then call ``finish()`` on the returned handle to quantize.
    ``selection`` defaults to the config's include/exclude/layers. Layers
    whose resolved bits are 16/16 stay ``nn.Linear`` and are reported as
    skipped.
    """
    if cfg.mode == "fp":
        raise ValueError("mode=fp leaves the model in floating point; do not call quantize_ for it")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_ replaces submodules in place; wrap a bare nn.Linear in a container module")
    if selection is None:
        selection = LayerSelection(include=list(cfg.include), exclude=list(cfg.exclude), names=list(cfg.layers))
    layers: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, linear in select_layers(model, selection):
        bits = cfg.layer_bits(name)
        if bits.is_fp:
            skipped.append(name)
            continue
        problem = cfg.int_backend_problem(bits) if cfg.backend == "int" else None
        if problem:
            raise ValueError(f"{problem} (layer {name})")
        seed = derive_seed(cfg.seed, name, "sample")
        stats = ActivationStats(cfg.calib_max_tokens, seed, hessian=cfg.w_quantizer == "gptq")
        quantized = DuQuantLinear(linear, cfg.mode, bits, stats, cfg.backend)
        _replace(model, linear, quantized)
        layers.append((name, quantized))
    return Calibration(cfg, layers, skipped, cache_dir)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Point every reference to ``old`` (a module may be registered under several names) at ``new``."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)
