"""Compare results JSON files against the first one: success rates, paired significance, latency, memory.

    libero-eval-compare A.json B.json [C.json ...] [--format table|markdown|csv|json] [--plot out.png]

Per task and overall: success rate with its Wilson 95% interval, and the difference to the first file in
percentage points. Overall, an exact McNemar test on the episodes two runs share (same suite, task and init
state): of the pairs whose outcomes differ, b where only the first run succeeded and c where only the other did,
p is the two-sided binomial test of b successes in b + c at 1/2. Then policy latency (p50, p90) and peak memory,
with their ratio to the first file. Runs evaluated under different protocols, or with errored episodes (the policy or
simulator raised: not policy failures), are refused unless --force, which leaves errored episodes out;
different simulator versions are reported as a warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from scipy import stats

from libero_eval.errors import fail
from libero_eval.results import SIMULATOR_KEYS, ResultsError, error_summary, errored, rate_summary, read_results

# What an episode means: runs that differ here measured different things.
PROTOCOL_KEYS = (
    "suite",
    "num_steps_wait",
    "max_steps",
    "replan_steps",
    "obs_mode",
    "image_size",
    "camera_size",
    "reset",
    "render_quality",
)
FORMATS = ("table", "markdown", "csv", "json")


class ProtocolMismatch(ValueError):
    pass


class ErroredEpisodes(ValueError):
    """A run has episodes that could not be evaluated; comparing them as failures would misread them."""


def quant_tag(doc: dict) -> str:
    """The quant tag the run recorded (``QuantConfig.tag()``), e.g. ``duquant_w4a8``."""
    quant = doc.get("quant") or {}
    return quant.get("tag", quant.get("mode", "fp"))


def label(doc: dict) -> str:
    """Policy and quant tag, e.g. ``embedded duquant_w4a8``."""
    return f"{doc['policy']['name']} {quant_tag(doc)}"


def labels(docs: list[dict]) -> list[str]:
    """Policy and quant mode, or the run ids where that does not tell the runs apart (a seed sweep)."""
    names = [label(doc) for doc in docs]
    return names if len(set(names)) == len(names) else [doc["run_id"] for doc in docs]


def check_protocols(paths: list[Path], docs: list[dict], ignore: tuple[str, ...] = ()) -> None:
    base = docs[0].get("protocol") or {}
    for path, doc in zip(paths[1:], docs[1:]):
        protocol = doc.get("protocol") or {}
        # A key one file does not record (written before it existed) cannot be checked.
        recorded = [k for k in PROTOCOL_KEYS if k in base and k in protocol and k not in ignore]
        diff = [f"{k} ({base[k]} vs {protocol[k]})" for k in recorded if base[k] != protocol[k]]
        if diff:
            hint = "; --robustness compares suites" if "suite" in recorded and base["suite"] != protocol["suite"] else ""
            raise ProtocolMismatch(
                f"{path} differs from {paths[0]} in protocol: {', '.join(diff)}; --force compares anyway{hint}"
            )


def check_errors(paths: list[Path], docs: list[dict]) -> None:
    for path, doc in zip(paths, docs):
        summary = error_summary(doc["episodes"])
        if summary is not None:
            raise ErroredEpisodes(
                f"{path}: {summary}. Errored episodes are not policy failures; fix and rerun them, or --force "
                "compares the evaluated episodes only"
            )


def warnings_for(paths: list[Path], docs: list[dict]) -> list[str]:
    notes = [
        f"{path} is {doc['status']}, not complete" for path, doc in zip(paths, docs) if doc["status"] != "complete"
    ]
    summaries = [(path, error_summary(doc["episodes"])) for path, doc in zip(paths, docs)]
    notes += [f"{path}: {summary}, left out" for path, summary in summaries if summary is not None]
    for key in SIMULATOR_KEYS:
        seen = {(doc.get("versions") or {}).get(key) for doc in docs}
        if len(seen) > 1:
            notes.append(f"simulator versions differ: {key} " + " vs ".join(str(v) for v in sorted(seen, key=str)))
    return notes


def outcomes(doc: dict) -> dict[tuple[str, int, int], bool]:
    """Evaluated episodes' outcomes by (suite, task, init state); errored episodes have none."""
    episodes = [ep for ep in doc["episodes"] if not errored(ep)]
    return {(ep["suite"], ep["task_id"], ep["init_state"]): bool(ep["success"]) for ep in episodes}


def mcnemar(base: dict, other: dict) -> dict:
    shared = base.keys() & other.keys()
    b = sum(base[k] and not other[k] for k in shared)
    c = sum(other[k] and not base[k] for k in shared)
    p = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"shared": len(shared), "baseline_only": b, "other_only": c, "p_value": float(p)}


