"""The one interface every policy implements, and the observation it consumes.

A policy maps a batch of observations to a batch of action chunks. The batch is
built by the runner from one or more simulators; a policy never touches a
simulator itself, so the same policy runs in-process, in a worker pool, or
behind a server.
"""

from __future__ import annotations

import abc
import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ACTION_DIM = 7  # OSC_POSE delta (xyz, axis-angle) + gripper (-1 open, +1 close)
STATE_DIM = 8  # eef position (3) + eef axis-angle (3) + gripper qpos (2)
POSE_DIM = 7  # object position (3) + quaternion xyzw (4)


class ObsMode(str, enum.Enum):
    """What a policy needs to see; the env is built accordingly."""

    RGB = "rgb"  # agentview + wrist cameras, as VLA policies need
    STATE = "state"  # no cameras: proprio + poses of the task's objects of interest


@dataclass
class ObservationBatch:
    """B observations, one per running episode, already in the policy's protocol.

    ``state`` is always present. ``images`` is filled in ``rgb`` mode (uint8,
    [B, H, W, 3], rotated 180 degrees and padded-resized). ``object_poses`` is
    filled in ``state`` mode with the poses of each task's objects of interest
    in the order the task's bddl lists them ([B, K, 7]). Tasks of one suite
    differ in K (libero_goal 1-2, libero_10 2-4, libero_90 1-3), so the
    runner batches only rows with the same K.
    """

    state: np.ndarray  # [B, STATE_DIM] float32
    instructions: list[str]
    episode_ids: list[str]  # unique per running episode; stateful policies key on it
    episode_seeds: list[int]  # seeds the policy's own noise for that episode
    steps: list[int]  # env step of each row (after the wait), for step-keyed noise
    images: dict[str, np.ndarray] = field(default_factory=dict)
    object_poses: np.ndarray | None = None
    object_names: list[list[str]] | None = None

    def __post_init__(self) -> None:
        b = len(self.state)
        lengths = {len(self.instructions), len(self.episode_ids), len(self.episode_seeds), len(self.steps)}
        if lengths != {b}:
            raise ValueError(f"ObservationBatch rows disagree: state has {b}, per-row lists have {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.state)


class Policy(abc.ABC):
    """A policy: observations in, action chunks out.

    Subclasses set ``name``, ``obs_mode`` and ``chunk_size`` and implement
    :meth:`predict`. A policy whose weights live in a ``torch.nn.Module``
    exposes it as :attr:`module` so ``duquant`` can quantize it in place.
    """

    name: str
    obs_mode: ObsMode
    chunk_size: int

    @classmethod
    def from_config(cls, path: str | None = None, device: str = "auto") -> "Policy":
        """Build from the ``policy`` config; policies with weights override this."""
        if path is not None:
            raise ValueError(f"policy {cls.name!r} takes no checkpoint path (got {path!r})")
        return cls()

    @abc.abstractmethod
    def predict(self, batch: ObservationBatch) -> np.ndarray:
        """Return action chunks of shape [B, chunk_size, ACTION_DIM]."""

    def reset(self) -> None:
        """Forget every per-episode state; called once before a run.

        Episodes of one run overlap (a batch holds rows of several), so a
        stateful policy keys its state on ``episode_ids`` and starts an
        episode's state afresh at its first call (``steps`` 0): an id can come
        back, when an episode is rerun.
        """

    @property
    def module(self) -> torch.nn.Module | None:
        return None

    @property
    def checkpoint(self) -> str | None:
        """Path of the weights this policy was loaded from, if any."""
        return None

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        """Named layer selections for quantization: {preset: {"include": [...], "exclude": [...]}}."""
        return {}

    def describe(self) -> dict:
        """Facts about the loaded policy worth recording in results."""
        return {}


class PolicyWrapper(Policy):
    """A policy around another one (calibration, noise, recording): everything it does not override is the inner
    policy's, so a wrapper never forgets an attribute a caller needs."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.name, self.obs_mode, self.chunk_size = inner.name, inner.obs_mode, inner.chunk_size

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        return self.inner.predict(batch)

    def reset(self) -> None:
        self.inner.reset()

    @property
    def module(self) -> torch.nn.Module | None:
        return self.inner.module

    @property
    def checkpoint(self) -> str | None:
        return self.inner.checkpoint

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        return self.inner.scope_presets()

    def describe(self) -> dict:
        return self.inner.describe()


def collate(rows: list[dict], instructions, episode_ids, episode_seeds, steps) -> ObservationBatch:
    """Stack per-env observation dicts (as ``LiberoEnv.observation`` returns them) into a batch."""
    first = rows[0]
    return ObservationBatch(
        state=np.stack([r["state"] for r in rows]),
        instructions=list(instructions),
        episode_ids=list(episode_ids),
        episode_seeds=list(episode_seeds),
        steps=list(steps),
        images={k: np.stack([r["images"][k] for r in rows]) for k in first.get("images", {})},
        object_poses=np.stack([r["object_poses"] for r in rows]) if "object_poses" in first else None,
        object_names=[r["object_names"] for r in rows] if "object_names" in first else None,
    )


def weights_sha256(path: str | None) -> str | None:
    """sha256 of a checkpoint file, or of a directory's safetensors files in name order."""
    if path is None:
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.safetensors"))
    digest = hashlib.sha256()
    for file in files:
        _hash_into(digest, file)
    return digest.hexdigest() if files else None


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when there is one, else the CPU; any other name is kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def recorded_weights_sha256(checkpoint: str | None, described: dict) -> str | None:
    """The weights' sha256 for a record: the one ``describe()`` gives (the policy hashed what it loaded), else the
    checkpoint's, so a multi-GB checkpoint is read once, not once by the policy and again by the runner."""
    return described["weights_sha256"] if "weights_sha256" in described else weights_sha256(checkpoint)


def file_sha256(path: str | Path) -> str:
    """sha256 of one file, read in blocks (datasets and weights can be large)."""
    return _hash_into(hashlib.sha256(), Path(path)).hexdigest()


def _hash_into(digest, file: Path):
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest
