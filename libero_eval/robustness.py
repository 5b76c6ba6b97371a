"""``libero-eval-compare --robustness``: success on LIBERO-PRO's perturbed suites against their base suites.

Rows are suites (each base suite, then its perturbations), columns are the runs' quant modes (one policy). A cell
is the suite's success with its Wilson 95% interval; on a perturbed suite, with the drop from the base suite in
points at the same quant mode. For every quant mode after the first, the same suite's runs are paired by episode
(task, init state) for the exact McNemar test against the first mode, as in the per-task view.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from libero_eval.compare import ProtocolMismatch, check_protocols, mcnemar, outcomes, quant_tag, rate_cell
from libero_eval.results import rate_summary
from libero_eval.suites import BASE_SUITES, PERTURBATIONS, base_suite


def suite_order(suite: str) -> tuple:
    """Base suites in LIBERO's order, each followed by its perturbations in LIBERO-PRO's order; others last."""
    base = base_suite(suite)
    family = BASE_SUITES.index(base) if base in BASE_SUITES else len(BASE_SUITES)
    kind = suite.removeprefix(f"{base}_")
    kind = 0 if suite == base else PERTURBATIONS.index(kind) + 1 if kind in PERTURBATIONS else len(PERTURBATIONS) + 1
    return family, base, kind, suite


def runs_by_suite(paths: list[Path], docs: list[dict], check: bool = True) -> tuple[list[str], list[str], dict]:
    """The suites (rows), the quant modes (columns) and each (suite, quant)'s run; refuses (ProtocolMismatch) files
    of several policies, two files of one suite and quant mode (merge shards first), and with ``check`` a base
    suite's family whose runs differ in protocol beyond the suite."""
    policies = {doc["policy"]["name"] for doc in docs}
    if len(policies) > 1:
        raise ProtocolMismatch(f"--robustness compares one policy's runs; got {', '.join(sorted(policies))}")
    runs: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path, doc in zip(paths, docs):
        key = (doc["protocol"]["suite"], quant_tag(doc))
        if key in runs:
            raise ProtocolMismatch(f"{runs[key][0]} and {path} are both {key[1]} on {key[0]}; merge shards first")
        runs[key] = (path, doc)
    for base in {base_suite(suite) for suite, _ in runs} if check else ():
        family = [runs[k] for k in sorted(runs) if base_suite(k[0]) == base]
        check_protocols([p for p, _ in family], [d for _, d in family], ignore=("suite",))
    suites = sorted({suite for suite, _ in runs}, key=suite_order)
    quants = list(dict.fromkeys(quant for _, quant in runs))
    return suites, quants, {key: doc for key, (_, doc) in runs.items()}


def robustness(paths: list[Path], docs: list[dict], check: bool = True) -> dict:
    """The view as data (``--format json`` prints it as is)."""
    suites, quants, runs = runs_by_suite(paths, docs, check)
    rows = []
    for suite in suites:
        base = base_suite(suite)
        cells = []
        for i, quant in enumerate(quants):
            doc = runs.get((suite, quant))
            cell = {"quant": quant, **rate_summary(doc["episodes"] if doc else [])}
            base_doc = runs.get((base, quant))
            base_rate = rate_summary(base_doc["episodes"])["success_rate"] if base_doc and base != suite else None
            rates = (cell["success_rate"], base_rate)
            cell["drop_pts"] = (rates[0] - rates[1]) * 100 if None not in rates else None
            first = runs.get((suite, quants[0]))
            cell["mcnemar"] = mcnemar(outcomes(first), outcomes(doc)) if i and doc and first else None
            cells.append(cell)
        rows.append({"suite": suite, "base": base, "cells": cells})
    return {"policy": docs[0]["policy"]["name"], "quants": quants, "rows": rows}


def grid(result: dict) -> list[list[str]]:
    """Rows of cells: the suite, one column per quant mode, one McNemar column per later quant mode."""
    quants = result["quants"]
    rows = [[f"suite ({result['policy']})", *quants, *(f"{q} vs {quants[0]} (McNemar)" for q in quants[1:])]]
    for row in result["rows"]:
        cells = [rate_cell(c) + (f", {c['drop_pts']:+.1f} pts vs base" if c["drop_pts"] is not None else "")
                 for c in row["cells"]]  # fmt: skip
        tests = [f"b={m['baseline_only']} c={m['other_only']} of {m['shared']}, p={m['p_value']:.3g}" if m else "-"
                 for m in (c["mcnemar"] for c in row["cells"][1:])]  # fmt: skip
        rows.append([row["suite"], *cells, *tests])
    return rows


def render_csv(result: dict) -> str:
    """One row per suite and quant mode, numbers as numbers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["suite", "base_suite", "quant", "episodes", "evaluated", "errored", "successes", "success_rate",
                     "ci95_low", "ci95_high", "drop_pts", "mcnemar_b", "mcnemar_c", "mcnemar_p"])  # fmt: skip
    for row in result["rows"]:
        for c in row["cells"]:
            m = c["mcnemar"] or {}
            writer.writerow([row["suite"], row["base"], c["quant"], c["episodes"], c["evaluated"], c["errored"],
                             c["successes"], c["success_rate"], *(c["ci95"] or [None, None]), c["drop_pts"],
                             m.get("baseline_only"), m.get("other_only"), m.get("p_value")])  # fmt: skip
    return out.getvalue().rstrip("\n")

