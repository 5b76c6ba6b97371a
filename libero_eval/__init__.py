"""Evaluate VLA policies on LIBERO in full precision and DuQuant-quantized.

The public API (what the commands, the tools in ``scripts/`` and the tests
use); names load on first use, so ``libero-eval-compare`` does not import the
simulator::

    from libero_eval import compose, build_run_config, Evaluation, quantizing
    from policies import make_policy

    cfg, resolved = build_run_config(compose(["quant=w4a8", "tasks=[0]"]))
    policy = quantizing(make_policy(**dataclasses.asdict(cfg.policy)), cfg.quant, cfg.results_dir)
    results_json = Evaluation(cfg, resolved, policy).run()
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compose": "configure", "build_run_config": "configure", "suite_runs": "configure",
    "RunConfig": "config", "QuantRunConfig": "config", "PolicyConfig": "config",
    "ConfigError": "errors", "fail": "errors",
    "Evaluation": "evaluate", "RunFailed": "evaluate",
    "EpisodePlan": "plan", "Job": "plan", "EpisodeInfo": "plan", "ResumeMismatch": "plan",
    "episode_id": "plan", "episode_seed": "plan",
    "CalibratingPolicy": "quantize", "quantizing": "quantize", "dry_run_report": "quantize",
    "Scheduler": "scheduler",
    "EnvSpec": "workers", "ProcessWorker": "workers", "Begin": "workers", "Execute": "workers",
    "LiberoEnv": "env", "load_task": "env",
    "Protocol": "rollout", "run_episode": "rollout", "begin": "rollout", "execute": "rollout",
    "ResultsError": "results", "read_results": "results", "versions": "results",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'libero_eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"libero_eval.{_EXPORTS[name]}"), name)
