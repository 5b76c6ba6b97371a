"""Rollout throughput: env steps/s and episodes/min for N worker processes against the single-process loop.

    python scripts/bench_rollout.py                      # physics-only and cameras, N = 1..cores
    python scripts/bench_rollout.py --modes physics --episodes 8 --max-steps 100

Episodes are libero_spatial task 0 under the evaluation protocol, driven by
the scripted expert (so the policy costs ~nothing and the simulator is what is
measured); "cameras" renders both cameras every step as an image policy's env
does. Worker start-up (imports, env build) is timed apart from the rollouts.
Also breaks one camera step down into physics, rendering, policy and IPC.
Prints a table and writes JSON (default results/bench/rollout_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from libero_eval import (
    Begin,
    EnvSpec,
    EpisodeInfo,
    Execute,
    Job,
    ProcessWorker,
    Protocol,
    Scheduler,
    load_task,
    run_episode,
    versions,
)
from policies.base import collate
from policies.scripted_expert import ScriptedExpert

SUITE, TASK = "libero_spatial", 0


def spec(args: argparse.Namespace, cameras: bool) -> EnvSpec:
    return EnvSpec(suite=SUITE, obs_mode="state", seed=7, camera_size=args.camera_size, image_size=args.camera_size,
                   render=cameras, reset=args.reset, render_quality=args.render_quality, num_steps_wait=10,
                   record_video=False)  # fmt: skip


def single_process_loop(args: argparse.Namespace, cameras: bool, protocol: Protocol) -> dict:
    """The reference loop: one env in this process, one episode after another, batch-1 policy calls."""
    task, init_states = load_task(SUITE, TASK)
    start = time.perf_counter()
    env = spec(args, cameras).build(task)
    startup = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    for episode in range(args.episodes):
        out = run_episode(
            env, ScriptedExpert(), init_states[episode], protocol=protocol, episode_id=f"ep{episode}", seed=0
        )
        steps += out.steps
    wall = time.perf_counter() - start
    env.close()
    return {"workers": "loop", "startup_s": startup, **rates(steps, args.episodes, wall)}


def workers_run(args: argparse.Namespace, cameras: bool, protocol: Protocol, n: int, join_rounds: int) -> dict:
    """N spawned workers under the evaluation scheduler (one batched policy call per round)."""
    start = time.perf_counter()
    workers = [ProcessWorker(spec(args, cameras), step_timeout_s=60.0) for _ in range(n)]
    instruction = load_task(SUITE, TASK)[0].instruction
    scheduler = Scheduler(workers, ScriptedExpert(), protocol, lambda job: EpisodeInfo(f"ep{job.episode}", 0, instruction),
                          threading.Event(), join_rounds)  # fmt: skip
    try:
        scheduler.prepare(TASK)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        outcomes = [done.outcome for done in scheduler.run(iter([Job(TASK, e) for e in range(args.episodes)]))]
        wall = time.perf_counter() - start
    finally:
        for worker in workers:
            worker.close()
    steps = sum(o.steps for o in outcomes)
    return {"workers": n, "join_rounds": join_rounds, "startup_s": startup, **rates(steps, len(outcomes), wall)}


def rates(steps: int, episodes: int, wall: float) -> dict:
    return {"episodes": episodes, "env_steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "episodes_per_min": episodes * 60 / wall}  # fmt: skip


def step_breakdown(args: argparse.Namespace, steps: int = 20) -> dict:
    """Milliseconds per env step with cameras: physics (+ robosuite control), rendering, policy, IPC."""
    task, init_states = load_task(SUITE, TASK)
    per_step = {}
    for name, cameras in (("physics", False), ("with_cameras", True)):
        with spec(args, cameras).build(task) as env:
            obs = env.reset(init_states[0])
            start = time.perf_counter()
            for _ in range(steps):
                obs, _ = env.step([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
            per_step[name] = (time.perf_counter() - start) * 1e3 / steps
    policy, batch = ScriptedExpert(), collate([obs], [task.instruction], ["ep"], [0], [0])
    start = time.perf_counter()
    for _ in range(steps):
        policy.predict(batch)
    policy_ms = (time.perf_counter() - start) * 1e3 / steps / 5  # one call serves replan_steps = 5 env steps
    worker = ProcessWorker(spec(args, cameras=True), step_timeout_s=60.0)
    try:
        worker.submit(Begin(TASK, 0))
        worker.receive()
        ipc = []
        for _ in range(steps // 5):
            start = time.perf_counter()
            worker.submit(Execute(np.tile([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], (5, 1))))
            progress = worker.receive()
            ipc.append(((time.perf_counter() - start) * 1e3 - sum(progress.step_ms)) / 5)
    finally:
        worker.close()
    return {"physics_ms": per_step["physics"], "render_ms": per_step["with_cameras"] - per_step["physics"],
            "policy_ms": policy_ms, "ipc_ms": float(np.mean(ipc)), "camera_size": args.camera_size}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=("physics", "cameras"), default=["physics", "cameras"])
    p.add_argument("--workers", nargs="+", type=int, default=None, help="worker counts (default: 1..cores)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per measurement (default: 2 x max workers)")
    p.add_argument("--join-rounds", nargs="+", type=int, default=[0, 15],
                   help="scheduler join_rounds values to compare with 2+ workers (default: 0 15)")
    p.add_argument("--max-steps", type=int, default=60, help="policy-driven steps per episode (default: 60)")
    p.add_argument("--camera-size", type=int, default=128, help="camera resolution with cameras (default: 128)")
    p.add_argument("--reset", choices=("hard", "soft"), default="hard")
    p.add_argument("--render-quality", choices=("default", "fast"), default="default")
    p.add_argument("--out", type=Path, default=Path("results/bench/rollout_cpu.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = args.workers or list(range(1, (os.cpu_count() or 1) + 1))
    args.episodes = args.episodes or 2 * max(counts)
    protocol = Protocol(max_steps=args.max_steps)
    load_before = os.getloadavg()
    rows = []
    for mode in args.modes:
        cameras = mode == "cameras"
        base = single_process_loop(args, cameras, protocol)
        rows.append({"mode": mode, **base, "speedup": 1.0})
        for n in counts:
            for join_rounds in args.join_rounds if n > 1 else args.join_rounds[:1]:  # one worker never waits
                row = workers_run(args, cameras, protocol, n, join_rounds)
                rows.append({"mode": mode, **row, "speedup": row["steps_per_s"] / base["steps_per_s"]})
    breakdown = step_breakdown(args) if "cameras" in args.modes else None
    print("| mode | workers | join_rounds | env steps/s | episodes/min | speed-up | start-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r.get('join_rounds', '')} | {r['steps_per_s']:.1f} | "
              f"{r['episodes_per_min']:.1f} | {r['speedup']:.2f}x | {r['startup_s']:.1f} |")  # fmt: skip
    if breakdown:
        print(
            f"one camera step ({args.camera_size} px): physics {breakdown['physics_ms']:.1f} ms, render "
            f"{breakdown['render_ms']:.1f} ms, policy {breakdown['policy_ms']:.2f} ms, IPC {breakdown['ipc_ms']:.2f} ms"
        )
    load = os.getloadavg()
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load[0]:.2f}, on {os.cpu_count()} cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": [sys.executable, *sys.argv], "versions": versions(), "cores": os.cpu_count(), "load_average": {"before": load_before, "after": load},
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows, "camera_step": breakdown}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
