"""LeRobot checkpoints (SmolVLA, pi0, pi0.5), built by lerobot's own classes and processor pipelines, offline.

A LeRobot checkpoint directory holds ``config.json`` (the policy config, with its input and output features),
``model.safetensors`` and, since lerobot 0.4, the pre/post processor pipelines (``policy_preprocessor.json``,
``policy_postprocessor.json`` and the normalization stats beside them). lerobot's loaders forgive too much to
trust: SmolVLA's ``from_pretrained`` loads non-strictly (missing tensors stay random, with a log line) and
pi0/pi0.5 return a random model when the file is absent. So this adapter checks the file against the loaded
model itself and refuses a mismatch.

Nothing reaches the Hugging Face hub: the tokenizer (and, for SmolVLA, the VLM's config and processor files,
no weights) come from a local directory: the one given, else ``<checkpoint>/tokenizer/``, else the checkpoint's
configured name when it is a local directory; a hub name is an error that says where to put the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from policies.base import ACTION_DIM, STATE_DIM, ObservationBatch, ObsMode, Policy, file_sha256, resolve_device
from policies.checkpoints import check_sha256, expected_sha256, listed_names, state_dict_mismatch
from policies.noise import episode_noise
from policies.openpi_policy import scope_presets as openpi_scope_presets
from policies.optional import DependencyUnavailable, import_optional
from policies.scopes import pi0_presets

INSTALL_HINT = (
    "policy {name!r} needs lerobot >= 0.5, which needs Python >= 3.12: pip install -e '.[lerobot]' in a Python 3.12 "
    "environment, or `make install-lerobot`, which builds .venv-lerobot"
)
TOKENIZER_DIR = "tokenizer"  # <checkpoint>/tokenizer: the local copy of the tokenizer the checkpoint names
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
STATE_KEY = "observation.state"

# The harness's cameras under the names LIBERO checkpoints give them: lerobot's LIBERO env (image, image2),
# robosuite's raw observation keys, openpi's LIBERO keys, and the harness's own.
CAMERAS = {
    "image": "agentview", "agentview_image": "agentview", "base_0_rgb": "agentview", "agentview": "agentview",
    "image2": "wrist", "robot0_eye_in_hand_image": "wrist", "left_wrist_0_rgb": "wrist", "wrist_image": "wrist",
    "wrist": "wrist",
}  # fmt: skip

# SmolVLA (lerobot's SmolVLMWithExpertModel under model.vlm_with_expert): the SmolVLM text model, the action
# expert (its cross-attention layers' k/v projections read the VLM's keys, so their shapes differ), SigLIP.
_SMOL = r"(^|\.)vlm_with_expert\."
_SMOL_LLM = _SMOL + r"vlm\.model\.text_model\.layers\.\d+\."
_SMOL_EXPERT = _SMOL + r"lm_expert\.layers\.\d+\."
_SMOL_VISION = (
    _SMOL + r"vlm\.model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)$"
)
_SMOL_EXCLUDE = [r"lm_head$", r"\.connector\.", r"(^|\.)(state_proj|action_in_proj|action_out_proj)$",
                 r"(^|\.)(action_time_mlp_in|action_time_mlp_out)$"]  # fmt: skip


class LeRobotUnavailable(DependencyUnavailable):
    """lerobot, or a module it imports, cannot be imported; the message names which, or says how to install it."""


class LeRobotCheckpointError(ValueError):
    """The checkpoint directory cannot be run as it is; the message names it and says why."""


def _lerobot(name: str):
    # lerobot reads the hub setting when it is imported; this process never downloads.
    os.environ["HF_HUB_OFFLINE"] = "1"
    hint, who = INSTALL_HINT.format(name=name), f"policy {name!r}: "
    try:
        configs = import_optional("lerobot.configs.policies", hint, who)
        factory = import_optional("lerobot.policies.factory", hint, who)
    except DependencyUnavailable as err:
        raise LeRobotUnavailable(str(err)) from None
    return configs.PreTrainedConfig, factory.get_policy_class, factory.make_pre_post_processors


class LeRobotPolicy(Policy):
    """A LeRobot policy on LIBERO observations: lerobot's processors in, ``predict_action_chunk`` with seeded noise.

    The harness's observations are what lerobot's LIBERO env processor feeds its policies: both cameras rotated
    180 degrees, the 8-value state (eef position, eef axis-angle, gripper qpos). Images are resized to the
    resolution of the checkpoint's input features when ``protocol.image_size`` differs. The chunk is the first
    ``n_action_steps`` of the ``chunk_size`` actions the model predicts, as lerobot executes them.

    Reproducible: the flow-matching noise is a function of (episode seed, step) only, passed to
    ``predict_action_chunk``, and the call keeps no state between batches (no action queue), so reruns of a
    config agree. Not reproducible bit for bit across batch layouts (a batched matmul rounds differently).
    """

    obs_mode = ObsMode.RGB
    policy_type: str  # lerobot's name for the family, the ``type`` in the checkpoint's config.json

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        device: str,
        tokenizer: str | Path | None = None,
        sha256: str | None = None,
    ):
        PreTrainedConfig, get_policy_class, make_pre_post_processors = _lerobot(self.name)
        self._path = Path(checkpoint_dir)
        weights = self._path / "model.safetensors"
        if not weights.is_file():
            raise LeRobotCheckpointError(f"{self._path} has no model.safetensors: refusing to run random weights")
        self._weights_sha256 = file_sha256(weights)  # before loading, so a refused checkpoint costs no load
        check_sha256(str(weights), self._weights_sha256, sha256)
        kind = (_load_json(self._path / "config.json") or {}).get("type")
        if kind is None:
            raise LeRobotCheckpointError(
                f"{self._path} has no config.json naming a policy type: not a LeRobot checkpoint"
            )
        if kind != self.policy_type:
            raise LeRobotCheckpointError(
                f"{self._path} is a lerobot {kind!r} checkpoint, not {self.policy_type!r}: use policy=lerobot_{kind}"
            )
        config = PreTrainedConfig.from_pretrained(self._path)
        saved = _load_json(self._path / PREPROCESSOR)
        renames = (_step_config(saved, "rename_observations_processor") or {}).get("rename_map", {})
        self._cameras, self._resolution = _map_features(self._path, config, renames)
        self._tokenizer = _tokenizer_dir(self._path, tokenizer, self._configured_tokenizer(config, saved))
        self._prepare_config(config, self._tokenizer)
        config.device = device
        self._config = config
        self._policy = _load_checked(get_policy_class(config.type), self._path, config)
        self._pre, self._post = self._processors(make_pre_post_processors, config, saved, device)
        self._action_dim = config.output_features["action"].shape[0]
        if self._action_dim < ACTION_DIM:
            raise LeRobotCheckpointError(
                f"{self._path} predicts {self._action_dim} action values, LIBERO needs {ACTION_DIM}"
            )
        self.chunk_size = config.n_action_steps
        self._noise_shape = (config.chunk_size, config.max_action_dim)
        self._device = torch.device(device)

    @classmethod
    def from_config(
        cls, path: str | None = None, device: str = "auto", tokenizer: str | None = None, sha256: str | None = None
    ) -> LeRobotPolicy:
        _lerobot(cls.name)  # the install hint comes before any complaint about the path
        if path is None:
            raise ValueError(f"policy {cls.name!r} needs policy.path=<LeRobot checkpoint directory>")
        return cls(path, device=resolve_device(device), tokenizer=tokenizer, sha256=expected_sha256(sha256))

    def _configured_tokenizer(self, config, saved: dict | None) -> str:
        """The tokenizer the checkpoint names (a hub id or a local path)."""
        step = _step_config(saved, "tokenizer_processor")
        if step is None or "tokenizer_name" not in step:
            raise LeRobotCheckpointError(
                f"{self._path} has no saved tokenizer_processor step in {PREPROCESSOR}: lerobot would build "
                f"the {self.policy_type} tokenizer from the hub"
            )
        return step["tokenizer_name"]

    def _prepare_config(self, config, tokenizer: Path) -> None:
        """Point the config at local files before lerobot builds the model."""

    def _processors(self, make_pre_post_processors, config, saved: dict | None, device: str):
        if saved is None:  # an older checkpoint: lerobot builds the pipelines from the config, without stats
            self._processor_source = "built from config.json (no normalization stats)"
            return make_pre_post_processors(config)
        self._processor_source = "saved in the checkpoint"
        steps = {step["registry_name"] for step in saved["steps"]}
        overrides = {
            "tokenizer_processor": {"tokenizer_name": str(self._tokenizer)},
            "device_processor": {"device": device},
        }
        return make_pre_post_processors(
            config, pretrained_path=str(self._path),
            preprocessor_overrides={name: value for name, value in overrides.items() if name in steps},
        )  # fmt: skip

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        obs: dict = {key: _images(batch.images[camera], self._resolution[key]) for key, camera in self._cameras.items()}
        obs[STATE_KEY] = torch.as_tensor(batch.state, dtype=torch.float32)
        obs["task"] = list(batch.instructions)
        noise = episode_noise(batch.episode_seeds, batch.steps, self._noise_shape).to(self._device)
        with torch.inference_mode():
            actions = self._policy.predict_action_chunk(self._pre(obs), noise=noise)
            actions = self._post(actions)
        return actions[:, : self.chunk_size, :ACTION_DIM].float().cpu().numpy()

    def reset(self) -> None:
        self._policy.reset()

    @property
    def module(self) -> torch.nn.Module:
        return self._policy

    @property
    def checkpoint(self) -> str:
        return str(self._path)

    def describe(self) -> dict:
        config = self._config
        return {
            "lerobot_type": config.type, "weights_sha256": self._weights_sha256,
            "checkpoint_chunk_size": config.chunk_size, "n_action_steps": config.n_action_steps,
            "chunk_size": self.chunk_size, "action_dim": self._action_dim, "noise_shape": list(self._noise_shape),
            "cameras": self._cameras, "image_resolution": {k: list(v) for k, v in self._resolution.items()},
            "flip": "both cameras rotated 180 degrees, as lerobot's LIBERO processor feeds its policies",
            "state": f"{STATE_KEY}: eef position, eef axis-angle, gripper qpos ({STATE_DIM})",
            "tokenizer": str(self._tokenizer), "processors": self._processor_source,
            "params": sum(p.numel() for p in self._policy.parameters()),
        }  # fmt: skip


class LeRobotSmolVLA(LeRobotPolicy):
    name = "lerobot_smolvla"
    policy_type = "smolvla"

    def _configured_tokenizer(self, config, saved: dict | None) -> str:
        return config.vlm_model_name  # the model reads the VLM's config and processor from here, too

    def _prepare_config(self, config, tokenizer: Path) -> None:
        # Every weight, the VLM's included, is in model.safetensors: never fetch the VLM's own.
        config.vlm_model_name, config.load_vlm_weights = str(tokenizer), False

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        return smolvla_scope_presets()

    def describe(self) -> dict:
        return {**super().describe(), "model_image_size": list(self._config.resize_imgs_with_padding or [])}


class _LeRobotPi(LeRobotPolicy):
    """lerobot's port of openpi's pi0 and pi0.5: the same module tree under ``model.``, so openpi's presets."""

    def scope_presets(self) -> dict[str, dict[str, list[str]]]:
        return pi_scope_presets()

    def describe(self) -> dict:
        return {**super().describe(), "model_image_size": list(self._config.image_resolution)}


