"""Set-up for the lerobot tests. They run in .venv-lerobot (`make test-lerobot`), never in the project venv,
which has transformers 5 (pyproject's norecursedirs keeps a plain ``pytest`` out of this folder)."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("lerobot") is None:
    raise ImportError(
        "tests/lerobot_adapter needs lerobot and transformers<5: run it in .venv-lerobot (make test-lerobot)"
    )

from torchvision_shim import import_torchvision

import_torchvision()

from tiny_smolvla import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random SmolVLA saved by lerobot, laid out as a hub checkpoint with its tokenizer copied beside it."""
    return build_checkpoint(tmp_path_factory.mktemp("lerobot"))
