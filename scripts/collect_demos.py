"""Roll out the scripted expert and keep its successful episodes as a demo dataset.

    python scripts/collect_demos.py --suites libero_spatial libero_object --init-states 50 --seeds 0
    python scripts/collect_demos.py --action-noise 0.2 --seeds 1 --out data/demos_noisy

Episodes run physics-only under the evaluation protocol (``run_episode``), one
worker process per core, each building its own envs. With ``--action-noise``
the arm executes the expert's actions plus Gaussian noise while the dataset
keeps the expert's own actions (DART, Laskey et al. 2017): the demos then
show how the expert recovers from the small deviations a learned policy
makes, not only its own noise-free path. Writes ``demos.npz`` and
``manifest.json`` into ``--out``:

per step (grouped by episode, in episode order):
    state [N, 8], object_poses [N, K, 7], object_mask [N, K], actions [N, 7], episode_index [N]
per episode:
    suite, task_id, instruction, init_state (index into the task's init states),
    seed, length, object_names [E, K]

K is the largest number of objects of interest among the suites; rows of
suites with fewer objects are zero-padded and ``object_mask`` marks the real ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libero_eval import LiberoEnv, Protocol, compose, load_task, run_episode, versions
from policies.base import ObservationBatch, ObsMode, PolicyWrapper, file_sha256
from policies.scripted_expert import ScriptedExpert

DEFAULT_SUITES = ("libero_spatial", "libero_object")


@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    init_state: int
    seed: int
    max_steps: int
    action_noise: float = 0.0

    @property
    def episode_id(self) -> str:
        return f"{self.suite}/{self.task_id}/{self.init_state}/{self.seed}"


class NoisyExpert(PolicyWrapper):
    """The scripted expert, its chunks perturbed for execution; ``labels`` keeps what it asked for.

    Noise goes on the arm's motion only (the six pose dimensions); the gripper
    command stays the expert's, as a flipped open/close is no small deviation.
    """

    def __init__(self, expert: ScriptedExpert, std: float, rng: np.random.Generator):
        super().__init__(expert)
        self.std, self.rng = std, rng
        self.labels: deque[np.ndarray] = deque()

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        chunks = self.inner.predict(batch)
        self.labels = deque(chunks[0].astype(np.float32))
        noisy = chunks.copy()
        noisy[..., :6] = np.clip(noisy[..., :6] + self.rng.normal(0.0, self.std, noisy[..., :6].shape), -1.0, 1.0)
        return noisy


@dataclass
class Episode:
    job: Job
    instruction: str
    success: bool
    steps: int
    seconds: float
    error: str | None
    object_names: list[str]
    state: np.ndarray  # [T, 8]
    object_poses: np.ndarray  # [T, K, 7]
    actions: np.ndarray  # [T, 7]


def suite_max_steps(suite: str) -> int:
    """The suite's step budget, composed as the evaluator composes it."""
    return int(compose([f"suite={suite}"]).suite.max_steps)


def plan(args: argparse.Namespace) -> list[Job]:
    from libero.libero import benchmark

    jobs = []
    for suite in args.suites:
        bench = benchmark.get_benchmark_dict()[suite]()
        max_steps = args.max_steps or suite_max_steps(suite)
        for task_id in args.tasks if args.tasks is not None else range(bench.n_tasks):
            stop = min(args.first_init_state + args.init_states, len(bench.get_task_init_states(task_id)))
            init_states = range(args.first_init_state, stop)
            jobs += [
                Job(suite, task_id, i, seed, max_steps, args.action_noise) for seed in args.seeds for i in init_states
            ]
    return jobs


_envs: dict[tuple[str, int, int], tuple[LiberoEnv, np.ndarray]] = {}


def _env(job: Job) -> tuple[LiberoEnv, np.ndarray]:
    """This worker's env for the job's task; jobs arrive grouped by task, so one is kept at a time."""
    key = (job.suite, job.task_id, job.seed)
    if key not in _envs:
        for env, _ in _envs.values():
            env.close()
        _envs.clear()
        task, init_states = load_task(job.suite, job.task_id)
        _envs[key] = (LiberoEnv(task, ObsMode.STATE, seed=job.seed), init_states)
    return _envs[key]


def run_job(job: Job) -> Episode:
    env, init_states = _env(job)
    steps: list[tuple[dict, np.ndarray]] = []
    if job.action_noise > 0:
        rng = np.random.default_rng(zlib.crc32(job.episode_id.encode()))
        policy = NoisyExpert(ScriptedExpert(), job.action_noise, rng)

        def record(obs: dict, action: np.ndarray) -> None:
            steps.append((obs, policy.labels.popleft()))
    else:
        policy = ScriptedExpert()

        def record(obs: dict, action: np.ndarray) -> None:
            steps.append((obs, np.asarray(action, dtype=np.float32)))

    start = time.perf_counter()
    out = run_episode(env, policy, init_states[job.init_state], protocol=Protocol(max_steps=job.max_steps),
                      episode_id=job.episode_id, seed=job.seed, on_step=record)  # fmt: skip
    return Episode(
        job=job,
        instruction=env.task.instruction,
        success=out.success,
        steps=out.steps,
        seconds=time.perf_counter() - start,
        error=out.error,
        object_names=list(env.objects_of_interest),
        state=np.stack([obs["state"] for obs, _ in steps]) if steps else np.zeros((0, 8), np.float32),
        object_poses=np.stack([obs["object_poses"] for obs, _ in steps]) if steps else np.zeros((0, 0, 7), np.float32),
        actions=np.stack([a for _, a in steps]) if steps else np.zeros((0, 7), np.float32),
    )


def dataset(episodes: list[Episode]) -> dict[str, np.ndarray]:
    """Concatenate episodes into flat per-step arrays, padding object rows to the largest K."""
    k = max(len(e.object_names) for e in episodes)
    poses, masks = [], []
    for e in episodes:
        padded = np.zeros((e.steps, k, 7), dtype=np.float32)
        padded[:, : e.object_poses.shape[1]] = e.object_poses
        mask = np.zeros((e.steps, k), dtype=bool)
        mask[:, : len(e.object_names)] = True
        poses.append(padded)
        masks.append(mask)
    return {
        "state": np.concatenate([e.state for e in episodes]).astype(np.float32),
        "object_poses": np.concatenate(poses),
        "object_mask": np.concatenate(masks),
        "actions": np.concatenate([e.actions for e in episodes]).astype(np.float32),
        "episode_index": np.concatenate([np.full(e.steps, i, dtype=np.int32) for i, e in enumerate(episodes)]),
        "suite": np.array([e.job.suite for e in episodes]),
        "task_id": np.array([e.job.task_id for e in episodes], dtype=np.int32),
        "instruction": np.array([e.instruction for e in episodes]),
        "init_state": np.array([e.job.init_state for e in episodes], dtype=np.int32),
        "seed": np.array([e.job.seed for e in episodes], dtype=np.int64),
        "length": np.array([e.steps for e in episodes], dtype=np.int32),
        "object_names": np.array([e.object_names + [""] * (k - len(e.object_names)) for e in episodes]),
    }


def summarize(episodes: list[Episode]) -> dict[str, dict[str, dict]]:
    """Per suite and task: attempts, kept (successful) episodes, success rate and mean length."""
    groups: dict[tuple[str, int], list[Episode]] = defaultdict(list)
    for e in episodes:
        groups[(e.job.suite, e.job.task_id)].append(e)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (suite, task_id), group in sorted(groups.items()):
        kept = [e for e in group if e.success]
        out[suite][str(task_id)] = {
            "instruction": group[0].instruction,
            "episodes": len(group),
            "successes": len(kept),
            "success_rate": len(kept) / len(group),
            "mean_steps_successful": float(np.mean([e.steps for e in kept])) if kept else None,
            "mean_seconds": float(np.mean([e.seconds for e in group])),
            "errors": sorted({e.error for e in group if e.error}),
        }
    return dict(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=list(DEFAULT_SUITES), help="LIBERO suites to collect from")
    p.add_argument("--tasks", nargs="+", type=int, default=None, help="task ids within each suite (default: all)")
    p.add_argument("--init-states", type=int, default=50, help="N init states of each task, from --first-init-state (default: all 50)")
    p.add_argument(
        "--first-init-state",
        type=int,
        default=0,
        help="start at this init state, e.g. 10 to keep states 0-9 unseen for evaluation (default: 0)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="env and episode seeds, each over all init states")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--action-noise", type=float, default=0.0,
                   help="std of Gaussian noise on the executed arm actions (in [-1, 1] action units); the demos keep "
                        "the expert's own actions (default: 0, none)")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=None, help="step budget per episode (default: the suite's)")
    p.add_argument("--out", type=Path, default=Path("data/demos"), help="output directory")
    args = p.parse_args(argv)
    if args.action_noise < 0:
        p.error(f"--action-noise must be >= 0, got {args.action_noise}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    if not jobs:
        print("nothing to collect", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    episodes: list[Episode] = []
    with mp.get_context("spawn").Pool(max(1, min(args.workers, len(jobs)))) as pool:
        for episode in pool.imap_unordered(run_job, jobs):
            episodes.append(episode)
            job = episode.job
            verdict = f"success in {episode.steps} steps" if episode.success else f"failed after {episode.steps} steps"
            if episode.error:
                verdict += f" ({episode.error})"
            print(
                f"[{len(episodes)}/{len(jobs)}] {job.suite} task {job.task_id} init {job.init_state} seed {job.seed}: "
                f"{verdict}, {episode.seconds:.1f} s",
                flush=True,
            )
    episodes.sort(key=lambda e: (e.job.suite, e.job.task_id, e.job.seed, e.job.init_state))
    kept = [e for e in episodes if e.success]
    summary = summarize(episodes)
    manifest = {
        "command": [sys.executable, *sys.argv],
        "versions": versions(),
        "workers": args.workers,
        "action_noise": args.action_noise,
        "wall_seconds": time.perf_counter() - start,
        "episodes_attempted": len(episodes),
        "episodes_kept": len(kept),
        "total_steps": int(sum(e.steps for e in kept)),
        "tasks": summary,
    }
    if kept:
        path = args.out / "demos.npz"
        np.savez_compressed(path, **dataset(kept))
        manifest.update(file=path.name, sha256=file_sha256(path))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for suite, tasks in summary.items():
        for task_id, row in tasks.items():
            steps = row["mean_steps_successful"]
            print(f"{suite} task {task_id}: {row['successes']}/{row['episodes']}"
                  + (f", mean {steps:.0f} steps" if steps is not None else ""))
    print(f"kept {len(kept)}/{len(episodes)} episodes, {manifest['total_steps']} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
