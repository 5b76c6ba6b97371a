"""An evaluation run: plan -> schedule -> record.

The policy sees no dummy input: its first call is the run's first real
observation, and a quantized run's first ``calib_steps`` calls calibrate.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from libero_eval.config import RunConfig, parse_shard, recorded_defaults
from libero_eval.plan import EpisodePlan, Job, ResumeMismatch
from libero_eval.quantize import CalibratingPolicy
from libero_eval.record import Recorder
from libero_eval.results import ResultsFile, config_differences, error_summary, errored, git_state, now_iso, versions
from libero_eval.rollout import Protocol
from libero_eval.scheduler import Scheduler, default_join_rounds
from libero_eval.workers import EnvSpec, start_workers
from policies import Policy
from policies.base import recorded_weights_sha256

__all__ = ["Evaluation", "ResumeMismatch", "RunFailed"]
log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run measured nothing: its episodes could not be evaluated. The message is one line."""


def repeated_error(errors: list[str | None], n: int) -> str | None:
    """The error of the first ``n`` episodes when all ``n`` raised the same exception type, else None."""
    if n < 1 or len(errors) < n or any(e is None for e in errors[:n]):
        return None
    kinds = {e.split(":")[0] for e in errors[:n]}
    return errors[0] if len(kinds) == 1 else None


def _device_of(policy: Policy) -> str:
    module = policy.module
    param = next(module.parameters(), None) if module is not None else None
    if param is None or param.device.type == "cpu":
        return "cpu"
    return f"{param.device} ({torch.cuda.get_device_name(param.device)})"


class Evaluation:
    """One run over (task, init state) episodes of ``policy`` (a :class:`CalibratingPolicy` for a quantized run),
    resumable and safe to interrupt."""

    def __init__(self, cfg: RunConfig, resolved_config: dict, policy: Policy):
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.policy = policy
        self.calibrator = policy if isinstance(policy, CalibratingPolicy) else None
        self.plan = EpisodePlan(cfg)
        self.protocol = Protocol(num_steps_wait=cfg.protocol.num_steps_wait, max_steps=cfg.suite.max_steps,
                                 replan_steps=cfg.protocol.replan_steps)  # fmt: skip
        self.stop = threading.Event()  # set by a signal handler: the run stops at the next chunk, resumable
        self.num_envs: int | None = None  # the worker count once run() starts
        self.status: str | None = None  # the run's final status once run() returns
        self.results_path: Path | None = None  # the results JSON once it exists
        self.errors: str | None = None  # one line on the errored episodes once run() returns, if any

    # -- set-up -------------------------------------------------------------------------------------------------

    def protocol_record(self) -> dict:
        p = self.cfg.protocol
        return {**asdict(self.protocol), "suite": self.cfg.suite.name, "seed": self.cfg.seed,
                "obs_mode": self.policy.obs_mode.value, "image_size": p.image_size, "camera_size": p.camera_size,
                "chunk_size": self.policy.chunk_size, "init_state": "episode i starts from the suite's init state i",
                "reset": p.reset, "render_quality": p.render_quality}  # fmt: skip

    def _header(self) -> dict:
        checkpoint, described = self.policy.checkpoint, self.policy.describe()
        return {
            "started_at": now_iso(),
            "git": git_state(),
            "versions": versions(),
            "device": _device_of(self.policy),
            "config": self.resolved_config,
            "policy": {"name": self.policy.name, "checkpoint": checkpoint,
                       "weights_sha256": recorded_weights_sha256(checkpoint, described), **described},  # fmt: skip
            "quant": {"mode": self.cfg.quant.mode, "tag": self.cfg.quant.tag()},
            "protocol": self.protocol_record(),
        }

    def _create_results(self) -> ResultsFile:
        tag = self.cfg.quant.tag()
        first, step = parse_shard(self.cfg.shard)
        if step > 1:
            tag += f"_shard{first}of{step}"
        return ResultsFile.create(Path(self.cfg.results_dir), self.cfg.suite.name, self.policy.name, tag, self._header())

    def _resumed_results(self) -> ResultsFile:
        results = ResultsFile.load(Path(self.cfg.resume))
        # Only how the run executes may change (a quantized run calibrates on one worker whatever their count).
        diff = config_differences(results.header.get("config") or {}, self.resolved_config, defaults=recorded_defaults())
        if diff:
            raise ResumeMismatch(f"resume: config differs from the interrupted run in {', '.join(diff)}")
        return results

    def _env_spec(self) -> EnvSpec:
        cfg = self.cfg
        return EnvSpec(suite=cfg.suite.name, obs_mode=self.policy.obs_mode.value, seed=cfg.seed,
                       camera_size=cfg.protocol.camera_size, image_size=cfg.protocol.image_size,
                       render=True if cfg.video else None, reset=cfg.protocol.reset,
                       render_quality=cfg.protocol.render_quality, num_steps_wait=cfg.protocol.num_steps_wait,
                       record_video=cfg.video)  # fmt: skip

    @property
    def join_rounds(self) -> int:
        if self.cfg.join_rounds is not None:
            return self.cfg.join_rounds
        return default_join_rounds(self.cfg.protocol.reset, cameras=self._env_spec().renders)

    def _scheduler(self, num_envs: int) -> Scheduler:
        workers = start_workers(self._env_spec(), num_envs, self.cfg.step_timeout_s)
        return Scheduler(workers, self.policy, self.protocol, self.plan.describe, self.stop, self.join_rounds)

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        results = self._resumed_results() if self.cfg.resume is not None else None
        replay = []
        if results is not None and self.calibrator is not None:
            replay = self.plan.calibration_replay(results.header, results.episodes, results.json_path)
        pending = self.plan.pending(results.done() if results is not None else set())
        self.num_envs = self.cfg.num_envs or max(1, min(os.cpu_count() or 1, len(pending)))
        scheduler = self._scheduler(self.num_envs)
        try:
            if pending:
                scheduler.prepare(pending[0].task_id)  # fail on rendering before any file is written
            if results is None:
                results = self._create_results()
            self.results_path = results.json_path
            results.update(execution={"num_envs": self.num_envs, "join_rounds": self.join_rounds})
            self.policy.reset()  # once per run: policies keep per-episode state by episode id
            if replay:
                self._replay_calibration(replay)
            served_before = len(self.calibrator.calibration_calls) if self.calibrator is not None else 0
            recorder = Recorder(results, self.cfg.suite.name, self.calibrator, served_before)
            self._run_jobs(results, recorder, scheduler, pending, served_before)
        finally:
            for worker in scheduler.workers:
                worker.close()
        return results.json_path

    def _run_jobs(self, results: ResultsFile, recorder: Recorder, scheduler: Scheduler, pending: list[Job],
                  served_before: int) -> None:  # fmt: skip
        total = len(self.plan.episodes)
        bar = tqdm(total=total, initial=total - len(pending), desc=self.cfg.suite.name, unit="ep",
                   disable=not self.cfg.progress)  # fmt: skip
        first_errors: list[str | None] = []  # of this session's first episodes: a policy that always raises
        # Only when the session has more episodes than that (else the end decides).
        n = self.cfg.abort_after_errors if self.cfg.abort_after_errors < len(pending) else 0

        def finished():  # the pending episodes, then the rescores their calibration asks for
            yield from scheduler.run(iter(pending), serial=self._calibrating)
            yield from scheduler.run(iter(self.plan.rescore_jobs(self.calibrator, served_before)))

        status = "failed"
        try:
            for done in finished():
                recorder.episode(done.job, self.plan.describe(done.job), done.outcome, done.wall_s)
                first_errors.append(done.outcome.error)
                if len(first_errors) == n and (error := repeated_error(first_errors, n)) is not None:
                    raise RunFailed(f"the first {n} episodes all raised {error.splitlines()[0]}")
                if not done.job.rescore:
                    bar.update(1)
                    rate = sum(e["success"] for e in results.episodes) / len(results.episodes)
                    bar.set_postfix(success=f"{rate:.1%}")
            recorder.calibration()
            if results.episodes and all(errored(e) for e in results.episodes):
                raise RunFailed(f"every episode errored: {error_summary(results.episodes)}")
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: %d episodes recorded; resume with resume=%s", len(results.episodes), results.json_path)
        finally:
            bar.close()
            if self.calibrator is not None:
                results.update(quant=recorder.quant_record())
            results.write(status)
            self.status, self.errors = status, error_summary(results.episodes)

    def _calibrating(self) -> bool:
        return self.calibrator is not None and not self.calibrator.calibrated

    def _replay_calibration(self, replay: list[Job]) -> None:
        """Recalibrate a resumed quantized run on the same observations as the original.

        The calibration episodes are replayed in their recorded order, one at
        a time as they ran (deterministic simulator, per-episode policy noise),
        so the policy sees the same observations and the statistics, transforms
        and pack are the ones the interrupted run had; their outcomes are not
        recorded again.
        """
        scheduler = self._scheduler(1)
        try:
            for _ in scheduler.run(iter(replay), serial=lambda: True):
                pass
        finally:
            for worker in scheduler.workers:
                worker.close()
