"""A scripted pick-and-place expert that reads privileged object poses.

It picks the task's first object of interest and places it on (or drops it
into) the last one: the tasks of libero_spatial and libero_object, and other
suites' tasks whose goal is one such placement. It sees only the state observation:
the eef pose, the gripper, and the world poses of the objects of interest. The
objects' shapes come from a small table of bounding boxes measured once from
the LIBERO assets, keyed by object category (the name without its ``_N``).

Each episode runs through phases (approach, descend, close, lift, carry,
lower, release, retreat); a failed grasp or a drop starts over from a retreat,
gripping a vessel's rim elsewhere; a vessel hanging tilted from its rim is carried
turned back toward level. Phase changes are decided on real observations only;
inside a chunk the expert tracks the phase's goal on a kinematic model of the
OSC controller, so a chunk executed open-loop still lands near the goal.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from policies.base import ACTION_DIM, ObservationBatch, ObsMode, Policy

# Steady-state eef motion per step for a unit OSC_POSE action (LIBERO's Panda at 20 Hz):
# 0.26 of the controller's 0.05 m and 0.2 of its 0.5 rad output limits.
METERS_PER_ACTION = 0.0131
RADIANS_PER_ACTION = 0.098
OPEN, CLOSE = -1.0, 1.0
# Eef yaw in the middle of the Panda wrist joint's range (its joint 7 starts 0.8 rad off center).
WRIST_YAW = math.pi / 4
ROBOT_SIDE = np.array([-1.0, 0.0])  # LIBERO's robot base stands on the world's -x side of the scene
RIM_REACH_WEIGHT = 0.03  # m of rim height worth as much as gripping the rim straight from the robot's side
# After each failed grasp of a rim, the side preferred for the next one turns by the next of these angles.
RIM_RETRY_TURNS = tuple(math.radians(a) for a in (0, 45, -45, 90, -90))
RIM_DEPTH = 0.015  # grip a rim this far below its top
BLOCKED = 0.012  # a descent that stalls this far above the grasp point hit something
LEVEL = math.radians(20)  # a carried vessel tilted at most this much is let go of without tipping over
# Gripper-down orientation with yaw 0: fingers close along world y.
_DOWN = Rotation.from_euler("x", math.pi)

# Local-frame bounding boxes (center offset, half extents) of the objects LIBERO's pick-place
# tasks move or place onto, relative to the pose the observation reports.
_BOXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "akita_black_bowl": ((0.0, 0.0, 0.027), (0.054, 0.054, 0.025)),
    "plate": ((0.001, 0.0, 0.007), (0.069, 0.069, 0.009)),
    "basket": ((0.001, 0.0, 0.075), (0.085, 0.079, 0.071)),
    "alphabet_soup": ((0.0, 0.0, -0.004), (0.031, 0.038, 0.031)),
    "tomato_sauce": ((0.0, 0.0, -0.003), (0.031, 0.038, 0.031)),
    "cream_cheese": ((0.0, 0.0, 0.0), (0.041, 0.021, 0.009)),
    "butter": ((0.0, 0.0, 0.0), (0.038, 0.020, 0.009)),
    "chocolate_pudding": ((0.0, 0.0, 0.001), (0.040, 0.023, 0.014)),
    "salad_dressing": ((0.0, 0.0, 0.0), (0.026, 0.073, 0.018)),
    "ketchup": ((0.0, 0.0, 0.001), (0.028, 0.073, 0.018)),
    "bbq_sauce": ((0.0, 0.0, -0.001), (0.023, 0.015, 0.054)),
    "milk": ((0.0, -0.004, 0.0), (0.027, 0.066, 0.026)),
    "orange_juice": ((0.0, -0.004, 0.0), (0.027, 0.066, 0.026)),
    "wine_bottle": ((0.0, 0.0, 0.080), (0.021, 0.022, 0.078)),
    "porcelain_mug": ((0.0, 0.0, 0.055), (0.062, 0.048, 0.053)),
    "white_yellow_mug": ((0.0, 0.0, 0.052), (0.070, 0.053, 0.052)),
}
_UNKNOWN_BOX = ((0.0, 0.0, 0.0), (0.03, 0.03, 0.03))


class Phase(enum.IntEnum):
    APPROACH = 0  # above the grasp point, gripper open and turned
    DESCEND = 1
    CLOSE = 2
    LIFT = 3
    CARRY = 4  # over to just above the target
    LOWER = 5
    RELEASE = 6
    RETREAT = 7  # up, then start over: after a failed grasp, a drop, or a release that did not succeed


@dataclass(frozen=True)
class Box:
    """An object's oriented bounding box, from its observed pose and its table entry."""

    position: np.ndarray  # [3] the observed pose's position
    rotation: Rotation
    offset: np.ndarray  # [3] local box center
    local_half: np.ndarray  # [3]

    @classmethod
    def of(cls, name: str | None, pose: np.ndarray) -> "Box":
        category = re.sub(r"_\d+$", "", name or "")
        offset, half = _BOXES.get(category, _UNKNOWN_BOX)
        position = np.asarray(pose[:3], dtype=np.float64)
        return cls(position, Rotation.from_quat(pose[3:7]), np.asarray(offset), np.asarray(half))  # quaternion xyzw

    @property
    def center(self) -> np.ndarray:
        return self.position + self.rotation.apply(self.offset)

    @property
    def half(self) -> np.ndarray:
        """World axis-aligned half extents."""
        return np.abs(self.rotation.as_matrix()) @ self.local_half

    @property
    def top(self) -> float:
        return float(self.center[2] + self.half[2])

    @property
    def bottom(self) -> float:
        return float(self.center[2] - self.half[2])

    def is_open_vessel(self, max_opening: float) -> bool:
        """Wide in two dimensions (a bowl, a mug): too wide to grip across, so gripped at the rim."""
        return 2 * float(np.sort(self.local_half)[1]) > max_opening

    def narrow_axis(self) -> np.ndarray:
        """Unit horizontal direction across the object's narrowest horizontal side."""
        matrix = self.rotation.as_matrix()
        up = int(np.argmax(np.abs(matrix[2])))
        narrow = min((i for i in range(3) if i != up), key=lambda i: self.local_half[i])
        axis = matrix[:2, narrow]
        return axis / max(np.linalg.norm(axis), 1e-9)

    def opening(self) -> np.ndarray:
        """World direction of a vessel's opening: its thinnest local axis, + end."""
        return self.rotation.apply(np.eye(3)[int(np.argmin(self.local_half))])

    def rim(self, inset: float, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where to grip a vessel's rim, ``inset`` inside the wall, and the horizontal direction across the wall there.

        The vessel's axis is its thinnest local axis, the opening at its + end.
        Of the points around the rim, the one toward the horizontal ``side`` is
        preferred; a tilted vessel (a bowl leaning on something) is better
        gripped higher up, so height is traded against that.
        """
        axis = int(np.argmin(self.local_half))
        u, v = (i for i in range(3) if i != axis)
        radius = min(self.local_half[u], self.local_half[v]) - inset
        angles = np.linspace(0.0, 2 * math.pi, 24, endpoint=False)
        local = np.zeros((len(angles), 3))
        local[:, u], local[:, v] = np.cos(angles), np.sin(angles)
        points = self.offset + radius * local
        points[:, axis] += self.local_half[axis]
        points = self.position + self.rotation.apply(points)
        across = self.rotation.apply(local)[:, :2]
        across /= np.maximum(np.linalg.norm(across, axis=1, keepdims=True), 1e-9)
        best = int(np.argmax(points[:, 2] + RIM_REACH_WEIGHT * across @ side))
        return points[best], across[best]


@dataclass
class _Episode:
    phase: Phase
    since: int  # env step at which the phase began
    step: int  # env step of the last observation
    pos: np.ndarray  # eef position at the last observation
    velocity: np.ndarray  # modelled eef velocity after each action of the last chunk [chunk, 3]
    grasp_bottom: float = 0.0  # object bottom when the gripper closed
    attempt: int = 0  # failed grasps so far
    lift_z: float = 0.0  # eef height that takes the object clear of where it stood
    carry_z: float = 0.0  # eef height that holds the object just above the target
    hold: np.ndarray = field(default_factory=lambda: np.zeros(3))  # eef minus object center once lifted


@dataclass(frozen=True)
class _Goal:
    position: np.ndarray
    yaw: float
    gripper: float
    orientation: Rotation | None = None  # instead of gripper-down at ``yaw``


class ScriptedExpert(Policy):
    """Privileged-state pick-and-place expert: first object of interest onto/into the last."""

    name = "scripted_expert"
    obs_mode = ObsMode.STATE

    def __init__(
        self,
        *,
        chunk_size: int = 5,
        gain: float = 0.4,
        rot_gain: float = 0.5,
        lag: float = 0.5,
        hover: float = 0.08,
        lift: float = 0.10,
        clearance: float = 0.0,
        close_steps: int = 10,
        release_steps: int = 5,
        tolerance: float = 0.006,
        max_opening: float = 0.07,
    ):
        self.chunk_size = chunk_size
        self.gain = gain  # fraction of the remaining distance to cover per step
        self.rot_gain = rot_gain
        self.lag = lag  # fraction of the gap to the commanded velocity the arm closes per step
        self.hover = hover  # approach this far above the grasp point, then descend straight down
        self.lift = lift  # lift the object this far before carrying it
        # Lower the object's bottom to this far above the target's top, or until it touches, then let go.
        self.clearance = clearance
        self.close_steps = close_steps
        self.release_steps = release_steps
        self.tolerance = tolerance
        self.max_opening = max_opening  # wider objects (bowls) are grasped at the rim
        self._episodes: dict[str, _Episode] = {}

    def reset(self) -> None:
        self._episodes.clear()

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        if batch.object_poses is None:
            raise ValueError("scripted_expert needs state observations with object poses")
        chunks = np.empty((len(batch), self.chunk_size, ACTION_DIM))
        for row, episode_id in enumerate(batch.episode_ids):
            names = batch.object_names[row] if batch.object_names is not None else [None] * batch.object_poses.shape[1]
            obj = Box.of(names[0], batch.object_poses[row, 0])
            target = Box.of(names[-1], batch.object_poses[row, -1])
            state = np.asarray(batch.state[row], dtype=np.float64)
            step = batch.steps[row]
            episode = self._episodes.get(episode_id)
            if episode is None or step == 0:  # an episode's first call: a rerun of an id starts afresh
                rest = np.zeros((self.chunk_size, 3))
                episode = self._episodes[episode_id] = _Episode(Phase.APPROACH, step, step, state[:3].copy(), rest)
            executed = step - episode.step
            velocity = episode.velocity[executed - 1] if 0 < executed <= self.chunk_size else np.zeros(3)
            self._advance(episode, state, obj, target, step)
            chunks[row], episode.velocity = self._track(state, velocity, self._goal(episode, state, obj, target))
            episode.step, episode.pos = step, state[:3].copy()
        return chunks

    def _grasp(self, obj: Box, attempt: int) -> tuple[np.ndarray, float]:
        """Grasp point and yaw: across the narrow side, or across the rim of a wide object.

        A rim is first gripped on the robot's side: the easiest reach for the
        arm, and the side scenes keep clear. Retries turn away from it, in case
        something unseen stands there.
        """
        if obj.is_open_vessel(self.max_opening):
            turn = Rotation.from_euler("z", RIM_RETRY_TURNS[attempt % len(RIM_RETRY_TURNS)])
            point, across = obj.rim(0.006, turn.apply([*ROBOT_SIDE, 0.0])[:2])
            point[2] -= RIM_DEPTH
        else:
            across = obj.narrow_axis()
            point = np.array([*obj.center[:2], max(obj.bottom + 0.012, obj.top - 0.03)])
        yaw = math.atan2(across[1], across[0]) + math.pi / 2
        # The fingers are symmetric: of the two yaws, take the one the wrist joint can turn to.
        return point, (yaw - WRIST_YAW + math.pi / 2) % math.pi - math.pi / 2 + WRIST_YAW

    def _goal(self, ep: _Episode, state: np.ndarray, obj: Box, target: Box) -> _Goal:
        eef, here = state[:3], Rotation.from_rotvec(state[3:6])
        yaw = _yaw(state)
        if ep.phase in (Phase.APPROACH, Phase.DESCEND, Phase.CLOSE):
            point, grasp_yaw = self._grasp(obj, ep.attempt)
            above = self.hover if ep.phase is Phase.APPROACH else 0.0
            return _Goal(point + [0.0, 0.0, above], grasp_yaw, CLOSE if ep.phase is Phase.CLOSE else OPEN)
        if ep.phase is Phase.LIFT:
            return _Goal(np.array([*eef[:2], ep.lift_z]), yaw, CLOSE)
        if ep.phase in (Phase.CARRY, Phase.LOWER):
            xy = target.center[:2] + (eef[:2] - obj.center[:2])
            if ep.phase is Phase.LOWER:
                z = target.top + self.clearance + eef[2] - obj.bottom
            else:  # at lift height until within ``lift`` of the target, so the object leaves a drawer first
                z = ep.lift_z if np.linalg.norm(xy - eef[:2]) > self.lift else ep.carry_z
            orientation = None
            if obj.is_open_vessel(self.max_opening):
                # A vessel hangs from its rim tilted (a bowl that slid off a ramekin hangs at ~50 degrees) and,
                # let go tilted, tips over off the target: turn the wrist until it is level.
                level = Rotation.align_vectors([[0.0, 0.0, 1.0]], [obj.opening()])[0]
                tilt = level.magnitude()  # turned only to LEVEL: the arm reaches less far with its wrist bent
                level = Rotation.from_rotvec(level.as_rotvec() * max(tilt - LEVEL, 0.0) / max(tilt, 1e-9))
                orientation = level * here
            return _Goal(np.array([*xy, z]), yaw, CLOSE, orientation)
        # Let go, and rise, without turning the wrist: a levelled grip turning back would knock the vessel over.
        if ep.phase is Phase.RELEASE:
            return _Goal(eef.copy(), yaw, OPEN, here)
        return _Goal(eef + [0.0, 0.0, self.hover], yaw, OPEN, here)

    def _advance(self, ep: _Episode, state: np.ndarray, obj: Box, target: Box, step: int) -> None:
        """Move on through every phase whose exit condition the observation meets."""
        eef = state[:3]
        moved = np.linalg.norm(eef - ep.pos) / max(step - ep.step, 1)
        while True:
            goal = self._goal(ep, state, obj, target)
            err = goal.position - eef
            near_xy = np.linalg.norm(err[:2]) < self.tolerance
            elapsed = step - ep.since
            stalled = elapsed > 0 and moved < 0.0005
            phase = ep.phase
            if phase is Phase.APPROACH:
                turned = abs(_wrap(goal.yaw - _yaw(state))) < 0.1
                done = near_xy and abs(err[2]) < 2 * self.tolerance and turned and moved < 0.003
            elif phase is Phase.DESCEND:
                if stalled and err[2] < -BLOCKED and obj.is_open_vessel(self.max_opening):
                    ep.phase, ep.since, ep.attempt = Phase.RETREAT, step, ep.attempt + 1  # a finger landed on something
                    continue
                done = (near_xy and abs(err[2]) < self.tolerance) or stalled
            elif phase is Phase.CLOSE:
                done = elapsed >= self.close_steps
                if done:
                    ep.grasp_bottom = obj.bottom
                    ep.carry_z = target.top + self.clearance + self.hover / 2 + eef[2] - obj.bottom
                    ep.lift_z = max(eef[2] + self.lift, ep.carry_z)
            elif phase is Phase.LIFT:
                done = abs(err[2]) < 2 * self.tolerance or stalled
                if done and obj.bottom - ep.grasp_bottom < self.lift / 2:
                    ep.phase, ep.since, ep.attempt = Phase.RETREAT, step, ep.attempt + 1  # the object stayed behind
                    continue
                ep.hold = eef - obj.center
            elif phase in (Phase.CARRY, Phase.LOWER):
                # The distance, not the offset: levelling turns a vessel about the grip.
                if abs(np.linalg.norm(eef - obj.center) - np.linalg.norm(ep.hold)) > 0.04:
                    ep.phase, ep.since = Phase.RETREAT, step  # dropped on the way: try again
                    continue
                if phase is Phase.CARRY:  # lowering goes on closing the gap across
                    done = np.linalg.norm(err[:2]) < 2 * self.tolerance and abs(err[2]) < 2 * self.tolerance
                else:
                    done = (near_xy and abs(err[2]) < 2 * self.tolerance) or stalled
            elif phase is Phase.RELEASE:
                done = elapsed >= self.release_steps
            else:  # still running after the release or a failed grasp: start over
                done = elapsed >= 2 * self.release_steps
            if not done:
                return
            ep.phase, ep.since = Phase((phase + 1) % len(Phase)), step

    def _track(self, state: np.ndarray, velocity: np.ndarray, goal: _Goal) -> tuple[np.ndarray, np.ndarray]:
        """An open-loop chunk steering a model of the eef to the goal, and the model's velocities.

        The model: each step the eef velocity closes ``lag`` of its gap to
        ``METERS_PER_ACTION * action``. The action asks for the velocity that
        covers ``gain`` of the remaining distance, compensating the lag.
        """
        pos = state[:3].copy()
        rot = Rotation.from_rotvec(state[3:6])
        target_rot = Rotation.from_euler("z", goal.yaw) * _DOWN if goal.orientation is None else goal.orientation
        chunk = np.empty((self.chunk_size, ACTION_DIM))
        velocities = np.empty((self.chunk_size, 3))
        for i in range(self.chunk_size):
            wanted = self.gain * (goal.position - pos)
            move = _clip((wanted - (1 - self.lag) * velocity) / (self.lag * METERS_PER_ACTION))
            turn = _clip(self.rot_gain * (target_rot * rot.inv()).as_rotvec() / RADIANS_PER_ACTION)
            chunk[i] = [*move, *turn, goal.gripper]
            velocity = velocity + self.lag * (move * METERS_PER_ACTION - velocity)
            velocities[i] = velocity
            pos = pos + velocity
            rot = Rotation.from_rotvec(turn * RADIANS_PER_ACTION) * rot
        return chunk, velocities


def _clip(action: np.ndarray) -> np.ndarray:
    """Scale a vector into [-1, 1] keeping its direction, so moves stay straight."""
    peak = np.max(np.abs(action))
    return action / peak if peak > 1.0 else action


def _yaw(state: np.ndarray) -> float:
    x_axis = Rotation.from_rotvec(state[3:6]).as_matrix()[:, 0]
    return math.atan2(x_axis[1], x_axis[0])


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi
