"""The harness's own state-based VLA-shaped policy, runnable offline on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from policies.base import ACTION_DIM, ObservationBatch, ObsMode, Policy, file_sha256, resolve_device
from policies.checkpoints import check_sha256, expected_sha256
from policies.embedded.model import EmbeddedVLA, load_weights, require_weights_file
from policies.embedded.text import InstructionEncoder
from policies.noise import episode_noise
from policies.scopes import pi0_presets

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "model.safetensors"

_LAYER = r"(^|\.){stack}\.layers\.\d+\."  # also matches when the model sits under a prefix
_NOT_IN_STACKS = [r"(^|\.)(action_in_proj|action_out_proj|time_mlp_in|time_mlp_out|text_proj|state_proj|pose_proj)$"]


class EmbeddedPolicy(Policy):
    """Flow-matching policy over proprio state, object poses and a sentence embedding of the instruction."""

    name = "embedded"
    obs_mode = ObsMode.STATE
    chunk_size = 10

    def __init__(self, weights: str | Path | None = None, *, device: str = "cpu", sha256: str | None = None):
        """``sha256``, when given, must be the weights file's; the ``weights_sha256`` of a ``recipe.json`` beside
        the file (the shipped weights have one, as has every ``train_embedded_policy.py --out``) is checked too."""
        self._path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        if self._path.is_dir():  # what train_embedded_policy.py --out wrote
            self._path = self._path / DEFAULT_WEIGHTS.name
        recipe_path = self._path.with_name("recipe.json")
        self._recipe: dict | None = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
        require_weights_file(self._path)
        self._sha256 = file_sha256(self._path)  # checked before loading: damaged weights are never parsed
        check_sha256(str(self._path), self._sha256, (self._recipe or {}).get("weights_sha256"), str(recipe_path))
        check_sha256(str(self._path), self._sha256, sha256)
        self._model: EmbeddedVLA = load_weights(self._path).to(device)
        if self._model.config.horizon != self.chunk_size:
            horizon = self._model.config.horizon
            raise ValueError(f"{self._path} predicts {horizon} actions per chunk, not {self.chunk_size}")
        self._device = torch.device(device)
        self._encoder = InstructionEncoder()

    @classmethod
    def from_config(cls, path: str | None = None, device: str = "auto", sha256: str | None = None) -> EmbeddedPolicy:
        return cls(path, device=resolve_device(device), sha256=expected_sha256(sha256))

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        if batch.object_poses is None:
            raise ValueError("the embedded policy reads object poses: build the env in 'state' observation mode")
        text = self._encoder(batch.instructions)
        noise = episode_noise(batch.episode_seeds, batch.steps, (self.chunk_size, ACTION_DIM))
        state = torch.as_tensor(batch.state, dtype=torch.float32)
        poses = torch.as_tensor(batch.object_poses, dtype=torch.float32)
        tensors = [x.to(self._device) for x in (text, state, poses, noise)]
        with torch.inference_mode():
            actions = self._model.sample_actions(*tensors)
        return actions.clamp(-1.0, 1.0).cpu().numpy()

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    @property
    def checkpoint(self) -> str:
        return str(self._path)

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        return pi0_presets(_LAYER.format(stack="backbone"), _LAYER.format(stack="expert"), _NOT_IN_STACKS)

    def describe(self) -> dict:
        c = self._model.config
        return {
            "params": sum(p.numel() for p in self._model.parameters()),
            "backbone": {"width": c.width, "mlp_dim": c.mlp_dim, "depth": c.depth},
            "expert": {"width": c.expert_width, "mlp_dim": c.expert_mlp_dim, "depth": c.expert_depth},
            "heads": c.heads,
            "horizon": c.horizon,
            "denoising_steps": c.num_steps,
            "text_encoder": "all-MiniLM-L6-v2",
            "weights_sha256": self._sha256,
            "recipe": self._recipe,
        }
