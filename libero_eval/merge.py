"""Merge the results files of one sharded evaluation (``shard=i/n``) into a single results file.

    libero-eval-merge results/libero_spatial/*shard*.json -o results/libero_spatial/merged.json

The shards must be pieces of the same evaluation: configs equal except in how the run was executed
(MERGE_FREE_KEYS), the same simulator and policy weights, and no episode (suite, task, init state) in two
shards. The output has the schema of a normal run, with its summaries recomputed from the episode records;
it is ``complete`` only when every shard is and together they cover every episode of the config, and
``shards`` lists where it came from. Any refusal is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from libero_eval.config import recorded_defaults
from libero_eval.errors import fail
from libero_eval.results import (
    EXECUTION_KEYS,
    SIMULATOR_KEYS,
    ResultsError,
    config_differences,
    peak_memory,
    read_results,
    summary_document,
    write_atomic,
)

# Besides what a resumed run may change, shards differ in their shard and may write to different folders.
MERGE_FREE_KEYS = (*EXECUTION_KEYS, "shard", "results_dir")


class MergeRefused(ValueError):
    pass


def check_compatible(paths: list[Path], docs: list[dict]) -> None:
    """Refuse shards that are not pieces of one evaluation."""
    base_path, base = paths[0], docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        diff = config_differences(base["config"], doc["config"], MERGE_FREE_KEYS, recorded_defaults())
        if diff:
            raise MergeRefused(
                f"{path} is not a shard of the same run as {base_path}: config differs in {', '.join(diff)}"
            )
        versions = [k for k in SIMULATOR_KEYS if base["versions"].get(k) != doc["versions"].get(k)]
        if versions:
            raise MergeRefused(f"{path} ran on other simulator versions than {base_path}: {', '.join(versions)}")
        if base["policy"].get("weights_sha256") != doc["policy"].get("weights_sha256"):
            raise MergeRefused(f"{path} ran other policy weights than {base_path}")
    owner: dict[tuple, Path] = {}
    for path, doc in zip(paths, docs):
        for ep in doc["episodes"]:
            key = (ep["suite"], ep["task_id"], ep["init_state"])
            if key in owner:
                raise MergeRefused(
                    f"shards overlap: {key[0]} task {key[1]} init state {key[2]} is in {owner[key]} and {path}"
                )
            owner[key] = path


def expected_episodes(config: dict) -> set[tuple]:
    suite = config["suite"]
    tasks = range(suite["num_tasks"]) if config["tasks"] is None else config["tasks"]
    return {(suite["name"], t, e) for t in tasks for e in range(config["trials_per_task"])}


def merge(paths: list[Path], docs: list[dict], run_id: str) -> dict:
    """The merged results document; the shards must have passed check_compatible."""
    episodes = [ep for doc in docs for ep in doc["episodes"]]
    base = docs[0]
    covered = {(ep["suite"], ep["task_id"], ep["init_state"]) for ep in episodes} == expected_episodes(base["config"])
    complete = covered and all(doc["status"] == "complete" for doc in docs)
    quants = [doc["quant"] for doc in docs]
    # Quantized shards each calibrated on their own first episodes: then each shard's record is kept.
    quant = quants[0] if all(q == quants[0] for q in quants) else {"mode": quants[0]["mode"], "shards": quants}
    header = {
        **{k: v for k, v in base.items() if k not in ("tasks", "episodes", "overall", "timing")},
        "run_id": run_id,
        "started_at": min(doc["started_at"] for doc in docs),
        "config": {**base["config"], "shard": None},
        "quant": quant,
        "memory": peak_memory(*(doc.get("memory") for doc in docs)),
        "shards": [
            {"path": str(p), "run_id": d["run_id"], "shard": d["config"].get("shard"), "status": d["status"],
             "episodes": len(d["episodes"])}
            for p, d in zip(paths, docs)
        ],
    }  # fmt: skip
    total_wall_s = sum(doc["timing"]["total_wall_s"] or 0.0 for doc in docs)  # compute time, not elapsed time
    doc = summary_document(header, episodes, "complete" if complete else "interrupted", total_wall_s)
    doc["finished_at"] = max((d["finished_at"] for d in docs if d["finished_at"]), default=None)
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path, help="the shards' results JSON files")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the merged results JSON (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.out.exists():
            raise MergeRefused(f"{args.out} exists; results files are never overwritten")
        docs = [read_results(path) for path in args.shards]
        check_compatible(args.shards, docs)
    except (ResultsError, MergeRefused) as exc:
        fail(str(exc))
    doc = merge(args.shards, docs, run_id=args.out.stem)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The JSONL beside it, as for a run: the records are the source of truth, and resume reads them.
    write_atomic(args.out.with_suffix(".jsonl"), "".join(json.dumps(ep) + "\n" for ep in doc["episodes"]))
    write_atomic(args.out, json.dumps(doc, indent=1))
    overall = doc["overall"]
    print(f"merged {len(docs)} shards, {overall['episodes']} episodes ({overall['successes']} successes), "
          f"status {doc['status']}: {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
