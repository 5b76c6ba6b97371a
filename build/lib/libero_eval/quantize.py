"""Wires ``duquant`` into a run: layer selection from the policy's presets, and
calibration on the run's first real policy calls (no warm-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duquant import LayerSelection, quantize_, select_layers
from libero_eval.config import QuantRunConfig
from policies.base import ObservationBatch, Policy, PolicyWrapper

PACK_DIR = "duquant_packs"  # fitted transforms are cached in <results_dir>/duquant_packs


class QuantSetupError(ValueError):
    """The quant config cannot apply to this policy; the message says why."""


def layer_selection(policy: Policy, cfg: QuantRunConfig) -> LayerSelection:
    """The policy's ``scope`` preset, widened by ``include``/``layers`` and narrowed by ``exclude``."""
    presets = policy.scope_presets()
    if cfg.scope not in presets:
        raise QuantSetupError(
            f"quant.scope={cfg.scope!r} is not a preset of policy {policy.name!r}; available: {', '.join(presets) or 'none'}"
        )
    preset = presets[cfg.scope]
    return LayerSelection(
        include=[*preset.get("include", []), *cfg.include],
        exclude=[*preset.get("exclude", []), *cfg.exclude],
        names=list(cfg.layers),
    )


def dry_run_report(policy: Policy, cfg: QuantRunConfig) -> str:
    """The dry run's output: one line per layer the config would quantize, then a count."""
    lines = []
    for name, layer in select_layers(_module_of(policy), layer_selection(policy, cfg)):
        lines.append(f"{name}  [{layer.out_features} x {layer.in_features}]  {cfg.layer_bits(name).tag()}")
    return "\n".join([*lines, f"{len(lines)} layers would be quantized ({cfg.mode}, scope={cfg.scope})"])


def _module_of(policy: Policy):
    if policy.module is None:
        raise QuantSetupError(f"policy {policy.name!r} has no torch module to quantize; use quant=fp")
    return policy.module


def quantizing(policy: Policy, cfg: QuantRunConfig, results_dir: str | Path) -> Policy:
    """The policy a run or a server calls: ``policy`` itself at ``quant=fp``, else a :class:`CalibratingPolicy`
    whose packs are cached under ``results_dir``."""
    if cfg.mode == "fp":
        return policy
    return CalibratingPolicy(policy, cfg, Path(results_dir) / PACK_DIR)


class CalibratingPolicy(PolicyWrapper):
    """Runs the first ``calib_steps`` calls in full precision while every selected
    layer records statistics, then quantizes; every later call is quantized."""

    def __init__(self, policy: Policy, cfg: QuantRunConfig, cache_dir: Path | None):
        super().__init__(policy)
        self.cfg = cfg
        self._calibration = quantize_(_module_of(policy), cfg.method(), layer_selection(policy, cfg), cache_dir=cache_dir)
        self.calls_seen = 0
        self.calibration_calls: list[dict] = []  # which episode/step each FP calibration call served
        self.report: dict | None = None

    @property
    def calibrated(self) -> bool:
        return self.report is not None

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        actions = self.inner.predict(batch)
        if not self.calibrated:
            self.calls_seen += 1
            self.calibration_calls.extend(
                {"episode_id": eid, "step": step} for eid, step in zip(batch.episode_ids, batch.steps)
            )
            if self.calls_seen >= self.cfg.calib_steps:
                self.report = self._calibration.finish().to_dict()
        return actions

    def calibration_record(self) -> dict:
        episodes = list(dict.fromkeys(c["episode_id"] for c in self.calibration_calls))
        return {"calib_steps": self.cfg.calib_steps, "complete": self.calibrated, "episodes": episodes,
                "calls": self.calibration_calls}  # fmt: skip
