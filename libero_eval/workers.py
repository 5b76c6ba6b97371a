"""Simulator workers: each holds one LIBERO env at a time and runs env-side commands.

:class:`ProcessWorker` runs them in a spawned process, which builds its env
itself, so no MuJoCo or GL state crosses a fork. :class:`LocalWorker` runs
them in this process (``num_envs=1``: plain stack traces, a debugger works).
Both answer a command with :class:`~libero_eval.rollout.EnvProgress` or
:class:`CommandFailed`, so the scheduler cannot tell them apart.

gymnasium's ``AsyncVectorEnv`` is not used: it steps every env in lock-step
(one env's ~2.7 s hard reset would stall all others, ~50 chunks' worth on
CPU), needs one observation space for all envs (tasks differ in their number
of objects), and cannot restart a single crashed or hung env.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

from libero_eval.env import LiberoEnv, RenderingUnavailable, Task, load_task
from libero_eval.rollout import EnvProgress, begin, execute
from policies.base import ObsMode

STARTUP_S = 120.0  # a fresh worker imports torch, robosuite and LIBERO first: up to a minute on a loaded machine


@dataclass(frozen=True)
class EnvSpec:
    """Everything a worker needs to build its envs; picklable, so it travels to a spawned process."""

    suite: str
    obs_mode: str
    seed: int
    camera_size: int
    image_size: int
    render: bool | None  # None: cameras only when the policy reads images
    reset: str
    render_quality: str
    num_steps_wait: int
    record_video: bool

    @property
    def renders(self) -> bool:
        return ObsMode(self.obs_mode) is ObsMode.RGB if self.render is None else self.render

    def build(self, task: Task) -> LiberoEnv:
        return LiberoEnv(task, self.obs_mode, seed=self.seed, camera_size=self.camera_size, image_size=self.image_size,
                         render=self.render, reset=self.reset, render_quality=self.render_quality)  # fmt: skip


@dataclass(frozen=True)
class Prepare:
    """Build the env of a task, so a rendering failure surfaces before a run writes anything."""

    task_id: int


@dataclass(frozen=True)
class Begin:
    task_id: int
    init_state: int


@dataclass(frozen=True)
class Execute:
    actions: np.ndarray


Command = Prepare | Begin | Execute


@dataclass(frozen=True)
class CommandFailed:
    message: str
    rendering: bool = False  # offscreen rendering could not start: the run cannot go on


class EnvRunner:
    """The env side of a worker: one task's env at a time, rebuilt when the task changes."""

    def __init__(self, spec: EnvSpec):
        self.spec = spec
        self._task_id: int | None = None
        self._env: LiberoEnv | None = None
        self._init_states: np.ndarray | None = None
        self._obs: dict | None = None

    def handle(self, command: Command) -> EnvProgress | CommandFailed | None:
        """Run one command; a simulator failure is returned, RenderingUnavailable raised (the run cannot go on)."""
        try:
            if isinstance(command, Prepare):
                self._env_for(command.task_id)
                return None
            if isinstance(command, Begin):
                env = self._env_for(command.task_id)
                progress = begin(env, self._init_states[command.init_state], self.spec.num_steps_wait,
                                 self.spec.record_video)  # fmt: skip
            else:
                progress = execute(self._env, self._obs, command.actions, record_video=self.spec.record_video)
        except RenderingUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - simulator failures belong to the episode's record
            return CommandFailed(f"{type(exc).__name__}: {exc}")
        self._obs = progress.obs
        return progress

    def _env_for(self, task_id: int) -> LiberoEnv:
        if task_id != self._task_id:
            self.close()  # one env at a time: a LIBERO env holds a full MuJoCo model
            task, self._init_states = load_task(self.spec.suite, task_id)
            self._env = self.spec.build(task)
            self._task_id = task_id
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._task_id = None, None


