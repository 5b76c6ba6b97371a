"""Calibration handle: turns recorded statistics into quantized layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .linear import DuQuantLinear
from .pack import PackStore, pack_key
from .report import LayerReport, QuantReport, sqnr_db
from .transform import Transform, fit_transform


class Calibration:
    """Returned by :func:`duquant.quantize_`; the selected layers record statistics until :meth:`finish`.

    ``layers`` holds the (name, module) pairs being calibrated; in a dry run
    they are the untouched ``nn.Linear`` modules.
    """

    def __init__(
        self,
        cfg: QuantConfig,
        layers: list[tuple[str, nn.Module]],
        skipped: list[str],
        cache_dir: Optional[Path] = None,
    ):
        self.cfg = cfg
        self.layers = layers
        self.skipped = skipped
        self.store = PackStore(cache_dir) if cache_dir is not None else None
        self.finished = False

    @property
    def needs_inputs(self) -> bool:
        """Whether fitting needs activations (anything beyond plain RTN with dynamic scales and no GPTQ)."""
        cfg = self.cfg
        return cfg.smooths or cfg.rotates or cfg.act_scales == "static" or cfg.w_quantizer == "gptq"

    def finish(self) -> QuantReport:
        """Fit (or load) every transform, quantize every weight once and switch layers to QUANTIZED."""
        if self.finished:
            raise RuntimeError("Calibration.finish() was already called")
        start = time.perf_counter()
        cfg = self.cfg
        report = QuantReport(cfg.mode, cfg.w_bits, cfg.a_bits, cfg.to_dict(), skipped=self.skipped)
        self._check_inputs()
        # Buffers built here must be ordinary tensors even if the caller runs under inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            report.layers = [self._finish_layer(name, layer) for name, layer in self.layers]
        self.finished = True
        report.seconds = time.perf_counter() - start
        return report

    def _check_inputs(self) -> None:
        if not self.needs_inputs:
            return
        idle = [name for name, layer in self.layers if layer.stats.calls == 0]
        if idle:
            shown = ", ".join(idle[:5]) + (" ..." if len(idle) > 5 else "")
            raise ValueError(
                f"{len(idle)} selected layer(s) saw no calibration input ({shown}): "
                f"run the model during calibration or exclude them"
            )

    def _finish_layer(self, name: str, layer: DuQuantLinear) -> LayerReport:
        stats, bits = layer.stats, layer.bits
        sample = stats.sample
        x = None if sample is None else sample.float()
        bias = None if layer.bias is None else layer.bias.float()
        reference = None if x is None else F.linear(x, layer.weight.float(), bias)
        transform, cache = self._transform(name, layer)
        calls, rows = stats.calls, stats.rows_seen
        layer.quantize(transform)
        row = LayerReport(name, (layer.out_features, layer.in_features), bits.w_bits, bits.a_bits, transform.block)
        row.calib_calls, row.calib_rows, row.cache = calls, rows, cache
        if x is not None:
            row.sqnr_db = sqnr_db(reference, layer(x.to(layer.compute_dtype)))
            row.act_max_before = x.abs().max().item()
            row.act_max_after = transform.activations(x).abs().max().item()
        return row

    def _transform(self, name: str, layer: DuQuantLinear) -> tuple[Transform, str]:
        """The layer's transform and where it came from: off (no cache), hit, miss or rebuilt."""
        if self.store is None:
            return self._fit(layer), "off"
        key = pack_key(name, self.cfg, layer.bits, layer.weight, layer.stats)
        transform, cache = self.store.load_or_rebuild(name, key, layer.in_features, layer.weight.device)
        if transform is None:
            transform = self._fit(layer)
            self.store.save(name, key, transform)
        return transform, cache

    def _fit(self, layer: DuQuantLinear) -> Transform:
        return fit_transform(self.cfg, layer.bits, layer.weight, layer.stats.channel_max, layer.stats.sample)
