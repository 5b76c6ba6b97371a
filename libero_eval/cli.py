"""``libero-eval``: evaluate a policy on LIBERO, optionally DuQuant-quantized (the Hydra entry point).

    libero-eval policy=embedded quant=w4a8 suite=libero_spatial
    libero-eval -m quant=fp,w4a8 suite=libero_spatial,libero_object
    libero-eval suite=libero_pro_spatial        # a group: the base suite and its perturbations, a run each
    libero-eval suite=[libero_goal,libero_goal_swap]
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from libero_eval.configure import build_run_config, check_overrides, register_schema, suite_overrides, suite_runs
from libero_eval.config import RunConfig
from libero_eval.env import RenderingUnavailable
from libero_eval.errors import ConfigError, fail, one_line
from libero_eval.evaluate import Evaluation, ResumeMismatch, RunFailed
from libero_eval.quantize import dry_run_report, quantizing
from libero_eval.results import ResultsError
from libero_eval.scheduler import EnvStartFailed
from policies import make_policy

register_schema("run_schema", RunConfig)


def save_hydra_files(dcfg: DictConfig, results_path: Path) -> None:
    """Hydra's record of the job (composed config, command-line overrides) beside the results it produced;
    Hydra itself writes nothing, so a rejected run leaves no trace."""
    folder = results_path.with_name(f"{results_path.stem}_hydra")
    folder.mkdir(exist_ok=True)
    OmegaConf.save(dcfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), folder / "overrides.yaml")


def main() -> None:
    """The command: overrides that do not compose (an unknown suite, option or key, a value of the wrong type) are
    refused in one line before Hydra starts (which would print its search path), and ``suite=[a,b]`` becomes
    ``suites=[a,b]``."""
    try:
        sys.argv[1:] = suite_overrides(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except ConfigError as exc:
        fail(str(exc))
    run()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def run(dcfg: DictConfig) -> Path | None:
    """One run, or for a multi-suite config (``suites``) one run per suite in order; returns the last results file."""
    if mp.get_start_method(allow_none=True) not in mp.get_all_start_methods():
        # A joblib launcher job runs in a loky worker whose default start method, "loky", is unknown to the env
        # worker processes it spawns (they would die at start-up): give them a standard one.
        mp.set_start_method("spawn", force=True)
    overrides = HydraConfig.get().overrides.task
    try:
        runs = suite_runs(dcfg, overrides)
        if len(runs) > 1 and dcfg.quant.save:
            raise ConfigError("quant.save saves one calibrated model, but each suite of a multi-suite run calibrates its "
                              "own: save from one suite's run, then run the suites with quant.load")  # fmt: skip
        for member in runs[1:]:  # every suite's config is checked before the first one runs
            build_run_config(copy.deepcopy(member), overrides)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as exc:
        fail(one_line(exc))
    path = None
    for i, member in enumerate(runs):
        if len(runs) > 1:
            print(f"suite {i + 1}/{len(runs)}: {member.suite.name}", flush=True)
        path = run_one(member, overrides)
        if path is None:  # a dry run lists the layers once
            break
    return path  # for the sweep index (libero_eval/sweep_index.py)


def run_one(dcfg: DictConfig, overrides) -> Path | None:
    """One suite's run: its results file, or None for a dry run. An interrupted run exits (130) saying how to resume
    it, which for a multi-suite run also starts the suites after it."""
    # Set-up errors (bad values, unknown names, a scope that matches nothing) are the user's to fix: one line.
    try:
        cfg, resolved = build_run_config(dcfg, overrides)
        policy = make_policy(**asdict(cfg.policy))
        if cfg.quant.dry_run:
            print(dry_run_report(policy, cfg.quant))
            return None
        evaluation = Evaluation(cfg, resolved, quantizing(policy, cfg.quant, cfg.results_dir))
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as exc:
        fail(one_line(exc))

    def request_stop(signum, frame) -> None:
        if evaluation.stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop right now
        evaluation.stop.set()

    # Ctrl-C or a scheduler's SIGTERM ends the run at the next step: results kept, resumable. Installed
    # explicitly because a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        path = evaluation.run()
    except (RenderingUnavailable, EnvStartFailed, ResumeMismatch, ResultsError, FileNotFoundError) as exc:
        fail(str(exc))
    except RunFailed as exc:
        fail(f"{exc}; run marked failed in {evaluation.results_path}")
    except OSError as exc:  # a full disk or a folder that stopped taking writes, mid-run
        kept = evaluation.results_path
        fail(f"cannot write {exc.filename}: {exc.strerror or exc}"
             + (f"; every episode recorded so far is kept: fix that, then resume={kept}" if kept else ""))  # fmt: skip
    save_hydra_files(dcfg, path)
    print(f"results: {path}")
    if evaluation.errors is not None:
        print(f"warning: {evaluation.errors} (not counted as policy failures)", file=sys.stderr)
    # A signal that came as the last episode ended leaves the run complete; it still ends a multi-suite run here.
    if evaluation.status == "interrupted" or evaluation.stop.is_set():
        print(f"interrupted: continue with resume={path}", file=sys.stderr)
        sys.exit(130)
    return path


if __name__ == "__main__":  # python -m libero_eval.cli
    main()
