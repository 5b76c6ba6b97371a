"""An evaluation run: policy -> (quantize) -> rollouts -> results file.

The policy sees no dummy input: its first call is the run's first real
observation, and for quantized runs the first ``calib_steps`` calls calibrate.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from examples.libero.config import RunConfig
from examples.libero.env import LiberoEnv, load_task
from examples.libero.quantize import CalibratingPolicy, describe_layers
from examples.libero.results import ResultsFile, git_state, now_iso, versions
from examples.libero.rollout import EpisodeOutcome, Protocol, run_episode
from policies import Policy, make_policy
from policies.base import weights_sha256

log = logging.getLogger(__name__)

# Keys that may differ between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("resume", "progress")


class ResumeMismatch(ValueError):
    pass


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
        self.stop = threading.Event()  # set by a signal handler: the run stops at the next step, resumable
        self.resolved_config = resolved_config
        self.policy = policy if policy is not None else make_policy(cfg.policy.name, cfg.policy.path, cfg.policy.device)
        self.protocol = Protocol(
            num_steps_wait=cfg.protocol.num_steps_wait, max_steps=cfg.suite.max_steps, replan_steps=cfg.protocol.replan_steps
        )
        self.calibrator: CalibratingPolicy | None = None
        if cfg.quant.mode != "fp" and not cfg.quant.dry_run:
            self.calibrator = CalibratingPolicy(self.policy, cfg.quant, Path(cfg.results_dir) / "duquant_packs")
        self._envs: dict[int, tuple[LiberoEnv, np.ndarray]] = {}
        self._rescore_pending: list[tuple[int, int]] = []
        self.status: str | None = None  # the run's final status once run() returns

    # -- set-up -------------------------------------------------------------------------------------------------

    def dry_run(self) -> list[str]:
        return describe_layers(self.policy, self.cfg.quant)

    def protocol_record(self) -> dict:
        return {**asdict(self.protocol), "suite": self.cfg.suite.name, "seed": self.cfg.seed,
                "obs_mode": self.policy.obs_mode.value, "image_size": self.cfg.protocol.image_size,
                "camera_size": self.cfg.protocol.camera_size, "chunk_size": self.policy.chunk_size,
                "init_state": "episode i starts from the suite's init state i", "reset": "hard"}  # fmt: skip

    def _header(self) -> dict:
        checkpoint = self.policy.checkpoint
        return {
            "started_at": now_iso(),
            "git": git_state(),
            "versions": versions(),
            "device": _device_of(self.policy),
            "config": self.resolved_config,
            "policy": {"name": self.policy.name, "checkpoint": checkpoint, "weights_sha256": weights_sha256(checkpoint),
                       **self.policy.describe()},  # fmt: skip
            "quant": {"mode": self.cfg.quant.mode},
            "protocol": self.protocol_record(),
        }

    def _open_results(self) -> ResultsFile:
        if self.cfg.resume is None:
            quant = self.cfg.quant
            tag = "fp" if quant.mode == "fp" else f"{quant.mode}_w{quant.w_bits}a{quant.a_bits}"
            return ResultsFile.create(Path(self.cfg.results_dir), self.cfg.suite.name, self.policy.name, tag, self._header())
        results = ResultsFile.load(Path(self.cfg.resume))
        before = {k: v for k, v in (results.header.get("config") or {}).items() if k not in RESUME_FREE_KEYS}
        now = {k: v for k, v in self.resolved_config.items() if k not in RESUME_FREE_KEYS}
        if before != now:
            diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise ResumeMismatch(f"resume: config differs from the interrupted run in {', '.join(diff)}")
        return results

    def _env(self, task_id: int) -> tuple[LiberoEnv, np.ndarray]:
        if task_id not in self._envs:
            for env, _ in self._envs.values():  # one task at a time: a LIBERO env holds a full MuJoCo model
                env.close()
            self._envs.clear()
            task, init_states = load_task(self.cfg.suite.name, task_id)
            env = LiberoEnv(task, self.policy.obs_mode, seed=self.cfg.seed, camera_size=self.cfg.protocol.camera_size,
                            image_size=self.cfg.protocol.image_size, render=True if self.cfg.video else None)  # fmt: skip
            self._envs[task_id] = (env, init_states)
        return self._envs[task_id]

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        todo = [(t, e) for t in self.cfg.task_ids for e in range(self.cfg.trials_per_task)]
        if todo:
            self._env(todo[0][0])  # fail on rendering before any file is written
        results = self._open_results()
        done = results.done()
        if self.calibrator is not None and self.cfg.resume is not None:
            self._replay_calibration(results)
        pending = [key for key in todo if key not in done]
        bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc=self.cfg.suite.name, unit="ep",
                   disable=not self.cfg.progress)  # fmt: skip
        status = "failed"
        try:
            for task_id, episode in pending:
                if self.stop.is_set():
                    raise KeyboardInterrupt
                self._run_and_record(results, task_id, episode)
                bar.update(1)
                rate = sum(e["success"] for e in results.episodes) / len(results.episodes)
                bar.set_postfix(success=f"{rate:.1%}")
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted: %d episodes recorded; resume with resume=%s", len(results.episodes), results.json_path)
        finally:
            bar.close()
            self._record_quant(results)
            results.write(status)
            for env, _ in self._envs.values():
                env.close()
        self.status = status
        return results.json_path

    def _policy(self) -> Policy:
        return self.calibrator if self.calibrator is not None else self.policy

    def _episode(self, task_id: int, episode: int, policy: Policy) -> tuple[EpisodeOutcome, dict]:
        env, init_states = self._env(task_id)
        eid = episode_id(self.cfg.suite.name, task_id, episode)
        seed = episode_seed(self.cfg.seed, task_id, episode)
        start = time.perf_counter()
        out = run_episode(env, policy, init_states[episode], protocol=self.protocol, episode_id=eid, seed=seed,
                          record_video=self.cfg.video, stop=self.stop)  # fmt: skip
        record = {
            "suite": self.cfg.suite.name, "task_id": task_id, "task": env.task.instruction, "episode": episode,
            "init_state": episode, "seed": seed, "success": out.success, "steps": out.steps,
            "wall_s": time.perf_counter() - start, "policy_calls": out.policy_calls,
            "latency_ms": float(np.mean(out.call_latencies_ms)) if out.call_latencies_ms else None,
            "error": out.error, "video": None, "call_latencies_ms": out.call_latencies_ms, "env_step_ms": out.env_step_ms,
        }  # fmt: skip
        return out, record

    def _run_and_record(self, results: ResultsFile, task_id: int, episode: int) -> None:
        calibrating = self.calibrator is not None and not self.calibrator.calibrated
        calls_before = len(self.calibrator.calibration_calls) if calibrating else 0
        out, record = self._episode(task_id, episode, self._policy())
        if calibrating:
            record["calibration_calls"] = len(self.calibrator.calibration_calls) - calls_before
        self._save_video(results, record, out)
        results.append(record)
        if record.get("calibration_calls") and self.cfg.calibration.rescore:
            self._rescore_pending.append((task_id, episode))
        if self.calibrator is not None and self.calibrator.calibrated and self._rescore_pending:
            pending, self._rescore_pending = self._rescore_pending, []
            for key in pending:
                out, rescored = self._episode(*key, self.calibrator)
                rescored.update(rescored=True, calibration_calls=0)
                self._save_video(results, rescored, out)
                results.append(rescored)

    def _replay_calibration(self, results: ResultsFile) -> None:
        """Recalibrate a resumed quantized run on the same observations as the original.

        The calibration episodes are replayed in order (deterministic simulator,
        per-episode policy noise), so the statistics, transforms and pack are
        the ones the interrupted run had; their outcomes are not recorded again.
        """
        record = (results.header.get("quant") or {}).get("calibration") or {}
        keys = {episode_id(self.cfg.suite.name, t, e): (t, e) for t in self.cfg.task_ids for e in range(self.cfg.trials_per_task)}
        for eid in record.get("episodes", []):
            if self.calibrator.calibrated:
                break
            self._episode(*keys[eid], self.calibrator)

    def _record_quant(self, results: ResultsFile) -> None:
        if self.calibrator is None:
            return
        report = self.calibrator.report or {}
        results.update(quant={"mode": self.cfg.quant.mode, **report, "calibration": self.calibrator.calibration_record()})

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