class LeRobotPi05(_LeRobotPi):
    name = "lerobot_pi05"
    policy_type = "pi05"


class LeRobotPi0(_LeRobotPi):
    name = "lerobot_pi0"
    policy_type = "pi0"


def smolvla_scope_presets() -> dict[str, dict[str, list[str]]]:
    """The pi0 presets on SmolVLA's module names, plus ``vision`` (the SigLIP encoder layers)."""
    return pi0_presets(_SMOL_LLM, _SMOL_EXPERT, _SMOL_EXCLUDE, vision=[_SMOL_VISION])


def pi_scope_presets() -> dict[str, dict[str, list[str]]]:
    """openpi's presets: they match ``paligemma_with_expert.`` under any prefix, lerobot's ``model.`` included."""
    return openpi_scope_presets()


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _step_config(pipeline: dict | None, registry_name: str) -> dict | None:
    steps = [] if pipeline is None else pipeline["steps"]
    return next((step.get("config", {}) for step in steps if step.get("registry_name") == registry_name), None)


def _tokenizer_dir(checkpoint: Path, given: str | Path | None, configured: str) -> Path:
    if given is not None:
        if not Path(given).is_dir():
            raise LeRobotCheckpointError(f"tokenizer directory {given} does not exist")
        return Path(given)
    for candidate in (checkpoint / TOKENIZER_DIR, Path(configured)):
        if candidate.is_dir():
            return candidate
    raise LeRobotCheckpointError(
        f"{checkpoint} names the hub model {configured!r} for its tokenizer and nothing is downloaded here: "
        f"copy that model's tokenizer and config files (no weights) into {checkpoint / TOKENIZER_DIR}"
    )


