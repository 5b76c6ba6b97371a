"""What the tiny checkpoints share: LIBERO's features and normalization stats, and the hub checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE = 256  # lerobot's LIBERO datasets store 256 x 256 frames; the harness renders 224: the adapter resizes


def libero_features() -> tuple[dict, dict]:
    """Input and output features of a lerobot LIBERO checkpoint: two cameras, the 8-value state, 7 actions."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    camera = PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE))
    inputs = {"observation.images.image": camera, "observation.images.image2": camera,
              "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,))}  # fmt: skip
    return inputs, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))}


def libero_stats() -> dict:
    """Stats for every normalization mode (mean/std for SmolVLA, quantiles for pi0.5)."""
    def stats(n: int) -> dict:
        return {"mean": np.full(n, 0.1, np.float32), "std": np.full(n, 0.5, np.float32),
                "min": np.full(n, -1.0, np.float32), "max": np.full(n, 1.0, np.float32),
                "q01": np.full(n, -0.9, np.float32), "q99": np.full(n, 0.9, np.float32)}  # fmt: skip

    return {"observation.state": stats(8), "action": stats(7)}


def name_hub_tokenizer(ckpt: Path, hub_name: str) -> None:
    """Make the saved preprocessor name the hub tokenizer, as a downloaded checkpoint's does."""
    path = ckpt / "policy_preprocessor.json"
    pre = json.loads(path.read_text())
    for step in pre["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = hub_name
    path.write_text(json.dumps(pre, indent=2))
