"""Set-up for the lerobot tests. They run in .venv-lerobot (`make test-lerobot`, Python 3.12), never in the
project venv, which has no lerobot (pyproject's norecursedirs keeps a plain ``pytest`` out of this folder)."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("lerobot") is None:
    raise ImportError(
        "tests/lerobot_adapter needs lerobot >= 0.5 (Python >= 3.12): run it in .venv-lerobot (make test-lerobot)"
    )

import tiny_pi
from tiny_smolvla import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random SmolVLA saved by lerobot, laid out as a hub checkpoint with its tokenizer copied beside it."""
    return build_checkpoint(tmp_path_factory.mktemp("lerobot"))


@pytest.fixture(scope="session")
def pi05_checkpoint(tmp_path_factory):
    """A tiny random pi0.5 saved by lerobot (sizes in tiny_pi.py), laid out as a hub checkpoint."""
    return tiny_pi.build_checkpoint(tmp_path_factory.mktemp("lerobot_pi05"), "pi05")


@pytest.fixture(scope="session")
def pi0_checkpoint(tmp_path_factory):
    """A tiny random pi0 saved by lerobot (sizes in tiny_pi.py), laid out as a hub checkpoint."""
    return tiny_pi.build_checkpoint(tmp_path_factory.mktemp("lerobot_pi0"), "pi0")
