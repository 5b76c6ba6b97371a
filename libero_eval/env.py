"""One LIBERO task environment, presented the way openpi's LIBERO example does.

The wrapper owns the protocol's observation processing (image rotation and
padded resize, the 8-value state, object poses in ``state`` mode) so that
every policy, demo collector and benchmark sees identical observations.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
    # GPUs hidden (submitit's local executor does this): robosuite would parse "" as an EGL device id and fail.
    os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")

import numpy as np
from PIL import Image

from libero_eval.suites import base_suite
from policies.base import ObsMode

DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
CAMERAS = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}
RESETS = ("hard", "soft")
RENDER_QUALITIES = ("default", "fast")


class RenderingUnavailable(RuntimeError):
    """Offscreen rendering could not start; the message says how to fix it."""


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a unit quaternion in robosuite's xyzw order."""
    w = float(np.clip(quat_xyzw[3], -1.0, 1.0))
    sin_half = math.sqrt(1.0 - w * w)
    if math.isclose(sin_half, 0.0):
        return np.zeros(3)
    return np.asarray(quat_xyzw[:3]) * 2.0 * math.acos(w) / sin_half


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio, then zero-pad to ``size`` x ``size``."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, image.shape[2]), dtype=image.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def _quiet_robosuite() -> None:
    # robosuite warns about a missing private macro file on every import, and PyOpenGL about an optional
    # accelerator module; both are harmless here. A filter survives robosuite resetting its logger's level.
    for name in ("robosuite_logs", "OpenGL.acceleratesupport"):
        logger = logging.getLogger(name)
        if not logger.filters:
            logger.addFilter(lambda record: record.levelno >= logging.ERROR)


@dataclass(frozen=True)
class Task:
    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_path: str


@functools.lru_cache(maxsize=None)
def _benchmark(suite: str):
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]()


def _task_spec(suite: str, task_id: int):
    """The benchmark's task record, its BDDL path and the suite's benchmark."""
    from libero.libero import get_libero_path

    bench = _benchmark(suite)
    spec = bench.get_task(task_id)
    return spec, os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file), bench


def _bddl_language(bddl: str) -> str:
    from libero.libero.envs.bddl_utils import get_problem_info

    return get_problem_info(bddl)["language_instruction"]


def instruction(suite: str, spec, bddl: str) -> str:
    """The instruction a policy gets: the benchmark's (openpi's choice) for a base suite, and for a perturbed one
    too unless its BDDL file changes the instruction (LIBERO-PRO's ``_lan`` and ``_task`` suites): the benchmark
    names tasks from their file names, which the perturbed suites keep, so only the BDDL has the new words."""
    base = base_suite(suite)
    base_id = spec_index(base, spec.name) if base != suite else None
    if base_id is None:  # a base suite, or a suite whose tasks are named apart (another scene): its own language
        return spec.language
    language = _bddl_language(bddl)
    return spec.language if language == _bddl_language(_task_spec(base, base_id)[1]) else language


def spec_index(suite: str, name: str) -> int | None:
    """The id of the task called ``name`` in ``suite``, if it has one."""
    bench = _benchmark(suite)
    return next((i for i in range(bench.get_num_tasks()) if bench.get_task(i).name == name), None)


def load_task(suite: str, task_id: int) -> tuple[Task, np.ndarray]:
    """The task and its init states, from the files the libero package bundles."""
    _quiet_robosuite()
    spec, bddl, bench = _task_spec(suite, task_id)
    task = Task(suite, task_id, spec.name, instruction(suite, spec, bddl), bddl)
    return task, np.asarray(bench.get_task_init_states(task_id))


