"""Simulator workers with batched policy calls, on the real simulator and real processes."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_runner import MAIN, ROOT, Recording, cli, make_run

from libero_eval import EpisodePlan, Evaluation, episode_id
from libero_eval.rollout import EpisodeState, Protocol, ask
from policies.base import ObservationBatch, PolicyWrapper, collate
from policies.scripted_expert import ScriptedExpert

SLICE = ["policy=scripted_expert", "suite=libero_spatial", "protocol.reset=soft", "progress=false"]


def observation(k: int, x: float) -> dict:
    poses = np.zeros((k, 7), np.float32)
    poses[:, :3] = [[x + 0.05 * i, 0.1, 0.9] for i in range(k)]
    poses[:, 6] = 1.0  # identity quaternion, xyzw
    state = np.array([-0.2, 0.0, 1.17, np.pi, 0.0, 0.0, 0.04, -0.04], np.float32)
    return {"state": state, "object_poses": poses, "object_names": [f"akita_black_bowl_{i + 1}" for i in range(k)]}


def test_one_call_per_object_count_and_rows_keep_their_episode():
    episodes = [EpisodeState(f"e{i}", i, "put the bowl on the plate", Protocol()) for i in range(3)]
    for episode, (k, x) in zip(episodes, [(1, 0.0), (2, 0.1), (1, 0.2)]):
        episode.obs = observation(k, x)
    policy = Recording(ScriptedExpert())
    planned = ask(policy, episodes)

    assert [b.episode_ids for b in policy.batches] == [["e0", "e2"], ["e1"]]
    for state, actions in planned:  # each row gets what the policy gives that observation alone
        alone = ScriptedExpert().predict(_batch_of(state))
        np.testing.assert_array_equal(actions, alone[0][:5])
    assert all(e.outcome.policy_calls == 1 and len(e.outcome.call_latencies_ms) == 1 for e in episodes)


def _batch_of(episode: EpisodeState) -> ObservationBatch:
    return collate([episode.obs], [episode.instruction], [episode.episode_id], [episode.seed], [0])


def _rows(batches: list[ObservationBatch]) -> dict[str, list[tuple[int, np.ndarray, np.ndarray]]]:
    rows: dict[str, list] = {}
    for batch in batches:
        for i, eid in enumerate(batch.episode_ids):
            rows.setdefault(eid, []).append((batch.steps[i], batch.state[i], batch.object_poses[i]))
    return rows


def test_two_workers_reproduce_the_in_process_run(tmp_path):
    runs = {}
    for n in (1, 2):
        cfg, resolved = make_run([*SLICE, "tasks=[0]", "trials_per_task=2", "suite.max_steps=40", f"num_envs={n}",
                                  f"results_dir={tmp_path / str(n)}"])  # fmt: skip
        policy = Recording(ScriptedExpert())
        doc = json.loads(Evaluation(cfg, resolved, policy=policy).run().read_text())
        runs[n] = doc, policy.batches
    (one, one_batches), (two, two_batches) = runs[1], runs[2]

    assert max(len(b) for b in one_batches) == 1 and max(len(b) for b in two_batches) == 2
    assert two["execution"] == {"num_envs": 2, "join_rounds": 0} and one["status"] == two["status"] == "complete"
    assert set(one) == set(two) and [set(e) for e in one["episodes"]] == [set(e) for e in two["episodes"]]
    same = ("task_id", "episode", "seed", "success", "steps", "policy_calls", "error")
    assert [{k: e[k] for k in same} for e in one["episodes"]] == [{k: e[k] for k in same} for e in two["episodes"]]
    rows_one, rows_two = _rows(one_batches), _rows(two_batches)
    assert rows_one.keys() == rows_two.keys() and len(rows_one) == 2
    for eid, rows in rows_one.items():  # every observation the policy saw, step for step
        assert [r[0] for r in rows] == [r[0] for r in rows_two[eid]]
        for (_, state, poses), (_, state2, poses2) in zip(rows, rows_two[eid]):
            np.testing.assert_array_equal(state, state2)
            np.testing.assert_array_equal(poses, poses2)


@pytest.mark.parametrize("join_rounds, chosen", [(0, 0), (None, 15)])  # None: physics-only hard resets -> 15
def test_batches_are_counted_in_rounds_not_by_which_worker_replied_first(tmp_path, join_rounds, chosen):
    # Hard resets: a worker's reset time varies run to run, so a scheduler that did not wait would batch by it.
    cfg, resolved = make_run(["policy=scripted_expert", "suite=libero_spatial", "progress=false", "tasks=[0]",
                              "trials_per_task=3", "suite.max_steps=15", "num_envs=2", f"join_rounds={'null' if join_rounds is None else join_rounds}",
                              f"results_dir={tmp_path}"])  # fmt: skip
    policy = Recording(ScriptedExpert())
    doc = json.loads(Evaluation(cfg, resolved, policy=policy).run().read_text())

    assert doc["execution"] == {"num_envs": 2, "join_rounds": chosen}
    eid = [episode_id("libero_spatial", 0, episode) for episode in range(3)]
    # Episodes 0 and 1 start together and share every call; episode 2 takes the first free worker.
    together = [[(eid[0], step), (eid[1], step)] for step in (0, 5, 10)]
    alone = [[(eid[2], step)] for step in (0, 5, 10)]
    assert [list(zip(b.episode_ids, b.steps)) for b in policy.batches] == together + alone


class Sabotage(PolicyWrapper):
    """Passes through to the scripted expert; at given calls kills one env worker and freezes another."""

    def __init__(self, kill_at: int, freeze_at: int):
        super().__init__(ScriptedExpert())
        self.kill_at, self.freeze_at, self.calls = kill_at, freeze_at, 0
        self.victims: list[int] = []
        self.workers_seen: list[int] = []  # in order of first sight

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        self.calls += 1
        for p in mp.active_children():
            if p.name == "libero-env-worker" and p.pid not in self.workers_seen:
                self.workers_seen.append(p.pid)
        if self.calls in (self.kill_at, self.freeze_at):
            victim = next(pid for pid in self.workers_seen[:2] if pid not in self.victims)  # an original worker
            os.kill(victim, signal.SIGKILL if self.calls == self.kill_at else signal.SIGSTOP)
            self.victims.append(victim)
        return self.inner.predict(batch)


def test_a_crashed_and_a_hung_worker_are_restarted_and_only_their_episodes_fail(tmp_path):
    cfg, resolved = make_run([*SLICE, "tasks=[0]", "trials_per_task=4", "suite.max_steps=25", "num_envs=2",
                              "step_timeout_s=1", f"results_dir={tmp_path}"])  # fmt: skip
    policy = Sabotage(kill_at=2, freeze_at=6)
    doc = json.loads(Evaluation(cfg, resolved, policy=policy).run().read_text())

    assert doc["status"] == "complete" and [e["episode"] for e in doc["episodes"]] == [0, 1, 2, 3]
    errors = sorted(e["error"].split(":")[0] for e in doc["episodes"] if e["error"])
    assert errors == ["WorkerCrashed", "WorkerTimeout"]
    assert all(e["steps"] == 25 and not e["success"] for e in doc["episodes"] if not e["error"])  # the others ran on
    assert len(policy.workers_seen) >= 3  # a fresh worker took the crashed one's place
    assert not [pid for pid in policy.victims if Path(f"/proc/{pid}").exists()] and not mp.active_children()


def _env_workers(pid: int) -> set[int]:
    """Live spawned worker processes whose parent is ``pid`` (not multiprocessing's resource tracker)."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and spawned:
            found.add(int(proc.name))
    return found


def test_sigterm_stops_a_sharded_multi_worker_run_leaving_no_workers_and_resume_finishes_it(tmp_path):
    args = [*SLICE, "tasks=[0]", "trials_per_task=6", "shard=1/2", "suite.max_steps=30", "num_envs=2",
            f"results_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(MAIN), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    folder, deadline, workers = tmp_path / "libero_spatial", time.time() + 240, set()
    while time.time() < deadline and not any(f.read_text().strip() for f in folder.glob("*.jsonl")):
        workers |= _env_workers(proc.pid)
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(workers) == 2
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "env workers outlived the run"

    path = next(folder.glob("*.json"))
    assert path.name.endswith("_scripted_expert_fp_shard1of2.json")
    doc = json.loads(path.read_text())
    assert doc["status"] == "interrupted" and doc["config"]["shard"] == "1/2"
    assert 1 <= doc["overall"]["episodes"] < 3

    resumed = cli(f"resume={path}", *args)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(path.read_text())
    assert doc["status"] == "complete" and sorted(e["episode"] for e in doc["episodes"]) == [1, 3, 5]
    assert len(path.with_suffix(".jsonl").read_text().splitlines()) == 3


def test_shards_partition_the_ordered_episode_list(tmp_path):
    def episodes(*overrides: str) -> list[tuple[int, int]]:
        cfg, resolved = make_run(["policy=scripted_expert", "tasks=[2,5]", "trials_per_task=3", *overrides])
        return [(job.task_id, job.episode) for job in EpisodePlan(cfg).episodes]

    every = episodes()
    assert every == [(2, 0), (2, 1), (2, 2), (5, 0), (5, 1), (5, 2)]
    shards = [episodes(f"shard={i}/4") for i in range(4)]
    assert shards[1] == [(2, 1), (5, 2)] and shards[3] == [(5, 0)]
    assert sorted(itertools.chain(*shards)) == every


@pytest.mark.parametrize(
    "override, message",
    [("shard=4/4", "shard must be"), ("shard=1-4", "shard must be"), ("num_envs=0", "num_envs"),
     ("step_timeout_s=0", "step_timeout_s"), ("join_rounds=-1", "join_rounds"), ("protocol.reset=warm", "protocol.reset"),
     ("protocol.render_quality=ultra", "protocol.render_quality")],
)  # fmt: skip
def test_bad_worker_settings_fail_early(override, message):
    with pytest.raises(Exception, match=message):
        make_run(["policy=scripted_expert", override])