def _load_checked(policy_class, path: Path, config):
    """lerobot's ``from_pretrained``, then the file compared with what was loaded (lerobot only logs a mismatch)."""
    try:
        policy = policy_class.from_pretrained(path, config=config)
    except RuntimeError as err:  # torch's load_state_dict refuses shape mismatches whatever ``strict`` says
        mismatch = state_dict_mismatch(err)
        if mismatch is None:
            raise
        raise LeRobotCheckpointError(f"{path}/model.safetensors does not fit its config.json: {mismatch}") from None
    _verify_weights(policy, path)
    return policy


def _verify_weights(policy: torch.nn.Module, path: Path) -> None:
    """Every tensor of the model from the file, at its shape and equal to it, and nothing in the file unused.

    pi0/pi0.5's ``from_pretrained`` catches any loading error, prints it and returns the random model, so this
    comparison is what refuses a checkpoint that did not load. safetensors stores tied tensors once (transformers'
    tied embeddings), so a model tensor absent from the file is fine when it shares storage with one in it.
    pi0/pi0.5 rename the file's keys while loading; the same renaming is applied here. The file is read one
    tensor at a time, so a full-size checkpoint is never held twice.
    """
    from safetensors import safe_open

    state = policy.state_dict()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = {key: _loaded_as(policy, key, tuple(f.get_slice(key).get_shape())) for key in f.keys()}  # noqa: SIM118
        loaded = {name: key for key, targets in names.items() for name in targets}
        unexpected = [name for name in loaded if name not in state]
        resized = [name for name in loaded if name in state and tuple(state[name].shape) != names[loaded[name]][name]]
        differ = [name for name in loaded if name in state and name not in resized
                  and not torch.equal(f.get_tensor(loaded[name]).to(state[name].dtype), state[name].cpu())]  # fmt: skip
    in_file = {_storage(state[key]) for key in state if key in loaded}
    missing = [key for key in state if key not in loaded and _storage(state[key]) not in in_file]
    problems = (("lacks", missing), ("has unexpected", unexpected), ("has wrong shapes for", resized),
                ("was not loaded into the model: it differs in", differ))  # fmt: skip
    for problem, keys in problems:
        if keys:
            listed = listed_names(f"{len(keys)} tensors", keys)
            raise LeRobotCheckpointError(f"{path}/model.safetensors {problem} {listed}")


