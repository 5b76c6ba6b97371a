"""Which suites registered in LIBERO's benchmark dict actually run: files present, and an episode resets and steps.

    python scripts/probe_suites.py [--suites NAME ...] [--steps 5] [--out probe.jsonl]

For every task of every suite (all registered ones by default): the BDDL file and the init states must load;
then, physics only, an env is built from the BDDL, reset to init state 0 and stepped ``--steps`` times with the
protocol's dummy action. One JSON line per suite: tasks, init states per task, objects of interest of task 0,
and the first problem met (``null`` when every task ran). docs/robustness.md records the findings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from libero_eval.env import DUMMY_ACTION, LiberoEnv, load_task


def probe(suite: str, steps: int) -> dict:
    from libero.libero import benchmark

    record: dict = {"suite": suite, "tasks": None, "init_states": [], "objects_of_interest": None, "problem": None}
    task_id = 0
    try:
        record["tasks"] = benchmark.get_benchmark_dict()[suite]().get_num_tasks()
        if not record["tasks"]:
            raise LookupError("the suite has no tasks")
        for task_id in range(record["tasks"]):
            task, inits = load_task(suite, task_id)
            if not os.path.exists(task.bddl_path):
                raise FileNotFoundError(f"task {task_id}: BDDL file missing: {task.bddl_path}")
            record["init_states"].append(len(inits))
            with LiberoEnv(task, "state", seed=7) as env:
                env.reset(inits[0])
                for _ in range(steps):
                    env.step(DUMMY_ACTION)
                if task_id == 0:
                    record["objects_of_interest"] = env.objects_of_interest
    except Exception as exc:  # the probe's purpose is to record why a suite cannot run
        record["problem"] = f"task {task_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="*", help="suite names (default: every registered suite)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="append the JSON lines to this file as well")
    args = parser.parse_args()
    from libero.libero import benchmark

    for suite in args.suites or sorted(benchmark.get_benchmark_dict()):
        start = time.perf_counter()
        record = {**probe(suite, args.steps), "seconds": round(time.perf_counter() - start, 1)}
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