class LiberoEnv:
    """A seeded LIBERO task env that yields protocol observations.

    ``render`` builds the cameras even when the policy reads state only
    (videos); the policy still gets what its ``obs_mode`` asks for.
    ``reset`` and ``render_quality`` are described at :meth:`reset` and
    :meth:`_render_fast`.
    """

    def __init__(
        self,
        task: Task,
        obs_mode: ObsMode,
        *,
        seed: int,
        camera_size: int = 256,
        image_size: int = 224,
        render: bool | None = None,
        reset: str = "hard",
        render_quality: str = "default",
    ):
        _quiet_robosuite()
        from libero.libero.envs import OffScreenRenderEnv

        self.task = task
        self.obs_mode = ObsMode(obs_mode)
        self.image_size = image_size
        self.render = self.obs_mode is ObsMode.RGB if render is None else render
        if reset not in RESETS or render_quality not in RENDER_QUALITIES:
            raise ValueError(f"reset must be one of {RESETS} and render_quality one of {RENDER_QUALITIES}")
        self.soft_reset, self.fast_render = reset == "soft", render_quality == "fast"
        kwargs = {"bddl_file_name": task.bddl_path, "camera_heights": camera_size, "camera_widths": camera_size}
        if not self.render:
            kwargs.update(use_camera_obs=False, has_offscreen_renderer=False)
        try:
            self._env = OffScreenRenderEnv(**kwargs)
        except Exception as exc:  # OpenGL/EGL failures surface as many exception types
            if not self.render:
                raise
            raise RenderingUnavailable(
                f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({type(exc).__name__}: {exc}); "
                "install Mesa EGL (apt-get install libegl1 libgl1-mesa-dri), try MUJOCO_GL=osmesa, "
                "or evaluate a state-mode policy"
            ) from exc
        self.seed = seed
        self._env.seed(seed)
        self._reset_before = False
        self.objects_of_interest: list[str] = list(self._env.obj_of_interest)
        self._raw: dict = {}

    def reset(self, init_state: np.ndarray) -> dict:
        """Reset, then place the scene in ``init_state``; returns the processed observation.

        A hard reset rebuilds the MuJoCo model and the render context (~2.7 s);
        a soft one (after a first hard one) resets the existing sim (~0.05 s).
        Both place the fixtures (cabinet, stove: their poses live in the model,
        not in init states) by drawing from the global RNG, so the env is
        reseeded before every reset: an episode's scene does not depend on
        what ran before it in this env (run order, worker, shard, resume).
        robosuite's soft reset keeps the gripper's last command
        (``current_action``, which the gripper integrates); clearing it makes
        both resets start identically (tests/test_env.py). LIBERO's model
        loading appends the scene's open/closed and on/off joint samplers to a
        list it never empties, so each hard reset drew more samples before
        placing the fixtures and a cabinet moved by ~2 cm with the env's reset
        count; the list is emptied before the model is rebuilt.
        """
        hard = not (self.soft_reset and self._reset_before)
        self._env.env.hard_reset = hard
        if hard:
            self._env.env.object_property_initializers.clear()
        else:
            for robot in self._env.robots:
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
        self._env.seed(self.seed)
        self._env.reset()
        self._reset_before = True
        if self.render and self.fast_render:
            self._render_fast()  # a hard reset built a fresh render context with the model's settings
        self._raw = self._env.set_init_state(init_state)
        return self.observation()

    def _render_fast(self) -> None:
        """Shadows, reflections and multisampling off: software rendering ~2.5x faster, pixels slightly different."""
        import mujoco

        sim = self._env.sim
        context = sim._render_context_offscreen
        context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if sim.model.vis.quality.offsamples:  # the sample count is fixed when the GL context is made
            sim.model.vis.quality.offsamples = 0
            context.gl_ctx.make_current()
            context.con.free()
            context._set_mujoco_context_and_buffers()

    def step(self, action) -> tuple[dict, bool]:
        """Apply one 7-dim action; returns (observation, success)."""
        self._raw, _, done, _ = self._env.step(np.asarray(action, dtype=np.float64).tolist())
        return self.observation(), bool(done)

    def frame(self) -> np.ndarray:
        """The agentview camera as a person sees it (upright), for videos."""
        return np.ascontiguousarray(self._raw["agentview_image"][::-1, ::-1])

    def observation(self) -> dict:
        raw = self._raw
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        obs: dict = {"state": state}
        if self.obs_mode is ObsMode.RGB:
            obs["images"] = {
                name: resize_with_pad(np.ascontiguousarray(raw[key][::-1, ::-1]), self.image_size)
                for name, key in CAMERAS.items()
            }
        else:
            obs["object_poses"] = np.stack([self._pose(name) for name in self.objects_of_interest]).astype(np.float32)
            obs["object_names"] = self.objects_of_interest
        return obs

    def _pose(self, name: str) -> np.ndarray:
        """World pose (xyz + quaternion xyzw) of an object, a fixture body or a fixture's site region."""
        if f"{name}_pos" in self._raw:
            return np.concatenate([self._raw[f"{name}_pos"], self._raw[f"{name}_quat"]])
        import robosuite.utils.transform_utils as T

        data, bodies = self._env.sim.data, self._env.env.obj_body_id
        if name in bodies:
            return np.concatenate([data.body_xpos[bodies[name]], T.convert_quat(data.body_xquat[bodies[name]], to="xyzw")])
        return np.concatenate([data.get_site_xpos(name), T.mat2quat(data.get_site_xmat(name))])

    @property
    def sim(self):
        """The MuJoCo sim, for privileged tooling (demo collection, tests)."""
        return self._env.sim

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "LiberoEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
