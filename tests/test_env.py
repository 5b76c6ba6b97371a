"""The env wrapper's protocol observations, on the real simulator."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from libero_eval.env import LiberoEnv, load_task, quat_to_axis_angle, resize_with_pad
from libero_eval.rollout import Protocol, run_episode
from policies.scripted_expert import ScriptedExpert


def test_axis_angle_matches_scipy():
    for quat in Rotation.random(20, random_state=0).as_quat():  # xyzw
        quat = quat if quat[3] >= 0 else -quat  # axis-angle with angle in [0, pi]
        np.testing.assert_allclose(quat_to_axis_angle(quat), Rotation.from_quat(quat).as_rotvec(), atol=1e-6)
    assert not quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])).any()


def test_resize_with_pad_keeps_aspect_and_centres():
    image = np.full((100, 200, 3), 255, np.uint8)
    out = resize_with_pad(image, 224)
    assert out.shape == (224, 224, 3)
    assert not out[:55].any() and not out[-55:].any() and out[112].all()


@pytest.fixture(scope="module")
def spatial_task():
    return load_task("libero_spatial", 0)


def test_rgb_observation_is_rotated_resized_and_state_is_eight_values(spatial_task):
    task, inits = spatial_task
    with LiberoEnv(task, "rgb", seed=7, camera_size=128, image_size=96) as env:
        obs = env.reset(inits[0])
        raw = env._raw
        assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
        np.testing.assert_allclose(obs["state"][:3], raw["robot0_eef_pos"], rtol=1e-6)
        np.testing.assert_allclose(obs["state"][6:], raw["robot0_gripper_qpos"], rtol=1e-6)
        agent = obs["images"]["agentview"]
        assert agent.shape == (96, 96, 3) and agent.dtype == np.uint8
        np.testing.assert_array_equal(agent, resize_with_pad(raw["agentview_image"][::-1, ::-1], 96))
        assert "object_poses" not in obs


def test_state_observation_has_object_poses_and_no_cameras(spatial_task):
    task, inits = spatial_task
    with LiberoEnv(task, "state", seed=7) as env:
        obs = env.reset(inits[0])
        assert "images" not in obs and "agentview_image" not in env._raw
        assert obs["object_names"] == env.objects_of_interest == ["akita_black_bowl_1", "plate_1"]
        np.testing.assert_allclose(obs["object_poses"][0, :3], env._raw["akita_black_bowl_1_pos"], rtol=1e-6)
        obs2, success = env.step([0, 0, 0, 0, 0, 0, -1])
        assert not success and obs2["object_poses"].shape == (2, 7)


@pytest.mark.parametrize("suite, task_id", [("libero_goal", 0), ("libero_10", 5)])
def test_fixture_poses_come_from_sites_and_bodies(suite, task_id):
    task, inits = load_task(suite, task_id)
    with LiberoEnv(task, "state", seed=7) as env:
        obs = env.reset(inits[0])
        poses = obs["object_poses"]
        assert poses.shape == (len(env.objects_of_interest), 7) and np.isfinite(poses).all()
        np.testing.assert_allclose(np.linalg.norm(poses[:, 3:], axis=1), 1.0, atol=1e-5)


def _expert_rollout(env: LiberoEnv, init_state: np.ndarray, steps: int) -> tuple[list[dict], list[np.ndarray]]:
    """Every observation the expert acted on, and every frame, of one short episode."""
    seen = []
    out = run_episode(env, ScriptedExpert(), init_state, protocol=Protocol(max_steps=steps), episode_id="t", seed=7,
                      record_video=True, on_step=lambda obs, action: seen.append(obs))  # fmt: skip
    assert out.error is None
    return seen, out.frames


# Two suites in `make test`; the other three are marked slow (about a minute each) and run with `make test-all`.
@pytest.mark.parametrize(
    "suite, task_id",
    [("libero_spatial", 0), ("libero_10", 0)]
    + [pytest.param(suite, task, marks=pytest.mark.slow) for suite, task in [("libero_object", 0), ("libero_goal", 0),
                                                                            ("libero_90", 2)]],
)
def test_soft_reset_starts_an_episode_exactly_as_a_hard_reset(suite, task_id):
    task, inits = load_task(suite, task_id)
    kwargs = {"seed": 7, "camera_size": 32, "render": True}
    with LiberoEnv(task, "state", reset="soft", **kwargs) as soft, LiberoEnv(task, "state", reset="hard", **kwargs) as hard:
        start = soft.reset(inits[0])  # an episode that moves objects (or opens fixtures) and closes the gripper
        joints = [j for name in soft.objects_of_interest for j in soft._env.env.get_object(name).joints]
        for joint in joints:
            qpos = np.atleast_1d(soft.sim.data.get_joint_qpos(joint)).copy()
            qpos[: 3 if qpos.size == 7 else 1] += 0.05  # a free joint's position, or a hinge's or slide's travel
            soft.sim.data.set_joint_qpos(joint, qpos if qpos.size > 1 else qpos[0])
        for _ in range(15):
            obs, _ = soft.step([0.5, 0.0, 0.3, 0.0, 0.0, 0.2, 1.0])
        assert np.abs(obs["state"] - start["state"]).max() > 0.05
        assert np.abs(obs["object_poses"] - start["object_poses"]).max() > 1e-3
        after_soft, soft_frames = _expert_rollout(soft, inits[1], 30)
        after_hard, hard_frames = _expert_rollout(hard, inits[1], 30)
    assert len(after_soft) == len(after_hard) == 30 and len(soft_frames) == len(hard_frames)
    for a, b in zip(after_soft, after_hard):
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["object_poses"], b["object_poses"])
    for a, b in zip(soft_frames, hard_frames):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_an_episode_scene_does_not_depend_on_the_resets_before_it(reset):
    # libero_spatial task 4 opens a drawer at reset: LIBERO's joint samplers for it once piled up per reset.
    task, inits = load_task("libero_spatial", 4)
    with LiberoEnv(task, "state", seed=7, reset=reset) as fresh, LiberoEnv(task, "state", seed=7, reset=reset) as used:
        first = fresh.reset(inits[1])
        for init in (inits[0], inits[2], inits[0]):
            used.reset(init)
        again = used.reset(inits[1])
        np.testing.assert_array_equal(fresh.sim.model.body_pos, used.sim.model.body_pos)
        np.testing.assert_array_equal(fresh.sim.model.body_quat, used.sim.model.body_quat)
        np.testing.assert_array_equal(first["object_poses"], again["object_poses"])
        for _ in range(20):
            a, _ = fresh.step([0.3, 0.0, -0.3, 0.0, 0.0, 0.0, -1.0])
            b, _ = used.step([0.3, 0.0, -0.3, 0.0, 0.0, 0.0, -1.0])
        np.testing.assert_array_equal(a["state"], b["state"])
