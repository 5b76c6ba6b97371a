"""A run as a crashing machine treats it: a disk that fills up mid-run, and what a run leaves where it was called."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "libero" / "main.py"
SLICE = ["policy=scripted_expert", "tasks=[0]", "suite.max_steps=20", "num_envs=1", "progress=false"]


def run(*overrides: str, cwd: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:  # no file may grow past the limit: writes fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, str(MAIN), *overrides], capture_output=True, text=True, timeout=300,
                          cwd=cwd, preexec_fn=limit_file_size if max_file_bytes else None)  # fmt: skip


def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes(tmp_path):
    res = tmp_path / "res"
    proc = run(*SLICE, "trials_per_task=4", f"results_dir={res}", cwd=tmp_path, max_file_bytes=6_000)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: cannot write ") and "File too large" in error[0] and "resume=" in error[0]
    path = Path(error[0].split("resume=")[1])
    assert not list(res.rglob("*.tmp")), "a half-written temp file was left"
    doc = json.loads(path.read_text())  # still the last complete version
    assert doc["status"] == "running" and doc["overall"]["episodes"] < 4

    resumed = run(f"resume={path}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(path.read_text())
    assert doc["status"] == "complete" and sorted(e["episode"] for e in doc["episodes"]) == [0, 1, 2, 3]


def test_a_rejected_run_writes_nothing_and_an_accepted_one_keeps_hydras_record_with_its_results(tmp_path):
    rejected = run(*SLICE, "seed=-1", f"results_dir={tmp_path / 'res'}", cwd=tmp_path)
    assert rejected.returncode == 2 and not any(tmp_path.iterdir())

    accepted = run(*SLICE, "trials_per_task=1", f"results_dir={tmp_path / 'res'}", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    path = Path(accepted.stdout.split("results: ")[1].split()[0])
    record = path.with_name(f"{path.stem}_hydra")
    assert "seed: 7" in (record / "config.yaml").read_text()
    assert "trials_per_task=1" in (record / "overrides.yaml").read_text()
