"""Makes torchvision importable in this environment's lerobot test venv; test set-up only, never product code.

lerobot imports torchvision for pure-Python transforms, and the only torchvision wheels this environment reaches
are CUDA builds whose compiled ops do not load beside the CPU torch; their meta registrations then fail on
``torchvision::nms``. Only then are the two missing op schemas defined (no kernels) and the import retried. A
torchvision built for the installed torch imports on the first try and nothing is defined.
"""

from __future__ import annotations

import sys

import torch

_schemas: torch.library.Library | None = None  # kept alive: the definitions last as long as the library object


def import_torchvision() -> None:
    global _schemas
    try:
        import torchvision
    except RuntimeError:  # "operator torchvision::nms does not exist": a CUDA build of torchvision on CPU torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _schemas = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
