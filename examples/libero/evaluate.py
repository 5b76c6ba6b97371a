"""An evaluation run: policy -> (quantize) -> rollouts -> results file.

The policy sees no dummy input: its first call is the run's first real
observation, and for quantized runs the first ``calib_steps`` calls calibrate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import asdict
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from examples.libero.config import RunConfig, parse_shard
from examples.libero.env import Task, load_task
from examples.libero.quantize import CalibratingPolicy, describe_layers
from examples.libero.results import (
    ResultsFile,
    config_differences,
    error_summary,
    errored,
    git_state,
    now_iso,
    versions,
)
from examples.libero.rollout import EpisodeOutcome, Protocol
from examples.libero.scheduler import EpisodeInfo, Job, Scheduler, default_join_rounds
from examples.libero.workers import EnvSpec, start_workers
from policies import Policy, make_policy
from policies.base import recorded_weights_sha256

log = logging.getLogger(__name__)

class ResumeMismatch(ValueError):
    pass


class RunFailed(RuntimeError):
    """The run measured nothing: its episodes could not be evaluated. The message is one line."""


def repeated_error(errors: list[str | None], n: int) -> str | None:
    """The error of the first ``n`` episodes when all ``n`` raised the same exception type, else None."""
    if n < 1 or len(errors) < n or any(e is None for e in errors[:n]):
        return None
    kinds = {e.split(":")[0] for e in errors[:n]}
    return errors[0] if len(kinds) == 1 else None


def episode_seed(run_seed: int, task_id: int, episode: int) -> int:
    """The policy-noise seed of one episode: a function of what the episode is, not of run order."""
    return run_seed * 100_000 + task_id * 100 + episode


def episode_id(suite: str, task_id: int, episode: int) -> str:
    return f"{suite}/task{task_id}/ep{episode}"


def _device_of(policy: Policy) -> str:
    module = policy.module
    param = next(module.parameters(), None) if module is not None else None
    if param is None or param.device.type == "cpu":
        return "cpu"
    return f"{param.device} ({torch.cuda.get_device_name(param.device)})"


class Evaluation:
    """One run over (task, init state) episodes, resumable and safe to interrupt."""

    def __init__(self, cfg: RunConfig, resolved_config: dict, policy: Policy | None = None):
        self.cfg = cfg
        self.stop = threading.Event()  # set by a signal handler: the run stops at the next chunk, resumable
        self.resolved_config = resolved_config
        if policy is None:
            policy = make_policy(**asdict(cfg.policy))
        self.policy = policy
        self.protocol = Protocol(
            num_steps_wait=cfg.protocol.num_steps_wait, max_steps=cfg.suite.max_steps, replan_steps=cfg.protocol.replan_steps
        )
        self.calibrator: CalibratingPolicy | None = None
        if cfg.quant.mode != "fp" and not cfg.quant.dry_run:
            self.calibrator = CalibratingPolicy(self.policy, cfg.quant, Path(cfg.results_dir) / "duquant_packs")
        self._tasks: dict[int, Task] = {}
        self._rescore_pending: list[Job] = []
        self._calls_before = 0  # calibration calls replayed for a resumed run belong to no new record
        self.num_envs: int | None = None  # the worker count once run() starts
        self.status: str | None = None  # the run's final status once run() returns
        self.results_path: Path | None = None  # the results JSON once it exists
        self.errors: str | None = None  # one line on the errored episodes once run() returns, if any

    # -- set-up -------------------------------------------------------------------------------------------------

    def dry_run(self) -> list[str]:
        return describe_layers(self.policy, self.cfg.quant)

    def protocol_record(self) -> dict:
        p = self.cfg.protocol
        return {**asdict(self.protocol), "suite": self.cfg.suite.name, "seed": self.cfg.seed,
                "obs_mode": self.policy.obs_mode.value, "image_size": p.image_size, "camera_size": p.camera_size,
                "chunk_size": self.policy.chunk_size, "init_state": "episode i starts from the suite's init state i",
                "reset": p.reset, "render_quality": p.render_quality}  # fmt: skip

    def episodes(self) -> list[Job]:
        """The run's episodes in their fixed order: every (task, init state), or this shard's every n-th."""
        first, step = parse_shard(self.cfg.shard)
        every = [Job(t, e) for t in self.cfg.task_ids for e in range(self.cfg.trials_per_task)]
        return every[first::step]

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
            "quant": {"mode": self.cfg.quant.mode},
            "protocol": self.protocol_record(),
        }

    def _create_results(self) -> ResultsFile:
        quant = self.cfg.quant
        tag = "fp" if quant.mode == "fp" else f"{quant.mode}_w{quant.w_bits}a{quant.a_bits}"
        first, step = parse_shard(self.cfg.shard)
        if step > 1:
            tag += f"_shard{first}of{step}"
        return ResultsFile.create(Path(self.cfg.results_dir), self.cfg.suite.name, self.policy.name, tag, self._header())

    def _resumed_results(self) -> ResultsFile:
        results = ResultsFile.load(Path(self.cfg.resume))
        # Only how the run executes may change (a quantized run calibrates on one worker whatever their count).
        diff = config_differences(results.header.get("config") or {}, self.resolved_config)
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

    def _describe(self, job: Job) -> EpisodeInfo:
        if job.task_id not in self._tasks:
            self._tasks[job.task_id] = load_task(self.cfg.suite.name, job.task_id)[0]
        suite, instruction = self.cfg.suite.name, self._tasks[job.task_id].instruction
        return EpisodeInfo(episode_id(suite, job.task_id, job.episode), episode_seed(self.cfg.seed, job.task_id, job.episode),
                           instruction)  # fmt: skip

    @property
    def join_rounds(self) -> int:
        if self.cfg.join_rounds is not None:
            return self.cfg.join_rounds
        return default_join_rounds(self.cfg.protocol.reset, cameras=self._env_spec().renders)

    def _scheduler(self, num_envs: int) -> Scheduler:
        workers = start_workers(self._env_spec(), num_envs, self.cfg.step_timeout_s)
        return Scheduler(workers, self._policy(), self.protocol, self._describe, self.stop, self.join_rounds)

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        results = self._resumed_results() if self.cfg.resume is not None else None
        done = results.done() if results is not None else set()
        todo = self.episodes()
        pending = deque(job for job in todo if (job.task_id, job.episode) not in done)
        self.num_envs = self.cfg.num_envs or max(1, min(os.cpu_count() or 1, len(pending)))
        scheduler = self._scheduler(self.num_envs)
        try:
            if pending:
                scheduler.prepare(pending[0].task_id)  # fail on rendering before any file is written
            if results is None:
                results = self._create_results()
            self.results_path = results.json_path
            results.update(execution={"num_envs": self.num_envs, "join_rounds": self.join_rounds})
            self._policy().reset()  # once per run: policies keep per-episode state by episode id
            if self.calibrator is not None and self.cfg.resume is not None:
                self._replay_calibration(results)
            self._run_pending(results, scheduler, pending, initial=len(todo) - len(pending))
        finally:
            for worker in scheduler.workers:
                worker.close()
        return results.json_path

    def _run_pending(self, results: ResultsFile, scheduler: Scheduler, pending: deque[Job], initial: int) -> None:
        bar = tqdm(total=initial + len(pending), initial=initial, desc=self.cfg.suite.name, unit="ep",
                   disable=not self.cfg.progress)  # fmt: skip

        first_errors: list[str | None] = []  # of this session's first episodes: a policy that always raises
        n = self.cfg.abort_after_errors if self.cfg.abort_after_errors < len(pending) else 0  # else: the end decides

        def finished(job: Job, out: EpisodeOutcome, wall_s: float) -> None:
            self._record(results, job, out, wall_s)
            first_errors.append(out.error)
            if len(first_errors) == n and (error := repeated_error(first_errors, n)) is not None:
                raise RunFailed(f"the first {n} episodes all raised {error.splitlines()[0]}")
            if self.calibrator is not None and self.calibrator.calibrated and self._rescore_pending:
                pending.extend(Job(j.task_id, j.episode, rescore=True) for j in self._rescore_pending)
                self._rescore_pending = []
            if not job.rescore:
                bar.update(1)
                bar.set_postfix(success=f"{sum(e['success'] for e in results.episodes) / len(results.episodes):.1%}")

        status = "failed"
        try:
            scheduler.run(pending, finished, serial=self._calibrating)
            if results.episodes and all(errored(e) for e in results.episodes):
                raise RunFailed(f"every episode errored: {error_summary(results.episodes)}")
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: %d episodes recorded; resume with resume=%s", len(results.episodes), results.json_path)
        finally:
            bar.close()
            self._record_quant(results)
            results.write(status)
            self.status, self.errors = status, error_summary(results.episodes)

    def _policy(self) -> Policy:
        return self.calibrator if self.calibrator is not None else self.policy

    def _calibrating(self) -> bool:
        return self.calibrator is not None and not self.calibrator.calibrated

    def _record(self, results: ResultsFile, job: Job, out: EpisodeOutcome, wall_s: float) -> None:
        info = self._describe(job)
        record = {
            "suite": self.cfg.suite.name, "task_id": job.task_id, "task": info.instruction, "episode": job.episode,
            "init_state": job.episode, "seed": info.seed, "success": out.success, "steps": out.steps,
            "wall_s": wall_s, "policy_calls": out.policy_calls,
            "latency_ms": float(np.mean(out.call_latencies_ms)) if out.call_latencies_ms else None,
            "error": out.error, "video": None, "call_latencies_ms": out.call_latencies_ms, "env_step_ms": out.env_step_ms,
        }  # fmt: skip
        if job.rescore:
            record.update(rescored=True, calibration_calls=0)
        elif self.calibrator is not None:
            calls = self.calibrator.calibration_calls[self._calls_before :]
            served = sum(call["episode_id"] == info.episode_id for call in calls)
            if served:
                record["calibration_calls"] = served
                if self.cfg.calibration.rescore:
                    self._rescore_pending.append(job)
        self._save_video(results, record, out)
        results.append(record)

    def _replay_calibration(self, results: ResultsFile) -> None:
        """Recalibrate a resumed quantized run on the same observations as the original.

        The calibration episodes are replayed in their recorded order, one at
        a time as they ran (deterministic simulator, per-episode policy noise),
        so the policy sees the same observations and the statistics, transforms
        and pack are the ones the interrupted run had; their outcomes are not
        recorded again.
        """
        record = (results.header.get("quant") or {}).get("calibration") or {}
        jobs = {episode_id(self.cfg.suite.name, j.task_id, j.episode): j for j in self.episodes()}
        replay = deque(jobs[eid] for eid in record.get("episodes", []))
        if replay:
            scheduler = self._scheduler(1)
            try:
                scheduler.run(replay, lambda *_: None, serial=lambda: True)
            finally:
                for worker in scheduler.workers:
                    worker.close()
        self._calls_before = len(self.calibrator.calibration_calls)

    def _record_quant(self, results: ResultsFile) -> None:
        if self.calibrator is None:
            return
        report = self.calibrator.report or {}
        calibration = {**self.calibrator.calibration_record(), "batching": "one episode at a time, as with num_envs=1"}
        results.update(quant={"mode": self.cfg.quant.mode, **report, "calibration": calibration})

    def _save_video(self, results: ResultsFile, record: dict, out: EpisodeOutcome) -> None:
        if not out.frames:
            return
        folder = results.json_path.with_name(f"{results.json_path.stem}_videos")
        folder.mkdir(exist_ok=True)
        outcome = "success" if record["success"] else "failure"
        stem = f"{record['suite']}_task{record['task_id']:02d}_ep{record['episode']:02d}_{outcome}"
        path, n = folder / f"{stem}.mp4", 1
        while path.exists():
            path, n = folder / f"{stem}-{n}.mp4", n + 1
        imageio.mimwrite(path, out.frames, fps=20)
        record["video"] = str(path)
