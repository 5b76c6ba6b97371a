"""The runner end to end on the real simulator: results, errors, interrupt + resume, no warm-up."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from libero_eval import Evaluation, RunFailed, build_run_config, compose
from libero_eval.results import TOP_LEVEL_KEYS
from policies.base import ObservationBatch, ObsMode, Policy, PolicyWrapper, file_sha256
from policies.embedded import DEFAULT_WEIGHTS
from policies.scripted_expert import ScriptedExpert

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "libero" / "main.py"
EPISODE_KEYS = {"suite", "task_id", "task", "episode", "init_state", "seed", "success", "steps", "wall_s",
                "policy_calls", "latency_ms", "error", "video"}  # fmt: skip


def make_run(overrides: list[str]):
    if not any(o.startswith("num_envs=") for o in overrides):  # in-process, so tests can count policy calls
        overrides = ["num_envs=1", *overrides]
    return build_run_config(compose(overrides), overrides)


def cli(*overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN), *overrides], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Recording(PolicyWrapper):
    """Passes through to a real policy and remembers every batch it was asked about."""

    def __init__(self, inner: Policy):
        super().__init__(inner)
        self.batches = []

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        self.batches.append(batch)
        return self.inner.predict(batch)


class StillPolicy(Policy):
    """Holds the arm still with the gripper open: every episode runs to max_steps and fails."""

    name, obs_mode, chunk_size = "still", ObsMode.STATE, 5

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        actions = np.zeros((len(batch), self.chunk_size, 7))
        actions[..., -1] = -1.0
        return actions


class NaNPolicy(StillPolicy):
    """Returns NaN actions for the episodes named in ``broken`` (all when None)."""

    name = "nan"

    def __init__(self, broken: set[str] | None = None):
        self.broken = broken

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        actions = super().predict(batch)
        rows = [i for i, eid in enumerate(batch.episode_ids) if self.broken is None or eid in self.broken]
        actions[rows] = np.nan
        return actions


def test_expert_solves_a_spatial_task_with_a_complete_results_file(tmp_path):
    cfg, resolved = make_run(["policy=scripted_expert", "tasks=[0]", "trials_per_task=2", f"results_dir={tmp_path}"])
    policy = Recording(ScriptedExpert())
    evaluation = Evaluation(cfg, resolved, policy=policy)
    path = evaluation.run()
    doc = json.loads(path.read_text())

    assert path.parent == tmp_path / "libero_spatial" and path.name.endswith("_scripted_expert_fp.json")
    assert set(TOP_LEVEL_KEYS) <= set(doc) and doc["status"] == "complete"
    assert all(EPISODE_KEYS <= set(ep) for ep in doc["episodes"])
    assert doc["overall"]["successes"] == sum(ep["success"] for ep in doc["episodes"]) >= 1
    assert doc["tasks"][0]["episodes"] == doc["overall"]["episodes"] == 2
    assert doc["protocol"]["max_steps"] == 220 and doc["protocol"]["num_steps_wait"] == 10
    assert doc["versions"]["mujoco"] and doc["config"]["suite"]["name"] == "libero_spatial"
    # No warm-up: the policy's first call is the first real observation, and every call is accounted for.
    first = policy.batches[0]
    assert first.episode_ids == ["libero_spatial/task0/ep0"] and first.steps == [0]
    assert len(policy.batches) == sum(ep["policy_calls"] for ep in doc["episodes"])


def test_an_episode_error_is_recorded_apart_and_the_run_goes_on(tmp_path):
    cfg, resolved = make_run(["tasks=[0]", "trials_per_task=3", "suite.max_steps=10", f"results_dir={tmp_path}"])
    evaluation = Evaluation(cfg, resolved, policy=NaNPolicy(broken={"libero_spatial/task0/ep1"}))
    doc = json.loads(evaluation.run().read_text())
    assert doc["status"] == "complete"
    assert doc["overall"] == {**doc["overall"], "episodes": 3, "evaluated": 2, "errored": 1, "successes": 0,
                              "success_rate": 0.0}  # fmt: skip
    assert doc["tasks"][0]["errored"] == 1 and doc["tasks"][0]["evaluated"] == 2
    assert [ep["error"] is not None for ep in doc["episodes"]] == [False, True, False]
    assert "non-finite action" in doc["episodes"][1]["error"]
    assert evaluation.errors.startswith("1 of 3 episodes errored")


def test_a_run_whose_episodes_all_error_is_failed(tmp_path):
    cfg, resolved = make_run(["tasks=[0]", "trials_per_task=2", "suite.max_steps=10", f"results_dir={tmp_path}"])
    evaluation = Evaluation(cfg, resolved, policy=NaNPolicy())
    with pytest.raises(RunFailed, match="every episode errored: 2 of 2 episodes errored.*non-finite action"):
        evaluation.run()
    doc = json.loads(evaluation.results_path.read_text())
    assert doc["status"] == "failed" and doc["overall"]["errored"] == 2 and doc["overall"]["success_rate"] is None


def test_cli_stops_a_policy_that_raises_on_every_call(tmp_path):
    """Damaged weights (every float NaN) in a real checkpoint: one line, exit 2, status failed after 3 episodes."""
    weights = tmp_path / "model.safetensors"
    data = bytearray(DEFAULT_WEIGHTS.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)
    weights.write_bytes(bytes(data))
    proc = cli("policy=embedded", f"policy.path={weights}", "tasks=[0,1]", "trials_per_task=5", "num_envs=1",
               "suite.max_steps=20", f"results_dir={tmp_path}", "progress=false")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: the first 3 episodes all raised PolicyOutputError: policy returned a non-finite")
    path = next((tmp_path / "libero_spatial").glob("*.json"))
    assert str(path) in lines[0]
    doc = json.loads(path.read_text())
    assert doc["status"] == "failed" and doc["overall"]["episodes"] == 3 and doc["overall"]["errored"] == 3


def refused_in_one_line(proc: subprocess.CompletedProcess, *parts: str) -> None:
    """Exit 2 with a single ``error:`` line on stderr holding every one of ``parts``, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(part in lines[0] for part in parts), lines[0]


