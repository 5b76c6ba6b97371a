"""Evaluate a policy on LIBERO, optionally DuQuant-quantized: the Hydra entry point.

    python examples/libero/main.py policy=embedded quant=w4a8 suite=libero_spatial
    python examples/libero/main.py -m quant=fp,w4a8 suite=libero_spatial,libero_object
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from examples.libero.config import RunConfig, register_configs
from examples.libero.env import RenderingUnavailable
from examples.libero.evaluate import Evaluation, ResumeMismatch, RunFailed
from examples.libero.results import ResultsError, flatten_config, read_results

register_configs()
_ABSENT = object()


class RunError(Exception):
    """A job of a multirun that cannot run; Hydra records it as failed and goes on with the other jobs."""


def fail(message: str) -> None:
    """One line on stderr and exit 2; in a multirun job, an error Hydra records so the sweep goes on. Works
    outside ``@hydra.main`` too (the policy server)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # Exiting here would end the whole sweep and leave this job in the sweep index as still running.
        raise RunError(message) from None
    print(f"error: {message}", file=sys.stderr)
    # Half-built simulator objects complain from their destructors at exit; after the error that is noise.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(2)


def user_path(value: str | None) -> str | None:
    """A relative path against the directory the command ran in (a launcher or hydra.job.chdir may have moved
    this job); an address such as ``ws://host:port`` as given."""
    return value if value is None or "://" in value else to_absolute_path(value)


def adopt_interrupted_config(dcfg: DictConfig) -> None:
    """Give every key the command line leaves unset the interrupted run's value, so ``resume=FILE`` alone (what
    an interrupted run prints) continues it as configured; keys set on the command line must still match."""
    parser = OverridesParser.create()
    explicit = [o.key_or_group for o in parser.parse_overrides(list(HydraConfig.get().overrides.task))]
    recorded = read_results(Path(user_path(dcfg.resume))).get("config") or {}
    for key, value in flatten_config(recorded).items():
        if key == "resume" or any(key == k or key.startswith(f"{k}.") for k in explicit):
            continue
        if OmegaConf.select(dcfg, key, default=_ABSENT) is not _ABSENT:  # a key of an older schema is left out
            OmegaConf.update(dcfg, key, value, merge=False)


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before anything loads or is written, a folder that cannot be created or written into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{key}={folder} cannot be a results folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={folder} is not writable ({existing} refuses writes: read-only or not yours)")


def root_cause(exc: BaseException) -> BaseException:
    # OmegaConf wraps errors raised in __post_init__; the user needs the original sentence.
    while exc.__cause__ is not None and isinstance(exc, OmegaConfBaseException):
        exc = exc.__cause__
    return exc


@hydra.main(config_path="../../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> Path | None:
    if mp.get_start_method(allow_none=True) not in mp.get_all_start_methods():
        # A joblib launcher job runs in a loky worker whose default start method, "loky", is unknown to the env
        # worker processes it spawns (they would die at start-up): give them a standard one.
        mp.set_start_method("spawn", force=True)
    # Set-up errors (bad values, unknown names, a scope that matches nothing) are the user's to fix: one line.
    try:
        if dcfg.resume is not None:
            adopt_interrupted_config(dcfg)
        cfg: RunConfig = OmegaConf.to_object(dcfg)
        cfg.results_dir, cfg.resume = user_path(cfg.results_dir), user_path(cfg.resume)
        cfg.policy.path, cfg.policy.tokenizer = user_path(cfg.policy.path), user_path(cfg.policy.tokenizer)
        check_writable(Path(cfg.results_dir), "results_dir")
        evaluation = Evaluation(cfg, OmegaConf.to_container(dcfg, resolve=True))
        if cfg.quant.dry_run:
            lines = evaluation.dry_run()
            print("\n".join(lines))
            print(f"{len(lines)} layers would be quantized ({cfg.quant.mode}, scope={cfg.quant.scope})")
            return
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as exc:
        fail(str(root_cause(exc)).splitlines()[0])
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
    except (RenderingUnavailable, ResumeMismatch, ResultsError, FileNotFoundError) as exc:
        fail(str(exc))
    except RunFailed as exc:
        fail(f"{exc}; run marked failed in {evaluation.results_path}")
    print(f"results: {path}")
    if evaluation.errors is not None:
        print(f"warning: {evaluation.errors} (not counted as policy failures)", file=sys.stderr)
    if evaluation.status == "interrupted":
        print(f"interrupted: continue with resume={path}", file=sys.stderr)
        sys.exit(130)
    return path  # for the sweep index (examples/libero/sweep_index.py)


if __name__ == "__main__":
    main()
