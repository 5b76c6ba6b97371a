"""libero-eval-merge on real shards: the merge equals the unsharded run, and foreign shards are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from libero_eval.results import TOP_LEVEL_KEYS

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "libero" / "main.py"
MERGE = Path(sys.executable).with_name("libero-eval-merge")  # the console command the venv installed
EPISODE_FIELDS = (
    "suite",
    "task_id",
    "task",
    "episode",
    "init_state",
    "seed",
    "success",
    "steps",
    "policy_calls",
    "error",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One multirun: the unsharded evaluation of two tasks, and the same evaluation as shards 0/2 and 1/2."""
    tmp = tmp_path_factory.mktemp("shards")
    proc = subprocess.run(
        [sys.executable, str(MAIN), "-m", "policy=scripted_expert", "tasks=[0,1]", "trials_per_task=1", "num_envs=1",
         "progress=false", "shard=null,0/2,1/2", f"results_dir={tmp / 'res'}", f"hydra.sweep.dir={tmp / 'sweep'}"],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp / "sweep" / "index.json").read_text())
    return dict(zip(("full", "shard0", "shard1"), (Path(run["results"]) for run in index["runs"])))


def merge(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MERGE), *map(str, args)], capture_output=True, text=True, timeout=60)


def episodes(doc: dict) -> list[tuple]:
    return [tuple(ep[k] for k in EPISODE_FIELDS) for ep in doc["episodes"]]


def test_merged_shards_equal_the_unsharded_run(runs, tmp_path):
    out = tmp_path / "merged.json"
    proc = merge(runs["shard1"], runs["shard0"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    merged, full = json.loads(out.read_text()), json.loads(runs["full"].read_text())
    shard0 = json.loads(runs["shard0"].read_text())
    assert len(shard0["episodes"]) == 1 and merged["status"] == "complete" and set(TOP_LEVEL_KEYS) <= set(merged)
    assert episodes(merged) == episodes(full) and any(ep["success"] for ep in full["episodes"])
    for key in ("tasks", "overall", "config", "protocol"):
        assert merged[key] == full[key], key
    assert merged["timing"]["policy_latency_ms"]["n"] == sum(ep["policy_calls"] for ep in full["episodes"])
    assert [s["shard"] for s in merged["shards"]] == ["1/2", "0/2"] and merged["run_id"] == "merged"
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2


def test_a_partial_merge_is_not_complete(runs, tmp_path):
    proc = merge(runs["shard0"], "-o", tmp_path / "half.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "half.json").read_text())["status"] == "interrupted"
    again = merge(runs["shard0"], "-o", tmp_path / "half.json")
    assert again.returncode == 2 and "never overwritten" in again.stderr


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda doc: doc["config"].update(seed=8), "config differs in seed"),
        (lambda doc: doc["config"]["suite"].update(max_steps=100), "config differs in suite.max_steps"),
        (lambda doc: doc["versions"].update(mujoco="2.3.7"), "other simulator versions than"),
        (lambda doc: doc["episodes"].append(doc["episodes"][0] | {"task_id": 0}), "shards overlap"),
    ],
)
def test_refuses_what_is_not_one_run_cut_in_shards(runs, tmp_path, edit, message):
    doc = json.loads(runs["shard1"].read_text())
    edit(doc)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(doc))
    proc = merge(runs["shard0"], foreign, "-o", tmp_path / "merged.json")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "merged.json").exists()


def test_num_envs_and_results_dir_may_differ(runs, tmp_path):
    doc = json.loads(runs["shard1"].read_text())
    doc["config"].update(num_envs=4, results_dir="elsewhere", progress=True)
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    assert merge(runs["shard0"], moved, "-o", tmp_path / "merged.json").returncode == 0
