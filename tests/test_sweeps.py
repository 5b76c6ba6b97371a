"""Hydra multiruns end to end: one results file per run, the sweep index, and the joblib and submitit launchers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "libero" / "main.py"
# Physics only, one short episode per run: the sweep machinery is under test, not the policy.
TINY = [
    "policy=scripted_expert",
    "tasks=[0]",
    "trials_per_task=1",
    "suite.max_steps=20",
    "num_envs=1",
    "progress=false",
]


def sweep(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN), "-m", *TINY, *overrides], capture_output=True, text=True,
                          timeout=400, cwd=cwd)  # fmt: skip


def check_sweep(results_dir: Path, sweep_dir: Path, key: str, values: list[int]) -> None:
    """A sweep over ``key``: a results file per value, and an index pointing at each with its overrides and outcome."""
    docs = [json.loads(f.read_text()) for f in (results_dir / "libero_spatial").glob("*.json")]
    assert sorted(doc["config"][key] for doc in docs) == values and len({doc["run_id"] for doc in docs}) == len(values)
    assert all(doc["status"] == "complete" and doc["memory"]["peak_rss_mb"] > 0 for doc in docs)

    index = json.loads((sweep_dir / "index.json").read_text())
    assert [run["job"] for run in index["runs"]] == list(range(len(values)))
    for run in index["runs"]:
        doc = json.loads(Path(run["results"]).read_text())
        assert Path(run["results"]).parent == results_dir.resolve() / "libero_spatial"
        assert run["status"] == "complete" and f"{key}={doc['config'][key]}" in run["overrides"]
        assert (run["episodes"], run["successes"]) == (doc["overall"]["episodes"], doc["overall"]["successes"])
    table = (sweep_dir / "index.md").read_text()
    if len(values) > 1:  # a one-value override is no sweep axis
        assert index["swept"] == [key] and f"| job | {key} | status | success | results |" in table
        assert all(f"| {job} | {value} | complete | " in table for job, value in enumerate(values))


def test_multirun_writes_a_results_file_per_run_and_an_index(tmp_path):
    proc = sweep("seed=1,2", f"results_dir={tmp_path / 'res'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    check_sweep(tmp_path / "res", tmp_path / "sweep", "seed", [1, 2])


def test_joblib_runs_in_parallel_and_results_land_in_results_dir_whatever_the_job_cwd(tmp_path):
    # Relative paths from another directory, jobs that chdir into their own output dir, two runs that claim their
    # results names in the same second, and env worker processes started from inside a joblib (loky) worker.
    proc = sweep("num_envs=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.job.chdir=true",
                 "results_dir=res", "hydra.sweep.dir=sweep", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_sweep(tmp_path / "res", tmp_path / "sweep", "num_envs", [1, 2])
    assert not list((tmp_path / "sweep").glob("*/res"))


def test_submitit_local_sweep_produces_results(tmp_path):
    # submitit's local executor hides GPUs with CUDA_VISIBLE_DEVICES="", which the env must survive.
    proc = sweep("seed=3", "hydra/launcher=submitit_local", f"results_dir={tmp_path / 'res'}",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_sweep(tmp_path / "res", tmp_path / "sweep", "seed", [3])


def test_a_job_that_cannot_run_is_indexed_as_an_error_and_the_sweep_goes_on(tmp_path):
    proc = sweep("suite.max_steps=-5,5", f"results_dir={tmp_path / 'res'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0 and "max_steps" in proc.stderr
    failed, ran = json.loads((tmp_path / "sweep" / "index.json").read_text())["runs"]
    assert failed["status"] == "error" and "max_steps" in failed["error"] and "results" not in failed
    assert "suite.max_steps=-5" in failed["overrides"] and failed["finished_at"]
    assert ran["status"] == "complete" and Path(ran["results"]).is_file()
    assert "| 0 | -5 | error | - | RunError: " in (tmp_path / "sweep" / "index.md").read_text()