def test_damaged_shipped_weights_are_refused_by_their_recipe_hash(tmp_path):
    """Bytes flipped in the tensor data (header intact) of a copy of the shipped weights, recipe.json beside them."""
    weights_dir = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS.parent, weights_dir)
    weights = weights_dir / DEFAULT_WEIGHTS.name
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 1000 : header + 1064] = bytes(b ^ 0xFF for b in data[header + 1000 : header + 1064])
    weights.write_bytes(bytes(data))
    recorded = json.loads((weights_dir / "recipe.json").read_text())["weights_sha256"]
    results = tmp_path / "results"
    proc = cli("policy=embedded", f"policy.path={weights_dir}", "tasks=[0]", "trials_per_task=1",
               f"results_dir={results}", timeout=120)  # fmt: skip
    refused_in_one_line(proc, str(weights), hashlib.sha256(bytes(data)).hexdigest(), recorded, "recipe.json")
    assert not results.exists()


def test_a_checkpoint_with_another_sha256_than_policy_sha256_is_refused(tmp_path):
    wrong = "ab" * 32
    proc = cli("policy=embedded", f"policy.sha256={wrong}", "tasks=[0]", "trials_per_task=1",
               f"results_dir={tmp_path}", timeout=120)  # fmt: skip
    refused_in_one_line(proc, str(DEFAULT_WEIGHTS), file_sha256(DEFAULT_WEIGHTS), wrong, "policy.sha256")
    assert not any(tmp_path.iterdir())


