"""Typed run configuration: the schema Hydra composes ``conf/`` into, with every default written here once.

Hydra checks types and unknown keys while composing; ``__post_init__`` checks
values when the config is turned into these dataclasses, before anything heavy
is loaded, so a bad value costs one line and no written file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from duquant import QuantConfig
from duquant.config import OFF
from libero_eval.env import RENDER_QUALITIES, RESETS
from libero_eval.errors import ConfigError
from libero_eval.suites import check_suite_names

MAX_TRIALS_PER_TASK = 50  # every runnable suite ships 50 init states per task


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``shard="i/n"`` as (i, n); (0, 1) for an unsharded run."""
    if shard is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", str(shard).strip())
    if match is None or not int(match[1]) < int(match[2]):
        raise ConfigError(f"shard must be 'i/n' with 0 <= i < n, e.g. shard=0/4; got {shard!r}")
    return int(match[1]), int(match[2])


@dataclass
class PolicyConfig:
    name: str = MISSING
    path: Optional[str] = None  # checkpoint file or directory; None = the policy's default
    device: str = "auto"  # auto = cuda when available, else cpu
    tokenizer: Optional[str] = None  # lerobot_*: local tokenizer (and VLM files) directory; None = <path>/tokenizer
    compile: Optional[str] = None  # openpi_*: torch.compile mode or none; None = auto (none on CPU, default on CUDA)
    sha256: Optional[str] = None  # the weights' expected sha256 (64 hex digits); a checkpoint that differs is refused


@dataclass
class QuantRunConfig(QuantConfig):
    """The ``quant`` group: the library's method settings plus how a run calibrates and which layers it picks."""

    calib_steps: int = 32  # the run's first N policy calls run in full precision and calibrate
    scope: str = "default"  # a layer preset of the policy (policies/scopes.py), widened/narrowed by include/exclude
    dry_run: bool = False  # list the layers the config would quantize, then exit
    load: Optional[str] = None  # a directory saved by quant.save: evaluate that quantized policy, no calibration
    save: Optional[str] = None  # save the quantized policy to this new directory once calibration finishes

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(f"quant.{exc}") from None
        if isinstance(self.calib_steps, bool) or not isinstance(self.calib_steps, int) or self.calib_steps < 1:
            raise ConfigError(f"quant.calib_steps must be an integer >= 1, got {self.calib_steps!r}")
        if not self.scope:
            raise ConfigError("quant.scope must be a non-empty preset name, got ''")
        if self.mode == "fp" and (self.w_bits, self.a_bits) != (OFF, OFF):
            # Otherwise the run is full precision while its results record the bits the user asked for.
            raise ConfigError(f"quant.mode=fp quantizes nothing, yet asks for W{self.w_bits}A{self.a_bits}: choose "
                              "a quantized mode (e.g. quant=w4a8 or quant=rtn_w4a8) or leave w_bits and a_bits at 16")
        if self.mode == "fp" and (self.load or self.save):
            raise ConfigError("quant.load and quant.save need a quantized mode; quant=fp has nothing to load or save")
        if self.load and self.save:
            raise ConfigError("quant.load and quant.save together would copy a saved model: give one of them")

    def method(self) -> QuantConfig:
        """The library's part of the setting: what ``duquant`` gets."""
        return QuantConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantConfig)})


