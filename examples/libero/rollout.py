"""One episode under the openpi LIBERO protocol.

Wait ``num_steps_wait`` steps with the dummy action, then ask the policy for an
action chunk, execute its first ``replan_steps`` actions, ask again, until the
task succeeds or ``max_steps`` policy-driven steps have run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from examples.libero.env import DUMMY_ACTION, LiberoEnv
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
    """Roll out one episode; ``on_step(observation, action)`` sees every policy-driven step.

    An exception inside the episode (simulator instability, a bad action) ends
    it as a failure with the message in ``error``; the run goes on. A set
    ``stop`` event ends the episode between two steps with KeyboardInterrupt:
    signals are turned into that event rather than raised where they land,
    because LIBERO's reset loop swallows exceptions.
    """
    out = EpisodeOutcome(success=False, steps=0, policy_calls=0)
    stop = stop or threading.Event()

    def step(action) -> tuple[dict, bool]:
        start = time.perf_counter()
        obs, done = env.step(action)
        out.env_step_ms.append((time.perf_counter() - start) * 1e3)
        if record_video:
            out.frames.append(env.frame())
        return obs, done

    try:
        policy.reset()
        obs = env.reset(init_state)
        if record_video:
            out.frames.append(env.frame())
        for _ in range(protocol.num_steps_wait):
            obs, _ = step(DUMMY_ACTION)  # as openpi: success is not checked while waiting
        out.env_step_ms.clear()  # the wait is not part of the policy's episode
        plan: deque[np.ndarray] = deque()
        while out.steps < protocol.max_steps and not out.success:
            if stop.is_set():
                raise KeyboardInterrupt
            if not plan:
                plan.extend(_ask(policy, obs, env, episode_id, seed, out, protocol.replan_steps))
            action = plan.popleft()
            if on_step is not None:
                on_step(obs, action)
            obs, out.success = step(action)
            out.steps += 1
    except Exception as exc:  # noqa: BLE001 - any failure belongs to this episode's record
        out.success = False
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _ask(policy: Policy, obs: dict, env: LiberoEnv, episode_id: str, seed: int, out: EpisodeOutcome, replan_steps: int):
    batch = collate([obs], [env.task.instruction], [episode_id], [seed], [out.steps])
    start = time.perf_counter()
    chunks = policy.predict(batch)
    _synchronize()
    out.call_latencies_ms.append((time.perf_counter() - start) * 1e3)
    out.policy_calls += 1
    if len(chunks) != 1:
        raise PolicyOutputError(f"policy returned {len(chunks)} action chunks for a batch of 1")
    return check_chunk(chunks[0], replan_steps)
