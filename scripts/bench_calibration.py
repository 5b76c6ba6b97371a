"""Calibration cost against accuracy for DuQuant's ``quant.calib_max_tokens`` on the embedded policy.

    python scripts/bench_calibration.py                        # W4A8, tokens 128 256 512 1024 2048, 3 seeds
    python scripts/bench_calibration.py --preset w4a4 --tokens 256 2048 --seeds 0
    python scripts/bench_calibration.py --preset rtn_w4a8 --tokens 512 --set w_clip=1.0
    python scripts/bench_calibration.py --quick                # smoke test: 2 tasks, tokens 64 128, 1 seed

``calib_max_tokens`` caps the input rows each layer keeps (a seeded reservoir
sample) for fitting its rotations. For each value and each ``quant.seed``, a
fresh FP policy is quantized the way the runner does it
(``CalibratingPolicy``: FP calls on the calibration observations, one at a time
as a run's calibration is, then ``finish()``), with the pack cache off so every
value fits its own transforms. Measured: the ``finish()`` wall time (dominated
by the transform fits), the report's average layer SQNR (on each layer's own
calibration sample, which differs between values), and the error of the
quantized action chunks against FP on held-out observations. The seed picks
the sampled rows and the greedy search's random steps, so the spread over
seeds says which differences between values are more than chance.

Observations are real libero_spatial ones, physics only, taken after the
protocol's wait steps: the calibration set from the first init states of every
task, the held-out set from later, disjoint ones. Policy noise is seeded per
(episode seed, step) as in a run, so FP and quantized calls see the same
noise. Prints a table with each value's time and error against the largest
value's and writes JSON (default results/bench/calibration_cpu.json). With
``--preset``, ``--set`` and one ``--tokens`` value it measures the held-out
action error of any quant setting, e.g. DuQuant against RTN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from libero_eval import (
    CalibratingPolicy,
    LiberoEnv,
    QuantRunConfig,
    Protocol,
    begin,
    compose,
    episode_id,
    episode_seed,
    execute,
    fail,
    load_task,
    versions,
)
from libero_eval.errors import one_line
from policies.base import ObservationBatch, ObsMode, Policy, collate
from policies.embedded import EmbeddedPolicy

SUITE = "libero_spatial"
SEED = 7  # the runner's default run seed: envs and per-episode policy noise


@dataclass(frozen=True)
class Setting:
    """Which observations to take: per task, the first init states calibrate, the next ones are held out."""

    tasks: list[int]
    calib_states: list[int]
    heldout_states: list[int]
    tokens: list[int]
    seeds: list[int]  # quant.seed values: each token value is calibrated once per seed


# 30 calibration calls, near the runner's calib_steps=32; 50 held-out observations.
FULL = Setting(tasks=list(range(10)), calib_states=[0, 1, 2], heldout_states=[3, 4, 5, 6, 7],
               tokens=[128, 256, 512, 1024, 2048], seeds=[0, 1, 2])  # fmt: skip
QUICK = Setting(tasks=[0, 1], calib_states=[0], heldout_states=[1, 2], tokens=[64, 128], seeds=[0])


@dataclass(frozen=True)
class Observation:
    """One protocol observation of an episode (after the wait steps), with what identifies it."""

    task_id: int
    init_state: int
    instruction: str
    obs: dict
    step: int = 0  # policy-driven env steps before it: seeds the policy noise as in a run


def quant_config(preset: str, settings: list[str]) -> QuantRunConfig:
    """The quant config that ``quant=<preset> quant.KEY=VALUE ...`` gives a run, composed as a run composes it."""
    return OmegaConf.to_object(compose([f"quant={preset}", *(f"quant.{s}" for s in settings)]).quant)


def parse_setting(text: str) -> str:
    """``KEY=VALUE``, checked by Hydra's own override parser (VALUE means what ``quant.KEY=VALUE`` means in a run)."""
    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as exc:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}") from exc
    if not override.key_or_group:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def collect(setting: Setting, heldout_calls: int, fp: Policy) -> tuple[list[Observation], list[Observation]]:
    """(calibration, held-out) observations: one env per task, one reset per init state, as a run starts them.

    Calibration observations are episode starts, as a run's first calls. Held-out
    episodes are rolled out by the FP policy for up to ``heldout_calls`` calls
    (``replan_steps`` actions each), and the observation of every call is kept:
    later calls show what calibration on episode starts did not see.
    """
    protocol = Protocol()
    calibration, heldout = [], []
    for task_id in setting.tasks:
        task, init_states = load_task(SUITE, task_id)
        with LiberoEnv(task, ObsMode.STATE, seed=SEED) as env:
            for i in setting.calib_states:
                obs = begin(env, init_states[i], protocol.num_steps_wait).obs
                calibration.append(Observation(task_id, i, task.instruction, obs))
            for i in setting.heldout_states:
                progress = begin(env, init_states[i], protocol.num_steps_wait)
                step = 0
                for call in range(heldout_calls):
                    observation = Observation(task_id, i, task.instruction, progress.obs, step)
                    heldout.append(observation)
                    if call == heldout_calls - 1:
                        break  # the last observation is kept; acting on it would show nothing
                    chunk = fp.predict(batch([observation]))[0][: min(protocol.replan_steps, protocol.max_steps - step)]
                    progress = execute(env, progress.obs, chunk)
                    step += progress.steps
                    if progress.success or step >= protocol.max_steps:
                        break
    return calibration, heldout