@dataclass
class SuiteConfig:
    name: str = MISSING
    max_steps: int = MISSING  # policy-driven steps per episode, after the wait
    num_tasks: int = MISSING

    def __post_init__(self) -> None:
        check_suite_names([self.name], key="suite.name")
        if self.max_steps < 1:
            raise ConfigError(f"suite.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class ProtocolConfig:
    num_steps_wait: int = 10
    replan_steps: int = 5
    image_size: int = 224
    camera_size: int = 256
    reset: str = "hard"  # hard rebuilds the MuJoCo model each episode; soft resets it (same start state, faster)
    render_quality: str = "default"  # fast: no shadows, reflections or MSAA (different pixels; never for comparisons)

    def __post_init__(self) -> None:
        if self.num_steps_wait < 0:
            raise ConfigError(f"protocol.num_steps_wait must be >= 0, got {self.num_steps_wait}")
        if self.replan_steps < 1:
            raise ConfigError(f"protocol.replan_steps must be >= 1, got {self.replan_steps}")
        if self.image_size < 1 or self.camera_size < 1:
            raise ConfigError("protocol.image_size and protocol.camera_size must be >= 1")
        if self.reset not in RESETS:
            raise ConfigError(f"protocol.reset must be one of {', '.join(RESETS)}, got {self.reset!r}")
        if self.render_quality not in RENDER_QUALITIES:
            raise ConfigError(
                f"protocol.render_quality must be one of {', '.join(RENDER_QUALITIES)}, got {self.render_quality!r}"
            )


@dataclass
class CalibrationConfig:
    rescore: bool = False  # rerun the episodes that calibration touched, fully quantized


@dataclass
class RunConfig:
    policy: PolicyConfig = MISSING
    quant: QuantRunConfig = MISSING
    suite: SuiteConfig = MISSING
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tasks: Optional[list[int]] = None  # None = every task of the suite
    # A multi-suite run (suites=[a,b] or a group, suite=libero_pro_spatial): these suites one after another, each
    # a run of its own with its own results file, which records the list (so resume=FILE continues the rest).
    suites: Optional[list[str]] = None
    trials_per_task: int = MAX_TRIALS_PER_TASK  # episode i starts from init state i
    seed: int = 7
    video: bool = False
    resume: Optional[str] = None  # path of an interrupted run's results JSON
    results_dir: str = "results"
    progress: bool = True
    num_envs: Optional[int] = None  # simulator worker processes; None = one per core, capped by the episodes
    join_rounds: Optional[int] = None  # rounds a starting episode sits out so others go on; None = from the reset
    step_timeout_s: float = 60.0  # a worker silent this long per env step is deemed hung and restarted
    shard: Optional[str] = None  # "i/n": run every n-th episode of the run's ordered list, starting at i
    # A run whose first N episodes all raise the same exception stops as failed (0: never): it measures nothing.
    abort_after_errors: int = 3

    def __post_init__(self) -> None:
        if self.num_envs is not None and self.num_envs < 1:
            raise ConfigError(f"num_envs must be >= 1 (or null for one per core), got {self.num_envs}")
        if self.join_rounds is not None and self.join_rounds < 0:
            raise ConfigError(f"join_rounds must be >= 0 (or null to choose from the reset), got {self.join_rounds}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        parse_shard(self.shard)
        if not 0 <= self.seed < 2**32:  # the simulators' and numpy's seeds
            raise ConfigError(f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.abort_after_errors < 0:
            raise ConfigError(f"abort_after_errors must be >= 0 (0 = never), got {self.abort_after_errors}")
        if not 1 <= self.trials_per_task <= MAX_TRIALS_PER_TASK:
            raise ConfigError(f"trials_per_task must be in 1..{MAX_TRIALS_PER_TASK}, got {self.trials_per_task}")
        if self.suites is not None:
            check_suite_names(self.suites, key="suites")
            if len(set(self.suites)) != len(self.suites) or self.suite.name not in self.suites:
                raise ConfigError(f"suites must list distinct suites, {self.suite.name} among them; got {self.suites}")
        bad = [t for t in self.task_ids if not 0 <= t < self.suite.num_tasks]
        if bad:
            raise ConfigError(f"task id(s) {bad} out of range for {self.suite.name} (0..{self.suite.num_tasks - 1})")

    @property
    def task_ids(self) -> list[int]:
        return list(range(self.suite.num_tasks)) if self.tasks is None else list(self.tasks)


def recorded_defaults() -> dict:
    """Every key's default as a results file records it: a file written before a key existed lacks it, and a
    resume or a merge takes it as this default."""
    top = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    groups = {"quant": QuantRunConfig(), "protocol": ProtocolConfig(), "calibration": CalibrationConfig()}
    return {**top, **{name: dataclasses.asdict(value) for name, value in groups.items()}}
