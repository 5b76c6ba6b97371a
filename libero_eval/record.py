"""What a run writes: one record per finished episode (and its video), and the calibration it quantized with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from libero_eval.plan import EpisodeInfo, Job
from libero_eval.quantize import CalibratingPolicy
from libero_eval.results import ResultsFile
from libero_eval.rollout import EpisodeOutcome


class Recorder:
    """Appends a run's episodes to its results file; a quantized run's calibration goes into the header the
    moment it is known, before any episode it quantized."""

    def __init__(self, results: ResultsFile, suite: str, calibrator: CalibratingPolicy | None, served_before: int = 0):
        self.results, self.suite = results, suite
        self.calibrator = calibrator
        self.served_before = served_before  # calibration calls replayed for a resumed run belong to no new record
        self._calibration_written = False

    def episode(self, job: Job, info: EpisodeInfo, out: EpisodeOutcome, wall_s: float) -> dict:
        self.calibration()
        record = {
            "suite": self.suite, "task_id": job.task_id, "task": info.instruction,
            "episode": job.episode, "init_state": job.episode, "seed": info.seed, "success": out.success,
            "steps": out.steps, "wall_s": wall_s, "policy_calls": out.policy_calls,
            "latency_ms": float(np.mean(out.call_latencies_ms)) if out.call_latencies_ms else None,
            "error": out.error, "video": None, "call_latencies_ms": out.call_latencies_ms, "env_step_ms": out.env_step_ms,
        }  # fmt: skip
        if job.rescore:
            record.update(rescored=True, calibration_calls=0)
        elif self.calibrator is not None:
            calls = self.calibrator.calibration_calls[self.served_before :]
            served = sum(call["episode_id"] == info.episode_id for call in calls)
            if served:
                record["calibration_calls"] = served
        if out.frames:
            record["video"] = str(self._save_video(record, out.frames))
        self.results.append(record)
        return record

    def calibration(self) -> None:
        """Write the calibration record once calibration is complete (durably: a kill right after keeps it)."""
        if self.calibrator is None or self._calibration_written or not self.calibrator.calibrated:
            return
        self.results.update(quant=self.quant_record())
        self.results.write("running")
        self._calibration_written = True

    def quant_record(self) -> dict | None:
        if self.calibrator is None:
            return None
        calibration = {**self.calibrator.calibration_record(), "batching": "one episode at a time, as with num_envs=1"}
        cfg = self.calibrator.cfg
        report = self.calibrator.report or {}
        # The results schema keeps the run's whole quant config and the dry_run flag the report once carried.
        if report:
            report = {**report, "config": dataclasses.asdict(cfg), "dry_run": False}
        return {"mode": cfg.mode, "tag": cfg.tag(), **report, "calibration": calibration}

    def _save_video(self, record: dict, frames: list[np.ndarray]) -> Path:
        json_path = self.results.json_path
        folder = json_path.with_name(f"{json_path.stem}_videos")
        folder.mkdir(exist_ok=True)
        outcome = "success" if record["success"] else "failure"
        stem = f"{record['suite']}_task{record['task_id']:02d}_ep{record['episode']:02d}_{outcome}"
        path, n = folder / f"{stem}.mp4", 1
        while path.exists():
            path, n = folder / f"{stem}-{n}.mp4", n + 1
        imageio.mimwrite(path, frames, fps=20)
        return path