def batch(observations: list[Observation]) -> ObservationBatch:
    """A batch as the runner builds it at these observations' policy calls."""
    return collate(
        [o.obs for o in observations],
        [o.instruction for o in observations],
        [episode_id(SUITE, o.task_id, o.init_state) for o in observations],
        [episode_seed(SEED, o.task_id, o.init_state) for o in observations],
        [o.step for o in observations],
    )


def per_task_batches(observations: list[Observation]) -> list[ObservationBatch]:
    """One batch per task (rows of one task share their object count, so they stack)."""
    tasks = dict.fromkeys(o.task_id for o in observations)
    return [batch([o for o in observations if o.task_id == t]) for t in tasks]


def predict_all(policy: Policy, batches: list[ObservationBatch]) -> np.ndarray:
    """Action chunks of every row of every batch, in order ([rows, chunk, 7])."""
    return np.concatenate([policy.predict(b) for b in batches])


def calibrated(cfg: QuantRunConfig, calib_batches: list[ObservationBatch]) -> CalibratingPolicy:
    """A fresh FP policy, calibrated on every calibration batch and then quantized; no pack cache is read or written."""
    policy = CalibratingPolicy(
        EmbeddedPolicy(), dataclasses.replace(cfg, calib_steps=len(calib_batches)), cache_dir=None
    )
    for b in calib_batches:
        policy.predict(b)  # the last call finishes calibration
    return policy


def action_errors(fp: np.ndarray, quantized: np.ndarray, steps: np.ndarray) -> dict:
    """Relative L2 error of each chunk ([chunk, 7]) against FP: averaged, at episode starts only (``steps`` 0),
    and worst; and the largest abs difference."""
    rel = np.linalg.norm(quantized - fp, axis=(1, 2)) / np.linalg.norm(fp, axis=(1, 2))
    return {"rel_err": float(rel.mean()), "rel_err_start": float(rel[steps == 0].mean()),
            "rel_err_worst": float(rel.max()), "max_abs_err": float(np.abs(quantized - fp).max())}  # fmt: skip


def measure_seed(cfg: QuantRunConfig, calib_batches: list[ObservationBatch], heldout: list[ObservationBatch],
                 fp_actions: np.ndarray) -> dict:  # fmt: skip
    """One calibration: its ``finish()`` time, the report's SQNR and the held-out action errors."""
    policy = calibrated(cfg, calib_batches)
    report = policy.report
    return {
        "seed": cfg.seed,
        "calib_s": report["seconds"],
        "avg_sqnr_db": report["average_sqnr_db"],
        **action_errors(fp_actions, predict_all(policy, heldout), np.concatenate([b.steps for b in heldout])),
        "layers_quantized": report["layers_quantized"],
        # A layer that saw no more rows than the cap keeps them all: this knob changes nothing for it.
        "layers_subsampled": sum(layer["calib_rows"] > cfg.calib_max_tokens for layer in report["layers"]),
        "pack_cache": sorted({layer["cache"] for layer in report["layers"]}),
    }


def summarize(tokens: int, runs: list[dict]) -> dict:
    """One row per token value: means over the quant seeds, the spread of the error, the worst case of any seed."""
    errors = [r["rel_err"] for r in runs]
    sqnr = [r["avg_sqnr_db"] for r in runs if r["avg_sqnr_db"] is not None]
    return {
        "calib_max_tokens": tokens,
        "calib_s": float(np.mean([r["calib_s"] for r in runs])),
        "avg_sqnr_db": float(np.mean(sqnr)) if sqnr else None,
        "rel_err": float(np.mean(errors)),
        "rel_err_seed_range": [min(errors), max(errors)],
        "rel_err_start": float(np.mean([r["rel_err_start"] for r in runs])),
        "rel_err_worst": max(r["rel_err_worst"] for r in runs),
        "max_abs_err": max(r["max_abs_err"] for r in runs),
        "layers_quantized": runs[0]["layers_quantized"],
        "layers_subsampled": runs[0]["layers_subsampled"],
        "pack_cache": sorted({state for r in runs for state in r["pack_cache"]}),
        "per_seed": runs,
    }