class LocalWorker:
    """Runs commands in this process, synchronously: the reply is ready as soon as submit returns."""

    def __init__(self, spec: EnvSpec):
        self._runner = EnvRunner(spec)
        self._reply: EnvProgress | CommandFailed | None = None
        self.busy = False
        self.deadline: float | None = None  # in-process: no timeout, a hang is the user's debugger session

    def submit(self, command: Command) -> None:
        self._reply, self.busy = self._runner.handle(command), True

    def receive(self) -> EnvProgress | CommandFailed | None:
        self.busy = False
        return self._reply

    def overdue(self, now: float) -> CommandFailed | None:
        return None

    def close(self) -> None:
        self._runner.close()


def _serve(conn: Connection, spec: EnvSpec) -> None:
    """A worker process's loop: one reply per command until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    runner = EnvRunner(spec)
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:  # the parent died: do not linger
                return
            if command is None:
                return
            try:
                reply = runner.handle(command)
            except RenderingUnavailable as exc:
                # Half-built GL objects complain as they are freed; the parent reports the error in one line.
                sys.unraisablehook = lambda unraisable: None
                reply = CommandFailed(str(exc), rendering=True)
            conn.send(reply)
    finally:
        runner.close()


class ProcessWorker:
    """A spawned process running :class:`EnvRunner`; restarted in place when it crashes or hangs.

    A command may take ``step_timeout_s`` per env step it runs, plus one
    ``step_timeout_s`` for the reset or env build before them; a fresh
    process's first command also gets STARTUP_S for its imports.
    """

    def __init__(self, spec: EnvSpec, step_timeout_s: float):
        self.spec, self.step_timeout_s = spec, step_timeout_s
        self.busy = False
        self._deadline: float | None = None
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.spec), daemon=True, name="libero-env-worker")
        self.process.start()
        child.close()  # only the child holds its end: its death reads as EOF here
        self._startup = STARTUP_S

    def submit(self, command: Command) -> None:
        try:
            self.conn.send(command)
        except OSError:
            pass  # the process is gone: its end of the pipe reads as EOF, and receive() reports the crash
        allowed = self.step_timeout_s * (self._env_steps(command) + 1) + self._startup
        self.busy, self._deadline, self._startup = True, time.monotonic() + allowed, 0.0

    def _env_steps(self, command: Command) -> int:
        if isinstance(command, Execute):
            return len(command.actions)
        return self.spec.num_steps_wait if isinstance(command, Begin) else 0

    @property
    def deadline(self) -> float | None:
        return self._deadline if self.busy else None

    def receive(self) -> EnvProgress | CommandFailed | None:
        self.busy = False
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            code = self.process.exitcode
            self._restart()
            return CommandFailed(f"WorkerCrashed: env worker exited with code {code}; restarted")

    def overdue(self, now: float) -> CommandFailed | None:
        if not self.busy or now < self._deadline:
            return None
        self.busy = False
        self._restart()
        return CommandFailed(
            f"WorkerTimeout: env worker gave no reply within {self.step_timeout_s:g} s per step; restarted"
        )

    def _restart(self) -> None:
        self._stop(graceful=False)
        self._start()

    def _stop(self, graceful: bool) -> None:
        if graceful and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def close(self) -> None:
        self._stop(graceful=not self.busy)  # a busy worker would finish its command first


Worker = LocalWorker | ProcessWorker


def replies(workers: list[Worker], timeout: float | None) -> list[Worker]:
    """The busy workers whose reply is ready, waiting up to ``timeout`` s for at least one."""
    busy = [w for w in workers if w.busy]
    local = [w for w in busy if isinstance(w, LocalWorker)]
    if local or not busy:
        return local
    ready = set(wait([w.conn for w in busy], timeout))
    return [w for w in busy if w.conn in ready]


def start_workers(spec: EnvSpec, count: int, step_timeout_s: float) -> list[Worker]:
    """``count`` process workers, or one local worker for ``count == 1``."""
    if count == 1:
        return [LocalWorker(spec)]
    return [ProcessWorker(spec, step_timeout_s) for _ in range(count)]