def _loaded_as(policy: torch.nn.Module, key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The state-dict names (with their shapes) that lerobot loads the file's ``key`` into."""
    if not hasattr(policy, "_fix_pytorch_state_dict_keys"):  # SmolVLA loads the file's names as they are
        return {key: shape}
    # pi0/pi0.5: openpi's key fixes (renames, skips, lm_head copied to the embeddings), then the "model." prefix
    fixed = policy._fix_pytorch_state_dict_keys({key: torch.empty(shape, device="meta")}, policy.config)
    return {name if name.startswith("model.") else f"model.{name}": tuple(t.shape) for name, t in fixed.items()}


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _map_features(path: Path, config, renames: dict[str, str]) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Incoming key -> harness camera, and each image key's resolution, from the checkpoint's input features.

    ``renames`` is the saved preprocessor's first step (incoming key -> feature name): the keys fed in are the
    ones before it.
    """
    incoming = {feature: key for key, feature in renames.items()}
    cameras, resolution, unmatched = {}, {}, []
    for feature, spec in config.input_features.items():
        key, kind = incoming.get(feature, feature), spec.type.name
        camera = CAMERAS.get(key.rsplit(".", 1)[-1]) if key.startswith("observation.images.") else None
        if kind == "VISUAL" and camera is not None:
            cameras[key], resolution[key] = camera, tuple(spec.shape[-2:])
        elif not (kind == "STATE" and key == STATE_KEY and tuple(spec.shape) == (STATE_DIM,)):
            unmatched.append(f"{feature} ({kind} {list(spec.shape)})")
    if unmatched or not cameras:
        features = ", ".join(
            f"{name} ({spec.type.name} {list(spec.shape)})" for name, spec in config.input_features.items()
        )
        targets = ", ".join(unmatched) or "no camera"
        raise LeRobotCheckpointError(
            f"{path}: cannot feed LIBERO's cameras and {STATE_DIM}-value state to {targets}; "
            f"the checkpoint's input features: {features}"
        )
    return cameras, resolution


def _images(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, h, w] in [0, 1], as lerobot's env processor hands images to policies."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x