def add_ratios(rows: list[dict]) -> None:
    """Time and error of every row as a multiple of the largest token value's."""
    base = max(rows, key=lambda r: r["calib_max_tokens"])
    for row in rows:
        row["time_x"] = row["calib_s"] / base["calib_s"]
        row["err_x"] = row["rel_err"] / base["rel_err"]


def print_table(rows: list[dict]) -> None:
    print("| calib_max_tokens | calib s | time x | avg SQNR dB | rel err (seed range) | err x | rel err at starts |"
          " worst chunk rel err | max abs err | layers subsampled |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sqnr = "-" if r["avg_sqnr_db"] is None else f"{r['avg_sqnr_db']:.2f}"
        low, high = r["rel_err_seed_range"]
        print(f"| {r['calib_max_tokens']} | {r['calib_s']:.2f} | {r['time_x']:.2f} | {sqnr} | "
              f"{r['rel_err']:.4f} ({low:.4f}-{high:.4f}) | {r['err_x']:.2f} | {r['rel_err_start']:.4f} | "
              f"{r['rel_err_worst']:.4f} | {r['max_abs_err']:.4f} | {r['layers_subsampled']}/{r['layers_quantized']} |")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    files = (resources.files("libero_eval.conf") / "quant").iterdir()
    presets = sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml") and f.name != "fp.yaml")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokens", nargs="+", type=int, default=None, help=f"calib_max_tokens values (default {FULL.tokens})"
    )
    p.add_argument("--preset", choices=presets, default="w4a8", help="conf/quant preset (default w4a8)")
    p.add_argument("--w-bits", type=int, default=None, help="replace the preset's w_bits")
    p.add_argument("--a-bits", type=int, default=None, help="replace the preset's a_bits")
    p.add_argument(
        "--set",
        dest="settings",
        metavar="KEY=VALUE",
        type=parse_setting,
        action="append",
        default=[],
        help="replace any other quant field, e.g. --set smooth_alpha=0 (repeatable)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"quant.seed values (default {FULL.seeds})")
    p.add_argument(
        "--heldout-calls",
        type=int,
        default=1,
        help="FP policy calls rolled out per held-out episode, each one's observation held out (default 1: the start)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tasks {QUICK.tasks}, 1 + 2 init states each, tokens {QUICK.tokens}, seed {QUICK.seeds}",
    )
    p.add_argument("--out", type=Path, default=Path("results/bench/calibration_cpu.json"))
    args = p.parse_args(argv)
    if args.tokens is not None and min(args.tokens) < 1:
        p.error("--tokens must be positive")
    if args.heldout_calls < 1:
        p.error("--heldout-calls must be >= 1")
    if args.seeds is not None and min(args.seeds) < 0:
        p.error("--seeds must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        bits = [f"{k}={v}" for k, v in (("w_bits", args.w_bits), ("a_bits", args.a_bits)) if v is not None]
        cfg = quant_config(args.preset, [*args.settings, *bits])
    except (ValueError, OmegaConfBaseException) as exc:  # compose's errors are one-line ConfigErrors (ValueError)
        fail(one_line(exc))
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    tokens = sorted(set(args.tokens or setting.tokens))
    seeds = sorted(set(args.seeds or setting.seeds))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    fp = EmbeddedPolicy()
    calibration, heldout = collect(setting, args.heldout_calls, fp)
    calib_batches = [batch([o]) for o in calibration]  # one call per observation, as a run's calibration
    heldout_batches = per_task_batches(heldout)
    fp_actions = predict_all(fp, heldout_batches)  # batched as the quantized calls are, unlike the rollout's
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cfg.mode} W{cfg.w_bits}A{cfg.a_bits}, "
          f"{len(calibration)} calibration / {len(heldout)} held-out observations")  # fmt: skip
    rows = []
    for t in tokens:
        configs = [dataclasses.replace(cfg, calib_max_tokens=t, seed=seed) for seed in seeds]
        rows.append(summarize(t, [measure_seed(c, calib_batches, heldout_batches, fp_actions) for c in configs]))
    add_ratios(rows)
    print_table(rows)
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "preset": args.preset,
        "settings": {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args.settings)},
        "config": dataclasses.asdict(dataclasses.replace(cfg, calib_steps=len(calib_batches))),  # calib_max_tokens, seed: per row
        "weights_sha256": fp.describe()["weights_sha256"],
        "suite": SUITE,
        "run_seed": SEED,
        "tasks": setting.tasks,
        "calibration": {"init_states": setting.calib_states, "observations": len(calibration)},  # one call each
        "held_out": {
            "init_states": setting.heldout_states,
            "calls_per_episode": args.heldout_calls,
            "observations": len(heldout),
        },
        "quant_seeds": seeds,
        "baseline_tokens": max(tokens),
        "quick": args.quick,
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
