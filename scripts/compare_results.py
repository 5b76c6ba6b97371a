#!/usr/bin/env python
"""Side-by-side success rates and latency of results JSON files (the first is the baseline).

    python scripts/compare_results.py results/libero_spatial/A.json results/libero_spatial/B.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"error: cannot read results file {path}: {exc}")


def label(run: dict) -> str:
    quant = run.get("quant") or {}
    mode = quant.get("mode", "fp")
    bits = f" w{quant['w_bits']}a{quant['a_bits']}" if mode != "fp" and "w_bits" in quant else ""
    return f"{run['policy']['name']} {mode}{bits}"


def cell(summary: dict | None) -> str:
    if not summary or not summary["episodes"]:
        return "-"
    lo, hi = summary["ci95"]
    return f"{summary['success_rate']:6.1%} ({summary['successes']}/{summary['episodes']}) [{lo:.2f},{hi:.2f}]"


def table(runs: list[dict]) -> str:
    task_ids = sorted({t["task_id"] for run in runs for t in run["tasks"]})
    by_task = [{t["task_id"]: t for t in run["tasks"]} for run in runs]
    header = ["task"] + [label(r) for r in runs] + [f"delta vs 1 ({label(r)})" for r in runs[1:]]
    rows = []
    for tid in task_ids:
        row = [str(tid)] + [cell(bt.get(tid)) for bt in by_task]
        base = by_task[0].get(tid)
        for bt in by_task[1:]:
            other = bt.get(tid)
            ok = base and other and base["episodes"] and other["episodes"]
            row.append(f"{(other['success_rate'] - base['success_rate']) * 100:+.1f} pts" if ok else "-")
        rows.append(row)
    overall = ["overall"] + [cell(r["overall"]) for r in runs]
    for r in runs[1:]:
        a, b = runs[0]["overall"], r["overall"]
        overall.append(f"{(b['success_rate'] - a['success_rate']) * 100:+.1f} pts" if a["episodes"] and b["episodes"] else "-")
    latency = ["policy p50 ms"] + [
        f"{r['timing']['policy_latency_ms']['p50']:.1f}" if r["timing"]["policy_latency_ms"]["p50"] is not None else "-"
        for r in runs
    ] + [""] * (len(runs) - 1)
    rows += [overall, latency]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files; the first is the baseline")
    args = parser.parse_args(argv)
    print(table([load(p) for p in args.results]))


if __name__ == "__main__":
    main()
