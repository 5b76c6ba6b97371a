"""Demo collection on the real simulator: noise-injected execution keeps the expert's own actions as labels."""

from __future__ import annotations

import numpy as np
import pytest

from policies.base import collate
from policies.scripted_expert import ScriptedExpert
from scripts.collect_demos import Job, parse_args, run_job


def test_action_noise_perturbs_the_arm_but_the_labels_are_the_experts():
    clean = run_job(Job("libero_spatial", 0, 0, seed=0, max_steps=15))
    noisy = run_job(Job("libero_spatial", 0, 0, seed=0, max_steps=15, action_noise=0.3))
    assert clean.steps == noisy.steps == 15 and not clean.error and not noisy.error

    np.testing.assert_array_equal(clean.state[0], noisy.state[0])  # same start ...
    assert np.abs(noisy.state[-1, :3] - clean.state[-1, :3]).max() > 1e-3  # ... then the noise moved the arm
    np.testing.assert_array_equal(noisy.actions[:, 6], clean.actions[:, 6])  # gripper commands are never perturbed
    assert np.abs(noisy.actions[:, :6]).max() <= 1.0

    # Each chunk's labels are what the expert planned from the observation it was asked about.
    expert, names = ScriptedExpert(), noisy.object_names
    for start in range(0, noisy.steps, expert.chunk_size):
        obs = {"state": noisy.state[start], "object_poses": noisy.object_poses[start], "object_names": names}
        planned = expert.predict(collate([obs], [noisy.instruction], ["ep"], [0], [start]))[0]
        np.testing.assert_allclose(noisy.actions[start : start + expert.chunk_size], planned, atol=1e-6)


def test_negative_action_noise_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--action-noise", "-0.1"])
    assert "--action-noise must be >= 0, got -0.1" in capsys.readouterr().err
