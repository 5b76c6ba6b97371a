"""The embedded policy: shapes, seeded noise, weight loading, pi0-style layer names, training script, a real rollout."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from policies.base import ObservationBatch, ObsMode
from policies.embedded import DEFAULT_WEIGHTS, EmbeddedPolicy
from policies.embedded.model import WeightsError
from scripts.train_embedded_policy import chunk_indices, main as train_main

INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the ketchup in the basket"]


def write_synthetic_demos(path, episodes=4, length=30, objects=2, seed=0):
    """A tiny demos.npz in the collector's format: reaching toward the first object, then closing the gripper."""
    rng = np.random.default_rng(seed)
    state, poses, actions, episode_index = [], [], [], []
    for e in range(episodes):
        target = rng.uniform([-0.2, -0.2, 0.85], [0.2, 0.2, 0.95])
        eef = np.array([0.0, 0.0, 1.1])
        for t in range(length):
            delta = np.clip((target - eef) * 10, -1, 1)
            grip = 1.0 if t > length // 2 else -1.0
            state.append(np.r_[eef, np.pi, 0, 0, 0.04, -0.04])
            obj = np.c_[np.stack([target] * objects), np.tile([0, 0, 0, 1.0], (objects, 1))]
            poses.append(obj + rng.normal(0, 1e-3, obj.shape))
            actions.append(np.r_[delta, 0, 0, 0, grip])
            episode_index.append(e)
            eef = eef + 0.01 * delta
    np.savez(
        path,
        state=np.asarray(state, np.float32),
        object_poses=np.asarray(poses, np.float32),
        actions=np.asarray(actions, np.float32),
        episode_index=np.asarray(episode_index),
        instruction=np.array([INSTRUCTIONS[e % 2] for e in range(episodes)]),
        suite=np.array(["libero_spatial"] * episodes),
        task_id=np.arange(episodes) % 2,
        seed=np.arange(episodes),
        length=np.full(episodes, length),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    write_synthetic_demos(root / "demos.npz")
    argv = ["--demos", str(root / "demos.npz"), "--steps", "3", "--batch-size", "8", "--log-every", "1"]
    argv += ["--threads", "1"]
    recipe = train_main([*argv, "--out", str(root / "a")])
    return root, argv, recipe


@pytest.fixture(scope="module")
def policy(trained):
    return EmbeddedPolicy(trained[0] / "a" / "model.safetensors")


def batch(seeds, steps, instructions=None):
    n = len(seeds)
    rng = np.random.default_rng(1)
    return ObservationBatch(
        state=np.tile(np.array([0.0, 0.0, 1.1, np.pi, 0, 0, 0.04, -0.04], np.float32), (n, 1)),
        instructions=instructions or [INSTRUCTIONS[i % 2] for i in range(n)],
        episode_ids=[f"ep{i}" for i in range(n)],
        episode_seeds=list(seeds),
        steps=list(steps),
        object_poses=np.c_[rng.uniform(-0.2, 0.2, (n, 2, 3)), np.tile([0, 0, 0, 1.0], (n, 2, 1))].astype(np.float32),
    )


def test_predict_returns_bounded_chunks(policy):
    chunks = policy.predict(batch([0, 1, 2], [0, 5, 10]))
    assert chunks.shape == (3, 10, 7) and chunks.dtype == np.float32
    assert np.isfinite(chunks).all() and np.abs(chunks).max() <= 1.0
    assert policy.obs_mode is ObsMode.STATE and policy.chunk_size == 10 and policy.name == "embedded"


def test_noise_depends_only_on_episode_seed_and_step(policy):
    obs = batch([3, 3, 4], [5, 5, 5], [INSTRUCTIONS[0]] * 3)
    obs.object_poses[:] = obs.object_poses[0]
    together = policy.predict(obs)
    np.testing.assert_allclose(together[0], together[1], atol=1e-6)
    assert np.abs(together[0] - together[2]).max() > 1e-4
    single = batch([3], [5], [INSTRUCTIONS[0]])
    single.object_poses[:] = obs.object_poses[0]
    np.testing.assert_allclose(policy.predict(single)[0], together[0], atol=1e-5)
    later = batch([3], [10], [INSTRUCTIONS[0]])
    later.object_poses[:] = obs.object_poses[0]
    assert np.abs(policy.predict(later)[0] - together[0]).max() > 1e-4


def test_missing_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        EmbeddedPolicy(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        EmbeddedPolicy(tmp_path)  # a directory without model.safetensors


def test_a_training_output_directory_loads_its_weights():
    assert EmbeddedPolicy(DEFAULT_WEIGHTS.parent).checkpoint == str(DEFAULT_WEIGHTS)


def test_mismatched_weights_are_refused(trained, tmp_path):
    source = trained[0] / "a" / "model.safetensors"
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    wrong_shape = dict(tensors, **{"expert.layers.0.mlp.up_proj.weight": torch.zeros(64, 256)})
    cases = {
        "missing": ({k: v for k, v in tensors.items() if "time_mlp_in" not in k}, metadata),
        "shape": (wrong_shape, metadata),
        "metadata": (tensors, None),
    }
    for name, (state, metadata) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        with pytest.raises(WeightsError, match="does not match|config"):
            EmbeddedPolicy(tmp_path / f"{name}.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable"):
        EmbeddedPolicy(tmp_path / "junk.safetensors")


def selected(policy, preset):
    rules = policy.scope_presets()[preset]
    names = [n for n, m in policy.module.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        n
        for n in names
        if any(re.search(p, n) for p in rules["include"]) and not any(re.search(p, n) for p in rules["exclude"])
    }


def test_layer_names_follow_pi0_layout(policy):
    config = policy.module.config
    attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    stack = {
        s: {f"{s}.layers.{i}.self_attn.{p}" for i in range(d) for p in attn}
        | {f"{s}.layers.{i}.mlp.{p}" for i in range(d) for p in mlp}
        for s, d in (("backbone", config.depth), ("expert", config.expert_depth))
    }
    assert selected(policy, "llm") == stack["backbone"]
    assert selected(policy, "expert") == stack["expert"]
    assert selected(policy, "default") == selected(policy, "llm+expert") == stack["backbone"] | stack["expert"]
    assert selected(policy, "expert_mlp") == {n for n in stack["expert"] if ".mlp." in n}
    assert selected(policy, "llm+expert_mlp") == {n for n in stack["backbone"] | stack["expert"] if ".mlp." in n}
    assert selected(policy, "qkvo") == {n for n in stack["backbone"] | stack["expert"] if ".self_attn." in n}
    modules = dict(policy.module.named_modules())
    for name in stack["backbone"] | stack["expert"]:
        assert modules[name].in_features % 64 == 0 and modules[name].out_features % 64 == 0
    for head in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out", "state_proj", "text_proj"):
        assert isinstance(modules[head], torch.nn.Linear)


def test_training_is_reproducible_and_recorded(trained, policy):
    root, argv, recipe = trained
    assert recipe["seed"] == 0 and np.isfinite(recipe["final_loss"])
    assert recipe["data"][0]["sha256"] == hashlib.sha256((root / "demos.npz").read_bytes()).hexdigest()
    on_disk = json.loads((root / "a" / "recipe.json").read_text())
    assert policy.describe()["weights_sha256"] == on_disk["weights_sha256"]
    again = train_main([*argv, "--out", str(root / "b")])
    assert again["weights_sha256"] == recipe["weights_sha256"]


def test_shipped_weights_are_the_moving_average(trained):
    root, argv, recipe = trained
    last = train_main([*argv, "--ema-decay", "0", "--out", str(root / "last")])
    assert recipe["args"]["ema_decay"] == 0.999 and last["args"]["ema_decay"] == 0
    assert last["weights_sha256"] != recipe["weights_sha256"]
    one_step = [*argv[: argv.index("--steps")], "--steps", "1", *argv[argv.index("--steps") + 2 :]]
    first = [train_main([*one_step, "--ema-decay", d, "--out", str(root / f"one{d}")]) for d in ("0", "0.9")]
    assert first[0]["weights_sha256"] == first[1]["weights_sha256"]  # the average starts at the first step's weights
    with pytest.raises(SystemExit):
        train_main([*argv, "--ema-decay", "1"])


def test_chunks_stop_at_episode_end():
    expected = [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 4], [4, 4, 4]]
    np.testing.assert_array_equal(chunk_indices(np.array([0, 0, 0, 1, 1]), 3), expected)


def test_shipped_weights_load_and_are_documented():
    assert DEFAULT_WEIGHTS.stat().st_size <= 20 * 2**20
    described = EmbeddedPolicy().describe()
    recipe = described["recipe"]
    assert recipe["weights_sha256"] == described["weights_sha256"]
    assert {"seed", "data", "final_loss", "command"} <= recipe.keys()
    assert 1e6 < described["params"] < 10e6


def test_short_libero_rollout():
    from libero_eval.env import LiberoEnv, load_task
    from libero_eval.rollout import Protocol, run_episode

    task, init_states = load_task("libero_spatial", 0)
    policy = EmbeddedPolicy()
    with LiberoEnv(task, policy.obs_mode, seed=7) as env:
        outcome = run_episode(env, policy, init_states[0], protocol=Protocol(max_steps=20), episode_id="t", seed=7)
    assert outcome.error is None
    assert outcome.success or (outcome.steps == 20 and outcome.policy_calls == 4)
