"""Episodes over simulator workers, with one batched policy call per round.

Each worker runs one episode at a time, taken in order from the run's job
iterator (drawn only when a worker is free, so the planner may decide late
what comes last), and each finished episode is yielded to the caller. A round waits for the reply of every episode due in it, then calls the
policy once for all of them. Rounds are counted, not timed: which episodes
share a policy call depends on the job list, the episodes' lengths and
``join_rounds``, never on how fast a worker happened to be, so a rerun with
the same settings makes the same calls (batched forwards differ from batch-1
ones in the last bits, and a learned policy can amplify that).

A starting episode is due ``join_rounds`` rounds after it began: with 0 the
other workers wait for its reset; a larger value lets them go on meanwhile,
and if the reset takes longer still, the round waits for it then
(:func:`default_join_rounds`). While ``serial()`` holds (a
quantized policy calibrating), only the first worker takes episodes, one at
a time: the policy then sees exactly the observations of a one-worker run,
so calibration, and with it a quantized run's results, does not depend on
the number of workers.

A worker's reply is the episode's next observation (IPC once per chunk, not
per step); a crashed or hung worker is restarted and its episode recorded
with the error.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from libero_eval.env import RenderingUnavailable
from libero_eval.plan import EpisodeInfo, Job
from libero_eval.rollout import EnvProgress, EpisodeOutcome, EpisodeState, Protocol, ask
from libero_eval.workers import Begin, CommandFailed, Execute, Prepare, Worker, replies
from policies.base import Policy

POLL_S = 0.5  # longest wait for a reply before the stop event is checked again


def default_join_rounds(reset: str, cameras: bool) -> int:
    """Rounds that hide a reset behind the other workers' rounds: chosen from the settings, not measured, so
    runs stay reproducible. A hard reset takes ~2.7 s on CPU, about 15 physics-only rounds (5 steps of ~23 ms
    plus a policy call) or 2 rounds with cameras (~340 ms a step); a soft reset takes ~0.05 s."""
    if reset == "soft":
        return 0
    return 2 if cameras else 15


@dataclass(frozen=True)
class Finished:
    job: Job
    outcome: EpisodeOutcome
    wall_s: float


@dataclass
class _Running:
    job: Job
    worker: int  # index into the scheduler's workers
    state: EpisodeState
    order: int  # rows of a batch keep the order their episodes started in
    due: int  # the first round the episode takes part in
    started: float


class EnvStartFailed(RuntimeError):
    """A simulator worker could not build the run's first env (before any episode ran)."""


class Scheduler:
    def __init__(
        self,
        workers: list[Worker],
        policy: Policy,
        protocol: Protocol,
        describe: Callable[[Job], EpisodeInfo],
        stop: threading.Event,
        join_rounds: int = 0,
    ):
        self.workers, self.policy, self.protocol = workers, policy, protocol
        self.describe, self.stop, self.join_rounds = describe, stop, join_rounds
        self._order = itertools.count()

    def prepare(self, task_id: int) -> None:
        """Every worker builds the task's env now: a rendering failure, or a worker that cannot build it in time,
        is raised before anything is written."""
        for worker in self.workers:
            worker.submit(Prepare(task_id))
        while any(w.busy for w in self.workers):
            for _, reply in self._replies():
                if isinstance(reply, CommandFailed):
                    if reply.rendering:
                        raise RenderingUnavailable(reply.message)
                    hint = "; on a loaded machine raise step_timeout_s" if "WorkerTimeout" in reply.message else ""
                    raise EnvStartFailed(f"the simulator could not build task {task_id}'s env ({reply.message}){hint}")

    def run(self, jobs: Iterator[Job], serial: Callable[[], bool] = lambda: False) -> Iterator[Finished]:
        """Run ``jobs`` and yield each episode as it finishes; a set stop event raises KeyboardInterrupt."""
        running: dict[int, _Running] = {}  # by worker index
        inbox: dict[int, EnvProgress | CommandFailed | None] = {}  # replies held until their episode is due
        round_, exhausted = 0, False
        while running or not exhausted:
            if self.stop.is_set():
                raise KeyboardInterrupt
            one_at_a_time = serial()
            for index in range(1 if one_at_a_time else len(self.workers)):
                if index not in running and not exhausted:
                    job = next(jobs, None)
                    exhausted = job is None
                    if job is not None:
                        delay = 0 if one_at_a_time else self.join_rounds
                        running[index] = self._begin(index, job, round_ + delay)
            if not running:
                continue
            due = sorted((r for r in running.values() if r.due <= round_), key=lambda r: r.order)
            if not due:  # every episode is starting: no round can happen before the first is due
                round_ = min(r.due for r in running.values())
                continue
            if any(r.worker not in inbox for r in due):
                inbox.update(self._replies())
                continue
            batch = []
            for episode in due:
                self._settle(episode, inbox.pop(episode.worker))
                if episode.state.finished:
                    yield self._finish(running, episode)
                else:
                    batch.append(episode)
            planned = {id(state): actions for state, actions in ask(self.policy, [r.state for r in batch])}
            for episode in batch:
                if not episode.state.finished:
                    self.workers[episode.worker].submit(Execute(planned[id(episode.state)]))
                else:  # the policy call failed for this row
                    yield self._finish(running, episode)
            round_ += 1

    @staticmethod
    def _finish(running: dict[int, _Running], episode: _Running) -> Finished:
        del running[episode.worker]
        return Finished(episode.job, episode.state.outcome, time.perf_counter() - episode.started)

    def _begin(self, index: int, job: Job, due: int) -> _Running:
        info = self.describe(job)
        state = EpisodeState(info.episode_id, info.seed, info.instruction, self.protocol)
        self.workers[index].submit(Begin(job.task_id, job.episode))
        return _Running(job, index, state, next(self._order), due, time.perf_counter())

    def _replies(self) -> list[tuple[int, EnvProgress | CommandFailed | None]]:
        """(worker index, reply) of busy workers, waiting up to POLL_S for one; an overdue worker's reply is its failure."""
        deadlines = [w.deadline for w in self.workers if w.deadline is not None]
        timeout = max(0.0, min([POLL_S, *(d - time.monotonic() for d in deadlines)]))
        ready = {id(w) for w in replies(self.workers, timeout)}
        got = [(i, w.receive()) for i, w in enumerate(self.workers) if id(w) in ready]
        now = time.monotonic()
        return got + [(i, failure) for i, w in enumerate(self.workers) if (failure := w.overdue(now)) is not None]

    @staticmethod
    def _settle(episode: _Running, reply: EnvProgress | CommandFailed) -> None:
        if isinstance(reply, CommandFailed):
            if reply.rendering:
                raise RenderingUnavailable(reply.message)
            episode.state.fail(reply.message)
        else:
            episode.state.advance(reply)
