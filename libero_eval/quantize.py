"""Wires ``duquant`` into a run: layer selection from the policy's presets, and
calibration on the run's first real policy calls (no warm-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duquant import DuQuantLinear, LayerSelection, QuantizedCheckpointError, quantize_, read_metadata, save_quantized
from duquant import load_quantized, select_layers
from duquant.checkpoint import FILE_NAME
from libero_eval.config import QuantRunConfig
from policies.base import ObservationBatch, Policy, PolicyWrapper, file_sha256, recorded_weights_sha256

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
    if cfg.mode == "fp":
        return "0 layers would be quantized (quant=fp keeps the policy in full precision)"
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
    whose packs are cached under ``results_dir`` (or that loads ``quant.load`` and needs no calibration)."""
    if cfg.mode == "fp":
        return policy
    if cfg.save and (Path(cfg.save) / FILE_NAME).exists():
        raise QuantSetupError(f"quant.save={cfg.save} already holds a saved quantized model: choose a new directory")
    return CalibratingPolicy(policy, cfg, Path(results_dir) / PACK_DIR)


def saved_identity(policy: Policy, cfg: QuantRunConfig) -> dict:
    """What a saved quantized model must match to be loaded: the policy, its weights and the quant method."""
    method = {k: v for k, v in cfg.method().to_dict().items() if k != "backend"}  # either backend runs the codes
    return {"policy": policy.name, "weights_sha256": recorded_weights_sha256(policy.checkpoint, policy.describe()),
            "quant": method}  # fmt: skip


class CalibratingPolicy(PolicyWrapper):
    """Runs the first ``calib_steps`` calls in full precision while every selected
    layer records statistics, then quantizes; every later call is quantized.

    With ``quant.load`` it loads a saved quantized model instead and is
    calibrated from its first call; with ``quant.save`` it saves the model
    once calibration finishes.
    """

    def __init__(self, policy: Policy, cfg: QuantRunConfig, cache_dir: Path | None):
        super().__init__(policy)
        self.cfg = cfg
        self.calls_seen = 0
        self.calibration_calls: list[dict] = []  # which episode/step each FP calibration call served
        self.report: dict | None = None
        if cfg.load:
            self._calibration = None
            self.report = self._load(cfg.load)
        else:
            selection = layer_selection(policy, cfg)
            self._calibration = quantize_(_module_of(policy), cfg.method(), selection, cache_dir=cache_dir)

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
                report = self._calibration.finish().to_dict()
                if self.cfg.save:
                    report["saved_to"] = self._save(self.cfg.save)
                self.report = report
        return actions

    def _save(self, directory: str) -> dict:
        identity = {**saved_identity(self.inner, self.cfg), "calibration": self.calibration_calls}
        path = save_quantized(_module_of(self.inner), directory, identity)
        return {"path": str(path), "sha256": file_sha256(path)}

    def _load(self, directory: str) -> dict:
        module = _module_of(self.inner)
        try:
            saved = read_metadata(directory)
            mismatch = _mismatch(saved, saved_identity(self.inner, self.cfg))
            if mismatch:
                raise QuantSetupError(f"quant.load={directory} was saved from {mismatch}: it does not fit this run")
            load_quantized(module, directory, self.cfg.backend)
        except QuantizedCheckpointError as err:
            raise QuantSetupError(f"quant.load: {err}") from None
        path = Path(directory) / FILE_NAME
        layers = sum(isinstance(m, DuQuantLinear) for m in module.modules())
        return {"loaded_from": {"path": str(path), "sha256": file_sha256(path)}, "layers_quantized": layers,
                "backend": self.cfg.backend}  # fmt: skip

    def calibration_record(self) -> dict:
        episodes = list(dict.fromkeys(c["episode_id"] for c in self.calibration_calls))
        return {"calib_steps": 0 if self.cfg.load else self.cfg.calib_steps, "complete": self.calibrated,
                "episodes": episodes, "calls": self.calibration_calls}  # fmt: skip


def _mismatch(saved: dict, wanted: dict) -> str | None:
    """The first difference between a saved model's identity and this run's, in words (None: it fits)."""
    if saved.get("policy") != wanted["policy"]:
        return f"policy {saved.get('policy')!r}, not {wanted['policy']!r}"
    if saved.get("weights_sha256") != wanted["weights_sha256"]:
        return f"other weights (sha256 {str(saved.get('weights_sha256'))[:12]}..., these are {str(wanted['weights_sha256'])[:12]}...)"
    theirs, ours = saved.get("quant") or {}, wanted["quant"]
    differ = [f"quant.{k}={theirs.get(k)!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
    return "another quant config: " + ", ".join(differ) if differ else None
