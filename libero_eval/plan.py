"""What a run plays: its episodes in their fixed order, their ids and seeds, and the work a resume or a rescore
adds (calibration replay first, rescored calibration episodes last)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from libero_eval.config import RunConfig, parse_shard
from libero_eval.env import load_task
from libero_eval.quantize import CalibratingPolicy


class ResumeMismatch(ValueError):
    """A results file cannot be continued by this run; the message is one line."""


@dataclass(frozen=True)
class Job:
    task_id: int
    episode: int  # also the index of the init state it starts from
    rescore: bool = False  # a rerun of a calibration episode, fully quantized


@dataclass(frozen=True)
class EpisodeInfo:
    episode_id: str
    seed: int
    instruction: str


def episode_seed(run_seed: int, task_id: int, episode: int) -> int:
    """The policy-noise seed of one episode: a function of what the episode is, not of run order."""
    return run_seed * 100_000 + task_id * 100 + episode


def episode_id(suite: str, task_id: int, episode: int) -> str:
    return f"{suite}/task{task_id}/ep{episode}"


class EpisodePlan:
    def __init__(self, cfg: RunConfig):
        self.suite, self.seed = cfg.suite.name, cfg.seed
        self.rescore = cfg.calibration.rescore
        first, step = parse_shard(cfg.shard)
        every = [Job(t, e) for t in cfg.task_ids for e in range(cfg.trials_per_task)]
        # The run's episodes in their fixed order: every (task, init state), or this shard's every n-th.
        self.episodes: list[Job] = every[first::step]
        self._instructions: dict[int, str] = {}

    def describe(self, job: Job) -> EpisodeInfo:
        if job.task_id not in self._instructions:
            self._instructions[job.task_id] = load_task(self.suite, job.task_id)[0].instruction
        return EpisodeInfo(episode_id(self.suite, job.task_id, job.episode),
                           episode_seed(self.seed, job.task_id, job.episode), self._instructions[job.task_id])  # fmt: skip

    def pending(self, done: set[tuple[int, int]]) -> list[Job]:
        return [job for job in self.episodes if (job.task_id, job.episode) not in done]

    def calibration_replay(self, header: dict, recorded: list[dict], path: Path) -> list[Job]:
        """The calibration episodes of an interrupted quantized run, in the order they calibrated.

        Replayed one at a time before the run goes on, they give the policy the
        observations the interrupted run calibrated on. A complete calibration
        is written to the results header before any quantized episode is
        recorded; without it, the calibration episodes are the recorded ones
        that served calibration calls, and a file that also holds quantized
        episodes cannot be continued on the same calibration.
        """
        record = (header.get("quant") or {}).get("calibration") or {}
        if record.get("complete"):
            ids = list(record["episodes"])
        else:
            calibrating = [e for e in recorded if e.get("calibration_calls")]
            if any(e.get("policy_calls") and not e.get("calibration_calls") for e in recorded):
                raise ResumeMismatch(
                    f"resume: {path} holds quantized episodes but no record of the calibration they used, so this "
                    "run cannot continue on the same calibration; start a new run"
                )
            ids = [episode_id(e["suite"], e["task_id"], e["episode"]) for e in calibrating]
        jobs = {episode_id(self.suite, j.task_id, j.episode): j for j in self.episodes}
        return [jobs[eid] for eid in ids if eid in jobs]

    def rescore_jobs(self, calibrator: CalibratingPolicy | None, served_before: int) -> list[Job]:
        """With ``calibration.rescore``: each episode this session calibrated on, to rerun fully quantized once
        every pending episode has finished (so an episode never runs twice at once)."""
        if not self.rescore or calibrator is None or not calibrator.calibrated:
            return []
        ids = dict.fromkeys(c["episode_id"] for c in calibrator.calibration_calls[served_before:])
        by_id = {episode_id(self.suite, j.task_id, j.episode): j for j in self.episodes}
        return [Job(by_id[eid].task_id, by_id[eid].episode, rescore=True) for eid in ids if eid in by_id]
