"""Episodes under the openpi LIBERO protocol.

Wait ``num_steps_wait`` steps with the dummy action, then ask the policy for an
action chunk, execute its first ``replan_steps`` actions, ask again, until the
task succeeds or ``max_steps`` policy-driven steps have run.

The protocol is split where a process boundary may fall: :func:`begin` and
:func:`execute` touch only the env (they run inside a simulator worker), while
:class:`EpisodeState` and :func:`ask` touch only the policy side, so one policy
call can serve the episodes of many workers. :func:`run_episode` joins them
for one episode in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from libero_eval.env import DUMMY_ACTION, LiberoEnv
from policies.base import ACTION_DIM, Policy, collate


@dataclass(frozen=True)
class Protocol:
    num_steps_wait: int = 10
    max_steps: int = 220
    replan_steps: int = 5


class PolicyOutputError(ValueError):
    """The policy returned something that cannot be executed."""


@dataclass
class EpisodeOutcome:
    success: bool
    steps: int  # policy-driven env steps (the wait is not counted)
    policy_calls: int
    call_latencies_ms: list[float] = field(default_factory=list)
    env_step_ms: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    error: str | None = None  # set when the episode stopped on an exception (counted as a failure)


@dataclass
class EnvProgress:
    """What the env side reports after starting an episode or executing a chunk."""

    obs: dict
    success: bool = False
    steps: int = 0  # policy-driven steps executed
    step_ms: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)


def begin(env: LiberoEnv, init_state: np.ndarray, num_steps_wait: int, record_video: bool = False) -> EnvProgress:
    """Reset into ``init_state`` and let the scene settle; the wait's steps are not the policy's."""
    progress = EnvProgress(env.reset(init_state))
    if record_video:
        progress.frames.append(env.frame())
    for _ in range(num_steps_wait):
        progress.obs, _ = env.step(DUMMY_ACTION)  # as openpi: success is not checked while waiting
        if record_video:
            progress.frames.append(env.frame())
    return progress


def execute(
    env: LiberoEnv,
    obs: dict,
    actions: np.ndarray,
    *,
    record_video: bool = False,
    on_step: Callable[[dict, np.ndarray], None] | None = None,
) -> EnvProgress:
    """Execute ``actions`` from observation ``obs``, stopping early when the task succeeds."""
    progress = EnvProgress(obs)
    for action in actions:
        if on_step is not None:
            on_step(progress.obs, action)
        start = time.perf_counter()
        progress.obs, progress.success = env.step(action)
        progress.step_ms.append((time.perf_counter() - start) * 1e3)
        progress.steps += 1
        if record_video:
            progress.frames.append(env.frame())
        if progress.success:
            break
    return progress


@dataclass
class EpisodeState:
    """The policy side of one running episode: its latest observation and its outcome so far."""

    episode_id: str
    seed: int
    instruction: str
    protocol: Protocol
    obs: dict | None = None
    outcome: EpisodeOutcome = field(default_factory=lambda: EpisodeOutcome(success=False, steps=0, policy_calls=0))

    @property
    def finished(self) -> bool:
        out = self.outcome
        return out.error is not None or out.success or out.steps >= self.protocol.max_steps

    def advance(self, progress: EnvProgress) -> None:
        out = self.outcome
        self.obs, out.success = progress.obs, progress.success
        out.steps += progress.steps
        out.env_step_ms.extend(progress.step_ms)
        out.frames.extend(progress.frames)

    def fail(self, error: str) -> None:
        self.outcome.success, self.outcome.error = False, error

    def actions(self, chunk: np.ndarray) -> np.ndarray:
        """The part of a predicted chunk to execute: ``replan_steps`` actions, fewer near ``max_steps``."""
        return check_chunk(chunk, min(self.protocol.replan_steps, self.protocol.max_steps - self.outcome.steps))


def _synchronize() -> None:
    # Latency must include queued GPU work, not just the kernel launches.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def check_chunk(chunk: np.ndarray, replan_steps: int) -> np.ndarray:
    """Validate one row of a policy's output; raises PolicyOutputError with what is wrong."""
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or len(chunk) < 1:
        raise PolicyOutputError(f"policy returned an action chunk of shape {chunk.shape}, expected [chunk, {ACTION_DIM}]")
    if not np.isfinite(chunk).all():
        raise PolicyOutputError("policy returned a non-finite action (NaN or inf)")
    return chunk[:replan_steps]


def _layout(obs: dict) -> int:
    # Rows of one batch must stack: tasks of one suite differ in their number of objects of interest.
    poses = obs.get("object_poses")
    return 0 if poses is None else len(poses)


def ask(policy: Policy, episodes: Sequence[EpisodeState]) -> list[tuple[EpisodeState, np.ndarray]]:
    """One policy call per observation layout for ``episodes``; returns each episode's actions to execute.

    Every row gets the call's latency. An episode whose row cannot be executed,
    or whose call raised, is failed with the reason and left out of the result.
    """
    groups: dict[int, list[EpisodeState]] = {}
    for episode in episodes:
        groups.setdefault(_layout(episode.obs), []).append(episode)
    planned = []
    for group in groups.values():
        batch = collate([e.obs for e in group], [e.instruction for e in group], [e.episode_id for e in group],
                        [e.seed for e in group], [e.outcome.steps for e in group])  # fmt: skip
        start = time.perf_counter()
        try:
            chunks = policy.predict(batch)
            _synchronize()
            if len(chunks) != len(group):
                raise PolicyOutputError(f"policy returned {len(chunks)} action chunks for a batch of {len(group)}")
        except Exception as exc:  # noqa: BLE001 - the call's failure belongs to the records of its episodes
            for episode in group:
                episode.fail(f"{type(exc).__name__}: {exc}")
            continue
        latency_ms = (time.perf_counter() - start) * 1e3
        for episode, chunk in zip(group, chunks):
            episode.outcome.call_latencies_ms.append(latency_ms)
            episode.outcome.policy_calls += 1
            try:
                planned.append((episode, episode.actions(chunk)))
            except PolicyOutputError as exc:
                episode.fail(f"{type(exc).__name__}: {exc}")
    return planned


def run_episode(
    env: LiberoEnv,
    policy: Policy,
    init_state: np.ndarray,
    *,
    protocol: Protocol,
    episode_id: str,
    seed: int,
    record_video: bool = False,
    on_step: Callable[[dict, np.ndarray], None] | None = None,
    stop: threading.Event | None = None,
) -> EpisodeOutcome:
    """Roll out one episode in this process; ``on_step(observation, action)`` sees every policy-driven step.

    An exception inside the episode (simulator instability, a bad action) ends
    it as a failure with the message in ``error``. A set ``stop`` event ends
    the episode between two chunks with KeyboardInterrupt: signals are turned
    into that event rather than raised where they land, because LIBERO's reset
    loop swallows exceptions.
    """
    stop = stop or threading.Event()
    episode = EpisodeState(episode_id, seed, env.task.instruction, protocol)
    try:
        policy.reset()
        episode.advance(begin(env, init_state, protocol.num_steps_wait, record_video))
        while not episode.finished:
            if stop.is_set():
                raise KeyboardInterrupt
            for _, actions in ask(policy, [episode]):
                episode.advance(execute(env, episode.obs, actions, record_video=record_video, on_step=on_step))
    except Exception as exc:  # noqa: BLE001 - any failure belongs to this episode's record
        episode.fail(f"{type(exc).__name__}: {exc}")
    return episode.outcome