def test_the_expected_sha256_is_checked_and_recorded(tmp_path):
    sha256 = file_sha256(DEFAULT_WEIGHTS).upper()  # any case is accepted
    proc = cli("policy=embedded", f"policy.sha256={sha256}", "tasks=[0]", "trials_per_task=1", "suite.max_steps=5",
               "num_envs=1", "progress=false", f"results_dir={tmp_path}", timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(next((tmp_path / "libero_spatial").glob("*.json")).read_text())
    assert doc["config"]["policy"]["sha256"] == sha256
    assert doc["policy"]["weights_sha256"] == sha256.lower()


@pytest.mark.parametrize(
    "override, message",
    [
        ("suite=libero_nowhere", "libero_nowhere"),
        ("tasks=[10]", "out of range"),
        ("trials_per_task=51", "trials_per_task"),
        ("trials_per_task=0", "trials_per_task"),
        ("suite.max_steps=-5", "max_steps"),
        ("protocol.replan_steps=0", "replan_steps"),
        ("policy.name=nope", "not registered"),
        ("policy.tokenizer=/tok", "takes no tokenizer"),
        ("policy.compile=default", "takes no compile"),
        (f"policy.sha256={'0' * 64}", "takes no sha256"),  # the scripted expert has no weights to check
        ("abort_after_errors=-1", "abort_after_errors"),
        ("seed=-1", "seed must be in 0..4294967295"),
        ("quant.w_bits=9", "w_bits"),
        ("quant.w_bits=3", "quant.mode=fp quantizes nothing, yet asks for W3A16"),  # would run FP, recorded as W3
        # What Hydra itself refuses while composing, in one line too (it would print several and exit 1):
        ("quant=w5a8", "Could not find 'quant/w5a8'; available: fp, rtn_w4a16"),
        ("policy=nonsense", "available: embedded"),
        ("seed=abc", "could not be converted to Integer"),
        ("nonsense_key=1", "Key 'nonsense_key' not in 'RunConfig'"),
        ("quant=fp,w4a8", "sweep it with -m"),
        ("suite=[]", "suites lists no suite"),
        ("quant=[", "cannot parse the override 'quant=['"),
    ],
)
def test_bad_config_fails_early_and_writes_nothing(tmp_path, override, message):
    proc = cli("policy=scripted_expert", override, f"results_dir={tmp_path}", timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_sweep_value_that_does_not_compose_is_refused_before_any_job_runs(tmp_path):
    proc = cli("-m", "policy=scripted_expert", "quant=fp,w5a8", "tasks=[0]", "trials_per_task=1",
               f"results_dir={tmp_path}", timeout=60)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Could not find 'quant/w5a8'" in proc.stderr
    assert not any(tmp_path.iterdir())  # the fp job did not run first


def test_interrupt_leaves_valid_results_and_resume_finishes_without_duplicates(tmp_path):
    args = [sys.executable, str(MAIN), "policy=scripted_expert", "tasks=[0]", "trials_per_task=3", "suite.max_steps=40",
            f"results_dir={tmp_path}", "progress=false"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    jsonl = []
    while time.time() < deadline and not (jsonl and jsonl[0].read_text().strip()):
        time.sleep(0.5)
        jsonl = list((tmp_path / "libero_spatial").glob("*.jsonl")) if (tmp_path / "libero_spatial").exists() else []
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    path = jsonl[0].with_suffix(".json")
    doc = json.loads(path.read_text())
    assert doc["status"] == "interrupted" and 1 <= doc["overall"]["episodes"] < 3

    # What the run printed is the whole command: the config comes from the results file. From another directory,
    # by a relative path, in a job that Hydra moves into its own output dir.
    hint = f"resume={path}"
    assert hint in err
    resumed = subprocess.run([*args[:2], hint.replace(f"{tmp_path}/", ""), "hydra.job.chdir=true"],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(path.read_text())
    assert doc["status"] == "complete"
    assert sorted(ep["episode"] for ep in doc["episodes"]) == [0, 1, 2]
    assert len(path.with_suffix(".jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_different_config(tmp_path):
    cfg, resolved = make_run(["tasks=[0]", "trials_per_task=1", "suite.max_steps=5", f"results_dir={tmp_path}"])
    path = Evaluation(cfg, resolved, policy=StillPolicy()).run()
    proc = cli(f"resume={path}", "tasks=[0]", "trials_per_task=2", "suite.max_steps=5", f"results_dir={tmp_path}")
    assert proc.returncode == 2 and "trials_per_task" in proc.stderr


def test_video_is_written_per_episode(tmp_path):
    cfg, resolved = make_run(["tasks=[0]", "trials_per_task=1", "suite.max_steps=5", "video=true",
                              "protocol.camera_size=64", f"results_dir={tmp_path}"])  # fmt: skip
    doc = json.loads(Evaluation(cfg, resolved, policy=StillPolicy()).run().read_text())
    video = Path(doc["episodes"][0]["video"])
    assert video.name == "libero_spatial_task00_ep00_failure.mp4" and video.stat().st_size > 0


def test_rendering_failure_is_one_line(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "egl", "EGL_PLATFORM": "nonexistent", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, str(MAIN), "tasks=[0]", "trials_per_task=1", "video=true", f"results_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "offscreen rendering failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_results_dir_that_cannot_be_written_is_one_line(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    # /proc/1 refuses new files even to root (a chmod'ed folder would not stop root, as CI runs).
    for results_dir, message in ((a_file / "sub", "is a file"), ("/proc/1/results", "is not writable")):
        proc = cli("policy=scripted_expert", f"results_dir={results_dir}", timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
