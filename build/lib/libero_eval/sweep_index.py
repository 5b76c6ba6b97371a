"""The index of a Hydra multirun: which runs the sweep made, with what overrides, and how each went.

A Hydra callback (``hydra.callbacks.sweep_index`` in ``conf/config.yaml``). Each run is entered when it starts
and updated when it ends, in ``index.json`` and ``index.md`` in the sweep directory, so a sweep cut short still
lists what it ran. Callbacks run inside each job's process (a joblib worker, a submitit job), so every update
is a read-modify-write under a file lock, and the files are replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from libero_eval.results import ResultsError, now_iso, read_results, write_atomic

INDEX_JSON, INDEX_MD, LOCK = "index.json", "index.md", ".index.lock"


def sweep_dir(config: DictConfig) -> Path:
    # Relative sweep dirs are relative to where the command ran, which a job may have left (hydra.job.chdir).
    return Path(config.hydra.runtime.cwd) / str(config.hydra.sweep.dir)


def is_multirun(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN


@contextmanager
def locked_index(folder: Path) -> Iterator[dict]:
    """The sweep's index document, written back (JSON and markdown) when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / INDEX_JSON
        index = json.loads(path.read_text()) if path.is_file() else {"sweep_dir": str(folder), "swept": [], "runs": []}
        yield index
        index["runs"].sort(key=lambda run: run["job"])
        write_atomic(path, json.dumps(index, indent=1))
        write_atomic(folder / INDEX_MD, markdown_table(index))


def run_outcome(job_return: JobReturn) -> dict:
    """Status and success of a finished job, read from its results file (the run's own record)."""
    try:
        path = job_return.return_value  # re-raises the job's exception when it failed
    except Exception as exc:  # whatever the job raised, as Hydra caught it
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    if path is None:  # quant.dry_run: nothing was evaluated
        return {"status": "no results"}
    try:
        doc = read_results(path)
    except ResultsError as exc:
        return {"status": "error", "results": str(path), "error": str(exc)}
    overall = doc["overall"]
    return {"status": doc["status"], "results": str(path), "episodes": overall["episodes"],
            "evaluated": overall.get("evaluated", overall["episodes"]), "errored": overall.get("errored", 0),
            "successes": overall["successes"], "success_rate": overall["success_rate"]}  # fmt: skip


def override_values(overrides: list[str]) -> dict[str, str]:
    """``key=value`` of a job's overrides, keyed as the user wrote them (``quant``, ``suite.max_steps``)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.get_value_element_as_str() for o in parsed if not o.is_delete()}


def markdown_table(index: dict) -> str:
    """One row per run, one column per swept key."""
    swept = index["swept"]
    lines = [f"# Sweep {index['sweep_dir']}", "", "| job | " + " | ".join(swept) + " | status | success | results |",
             "| --- | " + "--- | " * len(swept) + "--- | --- | --- |"]  # fmt: skip
    for run in index["runs"]:
        values = override_values(run["overrides"])
        success = f"{run['successes']}/{run['evaluated']} ({run['success_rate']:.1%})" if run.get("evaluated") else "-"
        if run.get("errored"):
            success += f", {run['errored']} errored"
        cells = [str(run["job"]), *(values.get(key, "") for key in swept), run["status"], success,
                 run.get("results") or run.get("error") or "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SweepIndex(Callback):
    """Keeps ``index.json`` / ``index.md`` in the sweep directory of a multirun; does nothing in a single run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = OmegaConf.to_container(config.hydra.overrides.task)
        swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]
        with locked_index(sweep_dir(config)) as index:
            index.update(started_at=now_iso(), overrides=overrides, swept=swept)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_multirun(config):
            self._started_at = now_iso()  # start and end of a job run in the same process, on this object
            self._put(config, {"status": "running", "started_at": self._started_at})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if is_multirun(config):
            self._put(config, {"started_at": self._started_at, "finished_at": now_iso(), **run_outcome(job_return)})

    def _put(self, config: DictConfig, fields: dict) -> None:
        job = config.hydra.job
        entry = {"job": job.num, "overrides": list(config.hydra.overrides.task),
                 "output_dir": config.hydra.runtime.output_dir, **fields}  # fmt: skip
        with locked_index(sweep_dir(config)) as index:
            index["runs"] = [run for run in index["runs"] if run["job"] != job.num] + [entry]
