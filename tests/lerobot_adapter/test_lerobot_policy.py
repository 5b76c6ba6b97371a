"""policy=lerobot_smolvla on a tiny random SmolVLA saved by lerobot: loading, refusals, DuQuant, a LIBERO run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_runner import make_run
from tiny_smolvla import HUB_VLM, LAYERS, N_ACTION_STEPS, build_checkpoint

from libero_eval import CalibratingPolicy, dry_run_report
from policies import make_policy
from policies.base import ObservationBatch, file_sha256
from policies.lerobot_policy import LeRobotCheckpointError, _verify_weights


def observations(seeds=(1, 2), steps=(0, 0)) -> ObservationBatch:
    rng = np.random.default_rng(0)
    n = len(seeds)
    return ObservationBatch(
        state=rng.normal(size=(n, 8)).astype(np.float32),
        instructions=["put the black bowl on the plate", "turn on the stove"][:n],
        episode_ids=[f"ep{i}" for i in range(n)], episode_seeds=list(seeds), steps=list(steps),
        images={camera: rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for camera in ("agentview", "wrist")},
    )  # fmt: skip


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / checkpoint.name))


def refusal(name: str, path: Path, error=LeRobotCheckpointError) -> str:
    with pytest.raises(error) as caught:
        make_policy(name, str(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_loads_the_saved_weights_and_follows_the_checkpoint_config(checkpoint):
    policy = make_policy("lerobot_smolvla", str(checkpoint))
    info = policy.describe()

    assert info["weights_sha256"] == file_sha256(checkpoint / "model.safetensors")
    assert policy.checkpoint == str(checkpoint) and info["tokenizer"] == str(checkpoint / "tokenizer")
    assert info["processors"] == "saved in the checkpoint" and info["lerobot_type"] == "smolvla"
    assert policy.chunk_size == info["n_action_steps"] == N_ACTION_STEPS and info["checkpoint_chunk_size"] == 6
    assert info["cameras"] == {"observation.images.image": "agentview", "observation.images.image2": "wrist"}
    assert info["image_resolution"]["observation.images.image"] == [256, 256] and info["model_image_size"] == [64, 64]
    saved = load_file(checkpoint / "model.safetensors")
    loaded = policy.module.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_actions_are_chunks_of_seeded_noise(checkpoint):
    policy = make_policy("lerobot_smolvla", str(checkpoint))
    actions = policy.predict(observations())
    again = policy.predict(observations())
    other_seed = policy.predict(observations(seeds=(1, 3)))

    assert actions.shape == (2, N_ACTION_STEPS, 7) and actions.dtype == np.float32 and np.isfinite(actions).all()
    np.testing.assert_array_equal(actions, again)
    np.testing.assert_array_equal(actions[0], other_seed[0])  # a row depends on its own episode's noise only
    assert not np.allclose(actions[1], other_seed[1])


def test_refuses_a_directory_without_weights(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    (path / "model.safetensors").unlink()
    assert refusal("lerobot_smolvla", path) == f"{path} has no model.safetensors: refusing to run random weights"


def test_refuses_weights_that_do_not_match_the_model(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.state_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    assert "lacks 1 tensors: model.state_proj.weight" in refusal("lerobot_smolvla", path)

    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.state_proj.bias"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    assert "does not fit its config.json: 1 resized: model.state_proj.bias (file [3], model [" in refusal("lerobot_smolvla", path)

    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    assert "has unexpected 1 tensors: model.extra.weight" in refusal("lerobot_smolvla", path)


def test_a_model_that_differs_from_its_file_is_refused(checkpoint):
    policy = make_policy("lerobot_smolvla", str(checkpoint))
    with torch.no_grad():
        policy.module.model.state_proj.bias.add_(1.0)
    with pytest.raises(LeRobotCheckpointError) as caught:
        _verify_weights(policy.module, checkpoint)
    assert "was not loaded into the model: it differs in 1 tensors: model.state_proj.bias" in str(caught.value)


def test_tied_weights_stored_once_are_accepted(tmp_path):
    path = build_checkpoint(tmp_path, tie_embeddings=True)
    saved = load_file(path / "model.safetensors")
    loaded = make_policy("lerobot_smolvla", str(path)).module.state_dict()
    absent = [key for key in loaded if key not in saved]
    assert absent == ["model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight"]
    assert torch.equal(loaded[absent[0]], saved["model.vlm_with_expert.vlm.lm_head.weight"])


def test_never_fetches_the_tokenizer_from_the_hub(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    elsewhere = shutil.move(path / "tokenizer", tmp_path / "tokenizer_copy")
    message = refusal("lerobot_smolvla", path)
    assert f"names the hub model {HUB_VLM!r}" in message and str(path / "tokenizer") in message
    assert make_policy("lerobot_smolvla", str(path), "cpu", tokenizer=str(elsewhere)).describe()["tokenizer"] == str(elsewhere)


def test_unmatched_input_features_are_listed(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["input_features"]["observation.images.top"] = config["input_features"].pop("observation.images.image")
    (path / "config.json").write_text(json.dumps(config))
    message = refusal("lerobot_smolvla", path)
    assert "cannot feed LIBERO's cameras and 8-value state to observation.images.top (VISUAL [3, 256, 256])" in message
    assert "input features: observation.images.image2 (VISUAL" in message and "observation.state (STATE [8])" in message


def test_the_wrong_family_is_one_line(checkpoint):
    message = refusal("lerobot_pi05", checkpoint)
    assert message == f"{checkpoint} is a lerobot 'smolvla' checkpoint, not 'pi05': use policy=lerobot_smolvla"


PRESET_LAYERS = {"llm": LAYERS * 7, "expert": LAYERS * 7, "default": 2 * LAYERS * 7, "qkvo": 2 * LAYERS * 4,
                 "expert_mlp": LAYERS * 3, "llm+expert_mlp": 2 * LAYERS * 3, "vision": 2 * 6}  # fmt: skip


@pytest.mark.parametrize(("scope", "layers"), PRESET_LAYERS.items())
def test_scope_presets_count_smolvla_layers(checkpoint, scope, layers):
    cfg, _ = make_run(["policy=lerobot_smolvla", f"policy.path={checkpoint}", "quant=w4a8", f"quant.scope={scope}"])
    lines = dry_run_report(make_policy("lerobot_smolvla", str(checkpoint)), cfg.quant).splitlines()[:-1]  # - count
    assert len(lines) == layers
    assert not any(word in line for line in lines for word in ("lm_head", "connector", "state_proj", "action_"))


def test_duquant_w4a8_calibrates_and_runs_quantized(checkpoint, tmp_path):
    cfg, _ = make_run(["quant=w4a8", "quant.calib_steps=2", "quant.block_size=16", f"results_dir={tmp_path}"])
    policy = make_policy("lerobot_smolvla", str(checkpoint))
    full_precision = policy.predict(observations())
    quantized = CalibratingPolicy(policy, cfg.quant, tmp_path / "packs")
    for step in (0, 5):
        quantized.predict(observations(steps=(step, step)))
    actions = quantized.predict(observations())

    assert quantized.report["layers_quantized"] == 2 * LAYERS * 7
    kinds = {type(m).__name__ for n, m in policy.module.named_modules() if n.endswith("mlp.down_proj")}
    assert kinds == {"DuQuantLinear"} and np.isfinite(actions).all()
    assert not np.allclose(actions, full_precision)  # the same inputs and noise, now through 4-bit weights


@pytest.mark.parametrize(("hidden", "expected"), [
    ("lerobot", "policy 'lerobot_pi05' needs lerobot >= 0.5, which needs Python >= 3.12: pip install -e '.[lerobot]'"),
    ("draccus", "policy 'lerobot_pi05': lerobot is installed but importing lerobot.configs.policies failed: "
                "No module named 'draccus"),
])  # fmt: skip
def test_a_missing_lerobot_or_module_it_imports_is_named(hidden, expected):
    # A fresh interpreter in which ``hidden`` cannot be imported (None in sys.modules), as if it were not installed.
    code = (f"import sys; sys.modules[{hidden!r}] = None\nfrom policies import make_policy\n"
            "try:\n    make_policy('lerobot_pi05', 'ckpt')\nexcept ValueError as err:\n    print(err)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith(expected) and len(proc.stdout.splitlines()) == 1
