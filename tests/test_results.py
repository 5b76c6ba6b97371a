"""The results file: naming, counts, Wilson intervals, JSONL as source of truth."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from libero_eval.results import TOP_LEVEL_KEYS, ResultsFile, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def record(task_id, episode, success, task="pick"):
    return {"suite": "libero_spatial", "task_id": task_id, "task": task, "episode": episode, "init_state": episode,
            "seed": 1, "success": success, "steps": 10, "wall_s": 1.0, "policy_calls": 2, "latency_ms": 3.0,
            "error": None, "video": None, "call_latencies_ms": [2.0, 4.0], "env_step_ms": [1.0]}  # fmt: skip


def test_wilson_matches_the_textbook_formula():
    k, n, z = 7, 10, stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert wilson_interval(k, n) == pytest.approx([centre - half, centre + half])
    assert wilson_interval(0, 0) is None


def test_names_never_collide_and_counts_add_up(tmp_path):
    a = ResultsFile.create(tmp_path, "libero_spatial", "p", "fp", {})
    b = ResultsFile.create(tmp_path, "libero_spatial", "p", "fp", {})
    assert a.json_path != b.json_path and a.json_path.parent == tmp_path / "libero_spatial"
    for rec in [record(0, 0, True), record(0, 1, False), record(1, 0, True)]:
        a.append(rec)
    a.write("complete")
    doc = json.loads(a.json_path.read_text())
    assert set(TOP_LEVEL_KEYS) <= set(doc)
    assert doc["status"] == "complete" and doc["run_id"] == a.json_path.stem
    assert doc["overall"]["episodes"] == 3 and doc["overall"]["successes"] == 2
    assert [(t["task_id"], t["episodes"], t["successes"]) for t in doc["tasks"]] == [(0, 2, 1), (1, 1, 1)]
    assert doc["timing"]["policy_latency_ms"]["n"] == 6
    assert len(a.jsonl_path.read_text().splitlines()) == 3


def test_reload_keeps_the_latest_record_and_survives_a_torn_line(tmp_path):
    a = ResultsFile.create(tmp_path, "libero_spatial", "p", "fp", {"config": {"x": 1}})
    a.append(record(0, 0, False))
    a.append({**record(0, 0, True), "rescored": True})
    with a.jsonl_path.open("a") as f:
        f.write('{"suite": "libero_spat')  # killed mid-write
    again = ResultsFile.load(a.json_path)
    assert again.done() == {(0, 0)} and again.episodes[0]["success"] is True
    assert again.header["config"] == {"x": 1}
    again.append(record(1, 0, True))
    assert ResultsFile.load(a.json_path).done() == {(0, 0), (1, 0)}


def test_a_last_record_without_its_newline_is_kept_and_ended(tmp_path):
    """A crash between a record and its newline: the record is complete, and the next one must not join its line."""
    a = ResultsFile.create(tmp_path, "libero_spatial", "p", "fp", {"config": {"x": 1}})
    a.append(record(0, 0, False))
    a.append(record(0, 1, True))
    a.jsonl_path.write_text(a.jsonl_path.read_text().rstrip("\n"))
    again = ResultsFile.load(a.json_path)
    assert again.done() == {(0, 0), (0, 1)}
    again.append(record(0, 2, True))
    assert ResultsFile.load(a.json_path).done() == {(0, 0), (0, 1), (0, 2)}
    assert len(a.jsonl_path.read_text().splitlines()) == 3


def test_a_resume_file_of_random_bytes_is_named(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(bytes(range(128, 256)) * 4)
    proc = subprocess.run([sys.executable, str(ROOT / "examples/libero/main.py"), f"resume={path}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_a_key_added_after_a_file_was_written_differs_only_when_not_its_default():
    """A results file from before quant.backend, quant.load/save or suites existed still resumes and merges with
    them at their defaults, and not with another value."""
    from libero_eval.config import recorded_defaults
    from libero_eval.results import config_differences

    old = {"seed": 7, "quant": {"mode": "duquant", "w_bits": 4}}
    new = {"seed": 7, "suites": None, "quant": {"mode": "duquant", "w_bits": 4, "backend": "fake", "load": None}}
    assert config_differences(old, new, defaults=recorded_defaults()) == []
    assert config_differences(new, old, defaults=recorded_defaults()) == []
    changed = {**new, "quant": {**new["quant"], "backend": "int"}}
    assert config_differences(old, changed, defaults=recorded_defaults()) == ["quant.backend"]
    assert config_differences(old, new) == ["quant.backend", "quant.load", "suites"]  # without defaults: as before