def task_summaries(doc: dict) -> dict[tuple[str, int], dict]:
    by_task: dict[tuple[str, int], list[dict]] = {}
    for ep in doc["episodes"]:
        by_task.setdefault((ep["suite"], ep["task_id"]), []).append(ep)
    return {key: rate_summary(episodes) for key, episodes in by_task.items()}


def with_deltas(summaries: list[dict]) -> list[dict]:
    """Each run's summary plus its difference to the first run's, in percentage points."""
    base = summaries[0]

    def delta(s: dict) -> float | None:
        return (s["success_rate"] - base["success_rate"]) * 100 if s["evaluated"] and base["evaluated"] else None

    return [{**s, "delta_pts": delta(s)} for s in summaries]


def compare(paths: list[Path], docs: list[dict]) -> dict:
    """Everything the report shows, as data (the ``json`` format prints it as is)."""
    per_run = [task_summaries(doc) for doc in docs]
    names = {(ep["suite"], ep["task_id"]): ep["task"] for doc in docs for ep in doc["episodes"]}
    tasks = [
        {"suite": suite, "task_id": tid, "task": names[suite, tid],
         "runs": with_deltas([summaries.get((suite, tid)) or rate_summary([]) for summaries in per_run])}
        for suite, tid in sorted(names)
    ]  # fmt: skip
    overall = [rate_summary(doc["episodes"]) for doc in docs]
    runs = [
        {"path": str(path), "label": name, "run_id": doc["run_id"], "status": doc["status"],
         "latency_ms": {k: doc["timing"]["policy_latency_ms"][k] for k in ("p50", "p90")},
         "memory": doc.get("memory") or {}}
        for path, doc, name in zip(paths, docs, labels(docs))
    ]  # fmt: skip
    base = outcomes(docs[0])
    return {
        "runs": runs,
        "tasks": tasks,
        "overall": with_deltas(overall),
        "mcnemar": [None] + [mcnemar(base, outcomes(doc)) for doc in docs[1:]],
        "warnings": warnings_for(paths, docs),
    }


# -- rendering ----------------------------------------------------------------------------------------------------


def rate_cell(summary: dict) -> str:
    if not summary["evaluated"]:
        return f"- ({summary['errored']} errored)" if summary["errored"] else "-"
    lo, hi = summary["ci95"]
    cell = f"{summary['success_rate']:.1%} ({summary['successes']}/{summary['evaluated']}) [{lo:.2f}, {hi:.2f}]"
    return cell + (f" +{summary['errored']} errored" if summary["errored"] else "")


def number(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def ratio(base: float | None, other: float | None) -> str:
    return f"x{other / base:.2f}" if base and other is not None else "-"


def grid(result: dict) -> list[list[str]]:
    """The report as rows of cells: a label column, one column per run, one delta column per later run."""
    runs = result["runs"]
    header = ["", *(r["label"] for r in runs), *(f"delta {r['label']}" for r in runs[1:])]
    rows = [header]
    for task in result["tasks"]:
        cells = task["runs"]
        rows.append([f"{task['suite']}/{task['task_id']}", *map(rate_cell, cells),
                     *(number(c["delta_pts"], "{:+.1f} pts") for c in cells[1:])])  # fmt: skip
    overall = result["overall"]
    rows.append(["overall", *map(rate_cell, overall), *(number(o["delta_pts"], "{:+.1f} pts") for o in overall[1:])])
    rows.append(["McNemar (exact)", *([""] * len(runs)),
                 *(f"b={m['baseline_only']} c={m['other_only']} of {m['shared']}, p={m['p_value']:.3g}"
                   for m in result["mcnemar"][1:])])  # fmt: skip
    measures = [("policy p50 ms", "latency_ms", "p50"), ("policy p90 ms", "latency_ms", "p90"),
                ("peak RSS MB", "memory", "peak_rss_mb"),
                ("CUDA max MB", "memory", "cuda_max_allocated_mb")]  # fmt: skip
    for name, group, key in measures:
        values = [r[group].get(key) for r in runs]
        rows.append([name, *map(number, values), *(ratio(values[0], v) for v in values[1:])])
    return rows


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + " --- |" * len(rows[0]), *lines[1:]])


