"""openpi's pi0 and pi0.5 PyTorch checkpoints, created by openpi's own config and loader.

openpi is not on PyPI (the name holds an empty 0.0.0 placeholder) and pins its
own stack (JAX, a patched transformers), so it is installed from its repository;
without it these policies say how in one line. ``policy=remote`` reaches an
openpi server instead, from any environment. Its checkpoint loader
(``safetensors.torch.load_model``) is strict, so missing or mismatched weights
fail there rather than leaving random ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from policies.base import ACTION_DIM, ObservationBatch, ObsMode, Policy, file_sha256, resolve_device
from policies.checkpoints import check_sha256, expected_sha256, state_dict_mismatch
from policies.noise import episode_noise
from policies.optional import DependencyUnavailable, import_optional
from policies.scopes import pi0_presets

INSTALL_HINT = (
    "policy {name!r} needs openpi, which is not on PyPI: install it from https://github.com/Physical-Intelligence/openpi "
    "(README: Installation, then PyTorch Support) and this harness into that environment, or serve the checkpoint "
    "with openpi's scripts/serve_policy.py and run policy=remote policy.path=ws://HOST:8000"
)

# Module names inside openpi's PI0Pytorch (paligemma_with_expert.{paligemma,gemma_expert}); the optional
# leading prefix lets the same presets serve a wrapper that keeps the model under another name.
_PREFIX = r"(^|\.)paligemma_with_expert\."
_LLM = _PREFIX + r"paligemma\.model\.language_model\.layers\.\d+\."
_EXPERT = _PREFIX + r"gemma_expert\.model\.layers\.\d+\."
# transformers < 5 nests SigLIP's encoder under vision_model (openpi pins 4.53); 5.x does not.
_VISION = _PREFIX + r"paligemma\.model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\."
_VISION_LINEARS = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)$"
# Never quantized: output heads, pi0.5's adaptive-RMSNorm modulation (.dense), the image projector, and the
# small action/state/time projections around the expert.
_EXCLUDE = [r"lm_head$", r"\.dense$", r"multi_modal_projector", r"(^|\.)(action_in_proj|action_out_proj|state_proj)$",
            r"(^|\.)(time_mlp_in|time_mlp_out|action_time_mlp_in|action_time_mlp_out)$"]  # fmt: skip


def scope_presets() -> dict[str, dict[str, list[str]]]:
    """The pi0 presets on openpi's module names, plus ``vision`` (the SigLIP encoder layers)."""
    return pi0_presets(_LLM, _EXPERT, _EXCLUDE, vision=[_VISION + _VISION_LINEARS])


# torch.compile modes openpi's Pi0Config accepts, plus "none". openpi's own default, max-autotune, took 227 s on a
# cold CPU before the first action; "auto" compiles only on CUDA and without autotuning, which a run of a few
# hundred episodes does not repay.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: str | None, device: str) -> str:
    """The torch.compile mode for ``policy.compile`` (None = auto) on ``device``."""
    if compile in (None, "auto"):
        return "default" if device.startswith("cuda") else "none"
    if compile not in COMPILE_MODES:
        raise ValueError(f"policy.compile={compile!r} is not one of auto, {', '.join(COMPILE_MODES)}")
    return compile


class OpenpiCheckpointError(ValueError):
    """The checkpoint does not fit the openpi config; the message names the directory and the first tensors."""


class OpenpiUnavailable(DependencyUnavailable):
    """openpi, or a module it imports, cannot be imported; the message names which."""


def _openpi(name: str):
    hint, who = INSTALL_HINT.format(name=name), f"policy {name!r}: "
    try:
        policy_config = import_optional("openpi.policies.policy_config", hint, who)
        training_config = import_optional("openpi.training.config", hint, who)
    except DependencyUnavailable as err:
        raise OpenpiUnavailable(str(err)) from None
    return policy_config, training_config


class OpenpiPolicy(Policy):
    """An openpi policy on LIBERO observations (its LIBERO example's keys), with per-episode seeded noise."""

    obs_mode = ObsMode.RGB
    training_config: str  # the openpi training config the checkpoint was trained with

    def __init__(
        self, checkpoint_dir: str | Path, *, device: str, compile: str | None = None, sha256: str | None = None
    ):
        policy_config, training_config = _openpi(self.name)
        self.compile = compile_mode(compile, device)
        self._path = Path(checkpoint_dir)
        weights = self._path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{self._path} has no model.safetensors: only openpi PyTorch checkpoints can be quantized "
                "(convert a JAX one with openpi's examples/convert_jax_model_to_pytorch.py)"
            )
        # Hashed here, before minutes of loading, rather than by the runner afterwards: it is recorded either way.
        self._weights_sha256 = file_sha256(weights)
        check_sha256(str(weights), self._weights_sha256, sha256)
        config = training_config.get_config(self.training_config)
        # openpi wraps sample_actions in torch.compile when it builds the model; this adapter compiles it itself,
        # with dynamic shapes, so batch sizes and (after calibration) quantized layers do not recompile per call.
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, pytorch_compile_mode=None))
        try:
            self._policy = policy_config.create_trained_policy(config, self._path, pytorch_device=device)
        except RuntimeError as err:
            mismatch = state_dict_mismatch(err)
            if mismatch is None:
                raise
            raise OpenpiCheckpointError(
                f"{self._path}/model.safetensors does not fit openpi's {self.training_config!r} model: {mismatch}"
            ) from None
        if self.compile != "none":
            self._policy._sample_actions = torch.compile(self.module.sample_actions, mode=self.compile, dynamic=True)
        self.chunk_size = config.model.action_horizon
        self._noise_shape = (config.model.action_horizon, config.model.action_dim)

    @classmethod
    def from_config(
        cls, path: str | None = None, device: str = "auto", compile: str | None = None, sha256: str | None = None
    ) -> OpenpiPolicy:
        _openpi(cls.name)  # the install hint comes before any complaint about the path
        if path is None:
            raise ValueError(f"policy {cls.name!r} needs policy.path=<openpi PyTorch checkpoint directory>")
        device = resolve_device(device)
        compile_mode(compile, device)  # a bad value before minutes of loading
        return cls(path, device=device, compile=compile, sha256=expected_sha256(sha256))

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        noise = episode_noise(batch.episode_seeds, batch.steps, self._noise_shape).numpy()
        chunks = []
        for row in range(len(batch)):
            element = {
                "observation/image": batch.images["agentview"][row],
                "observation/wrist_image": batch.images["wrist"][row],
                "observation/state": batch.state[row],
                "prompt": batch.instructions[row],
            }
            actions = self._policy.infer(element, noise=noise[row])["actions"]
            chunks.append(np.asarray(actions, dtype=np.float32)[:, :ACTION_DIM])
        return np.stack(chunks)

    @property
    def module(self) -> torch.nn.Module:
        return self._policy._model  # openpi's Policy keeps its PyTorch model (and _sample_actions) with no accessor

    @property
    def checkpoint(self) -> str:
        return str(self._path)

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        return scope_presets()

    def describe(self) -> dict:
        return {"openpi_config": self.training_config, "chunk_size": self.chunk_size, "compile": self.compile,
                "weights_sha256": self._weights_sha256,
                "noise_shape": list(self._noise_shape), "params": sum(p.numel() for p in self.module.parameters())}  # fmt: skip


class OpenpiPi05(OpenpiPolicy):
    name = "openpi_pi05"
    training_config = "pi05_libero"


class OpenpiPi0(OpenpiPolicy):
    name = "openpi_pi0"
    training_config = "pi0_libero"
