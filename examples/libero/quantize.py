"""Wires ``duquant`` into a run: layer selection from the policy's presets, and
calibration on the run's first real policy calls (no warm-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duquant import LayerSelection, QuantConfig, quantize_, select_layers
from policies.base import ObservationBatch, Policy


class QuantSetupError(ValueError):
    """The quant config cannot apply to this policy; the message says why."""


def layer_selection(policy: Policy, cfg: QuantConfig) -> LayerSelection:
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


def describe_layers(policy: Policy, cfg: QuantConfig) -> list[str]:
    """One line per layer the config would quantize (the dry run's output)."""
    module = _module_of(policy)
    lines = []
    for name, layer in select_layers(module, layer_selection(policy, cfg)):
        lines.append(f"{name}  [{layer.out_features} x {layer.in_features}]  {cfg.layer_bits(name).tag()}")
    return lines


def _module_of(policy: Policy):
    if policy.module is None:
        raise QuantSetupError(f"policy {policy.name!r} has no torch module to quantize; use quant=fp")
    return policy.module


class CalibratingPolicy(Policy):
    """Runs the first ``calib_steps`` calls in full precision while every selected
    layer records statistics, then quantizes; every later call is quantized."""

    def __init__(self, policy: Policy, cfg: QuantConfig, cache_dir: Path | None):
        self.inner = policy
        self.name, self.obs_mode, self.chunk_size = policy.name, policy.obs_mode, policy.chunk_size
        self.cfg = cfg
        self._calibration = quantize_(_module_of(policy), cfg, layer_selection(policy, cfg), cache_dir=cache_dir)
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

    def reset(self) -> None:
        self.inner.reset()

    @property
    def module(self):
        return self.inner.module

    @property
    def checkpoint(self):
        return self.inner.checkpoint

    def describe(self) -> dict:
        return self.inner.describe()

    def calibration_record(self) -> dict:
        episodes = list(dict.fromkeys(c["episode_id"] for c in self.calibration_calls))
        return {"calib_steps": self.cfg.calib_steps, "complete": self.calibrated, "episodes": episodes,
                "calls": self.calibration_calls}  # fmt: skip