def render_csv(result: dict) -> str:
    """One row per run and task (then overall), numbers as numbers: a table for pandas or a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "label", "suite", "task_id", "episodes", "evaluated", "errored", "successes", "success_rate", "ci95_low",
                     "ci95_high", "delta_pts", "mcnemar_b", "mcnemar_c", "mcnemar_p", "latency_p50_ms",
                     "latency_p90_ms", "peak_rss_mb", "cuda_max_allocated_mb"])  # fmt: skip

    def rate(s: dict) -> list:
        return [s["episodes"], s["evaluated"], s["errored"], s["successes"], s["success_rate"],
                *(s["ci95"] or [None, None]), s["delta_pts"]]

    for i, run in enumerate(result["runs"]):
        for task in result["tasks"]:
            writer.writerow([run["path"], run["label"], task["suite"], task["task_id"], *rate(task["runs"][i])])
        m = result["mcnemar"][i] or {}
        writer.writerow([run["path"], run["label"], "overall", None, *rate(result["overall"][i]),
                         m.get("baseline_only"), m.get("other_only"), m.get("p_value"), run["latency_ms"]["p50"],
                         run["latency_ms"]["p90"], run["memory"].get("peak_rss_mb"),
                         run["memory"].get("cuda_max_allocated_mb")])  # fmt: skip
    return out.getvalue().rstrip("\n")


PLOT_FORMATS = (".png", ".pdf", ".svg")


def plot(result: dict, path: Path) -> None:
    """Grouped bars: success rate per task and overall, one bar per run, Wilson 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [f"{t['suite'].removeprefix('libero_')}/{t['task_id']}" for t in result["tasks"]] + ["overall"]
    per_run = [[t["runs"][i] for t in result["tasks"]] + [result["overall"][i]] for i in range(len(result["runs"]))]
    x, width = np.arange(len(groups)), 0.8 / len(per_run)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * len(per_run)), 4.0))
    for i, (run, summaries) in enumerate(zip(result["runs"], per_run)):
        rates = np.array([s["success_rate"] if s["evaluated"] else np.nan for s in summaries])
        lo = np.array([s["ci95"][0] if s["evaluated"] else np.nan for s in summaries])
        hi = np.array([s["ci95"][1] if s["evaluated"] else np.nan for s in summaries])
        ax.bar(x + (i - (len(per_run) - 1) / 2) * width, rates, width, yerr=[rates - lo, hi - rates], capsize=3,
               label=run["label"])  # fmt: skip
    ax.set_xticks(x, groups, rotation=45 if len(groups) > 8 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (Wilson 95% CI)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files; the first is the baseline")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--plot", type=Path, help="write a grouped bar chart (.png, .pdf or .svg) of the success rates")
    parser.add_argument("--force", action="store_true",
                        help="compare even when the protocols differ or a run has errored episodes (left out)")
    parser.add_argument("--robustness", action="store_true",
                        help="one policy's runs on base and perturbed suites: rows = suites, columns = quant modes")
    args = parser.parse_args(argv)
    if args.robustness and args.plot:
        fail("--plot draws the per-task view; --robustness has no plot")
    if args.plot and args.plot.suffix.lower() not in PLOT_FORMATS:
        fail(f"--plot writes {', '.join(PLOT_FORMATS)}: give a path ending in one of them, got {args.plot}")
    folder = args.plot.parent if args.plot else None
    if folder and not (folder.is_dir() and os.access(folder, os.W_OK)):
        fail(f"--plot {args.plot}: {folder} is not a folder this user can write into")
    try:
        docs = [read_results(path) for path in args.results]
        if not args.force:
            check_errors(args.results, docs)
        if args.robustness:
            from libero_eval import robustness

            return show_robustness(robustness.robustness(args.results, docs, check=not args.force), args.format,
                                   warnings_for(args.results, docs))  # fmt: skip
        if not args.force:
            check_protocols(args.results, docs)
    except (ResultsError, ProtocolMismatch, ErroredEpisodes) as exc:
        fail(str(exc))
    result = compare(args.results, docs)
    for note in result["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(result, indent=1))
    elif args.format == "csv":
        print(render_csv(result))
    else:
        print((render_markdown if args.format == "markdown" else render_table)(grid(result)))
    if args.plot:
        try:
            plot(result, args.plot)
        except OSError as exc:  # e.g. a full disk
            fail(f"cannot write the plot {args.plot}: {exc.strerror or exc}")
        print(f"plot: {args.plot}", file=sys.stderr)


def show_robustness(result: dict, fmt: str, warnings: list[str]) -> None:
    from libero_eval import robustness

    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps({**result, "warnings": warnings}, indent=1))
    elif fmt == "csv":
        print(robustness.render_csv(result))
    else:
        print((render_markdown if fmt == "markdown" else render_table)(robustness.grid(result)))


if __name__ == "__main__":
    main()
