"""Forward latency of DuQuantLinear against FP nn.Linear and a naive per-call implementation.

At pi0's linear shapes (hidden 1024/2048, MLP 4096/16384) and several token
counts, times three forwards in the same process, interleaved rep by rep so
load drift hits all of them alike:

- ``fp``: the plain ``nn.Linear``;
- ``duquant``: the quantized layer (default W4A8 config), calibrated on random
  activations with planted channel outliers;
- ``naive``: the same math done the way a first port does it: NumPy rotations
  converted to torch and applied block by block in a Python loop, and the
  weight transformed and re-quantized on every call.

Usage: scripts/bench_duquant.py [--out FILE] [--device cpu|cuda] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duquant import LayerSelection, QuantConfig, quantize_
from duquant.quantizer import fake_quant
from duquant.transform import Transform, fit_transform

SHAPES = [(1024, 4096), (4096, 1024), (2048, 2048), (2048, 16384), (16384, 2048)]
QUICK_SHAPES = [(1024, 4096), (4096, 1024), (2048, 2048)]
TOKENS = [10, 64, 256, 800]
# Forward time does not depend on how long the greedy search ran, so calibration is kept short.
CONFIG = QuantConfig(mode="duquant", w_bits=4, a_bits=8, rotation_steps=32)
CALIB_TOKENS = 128
TARGET_SECONDS = 0.4  # per variant and shape/token point


def planted_activations(tokens: int, width: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, width, generator=generator)
    channels = torch.randperm(width, generator=generator)[: max(1, width // 256)]
    x[:, channels] *= 40.0
    return x


class NaiveDuQuant:
    """DuQuant forward as a direct port does it: everything from NumPy, per block, on every call."""

    def __init__(self, fp: nn.Linear, t: Transform, cfg: QuantConfig):
        self.bits = cfg.layer_bits("bench")
        self.weight, self.bias = fp.weight.detach(), fp.bias.detach()
        self.smooth = t.smooth.cpu().numpy()
        self.r1 = t.r1.cpu().numpy()
        self.r2 = t.r2.cpu().numpy()
        self.perm = t.perm.cpu().numpy() if t.perm is not None else np.arange(t.width)
        self.block, self.width = t.block, t.width

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x.new_zeros(x.shape[0], self.width - x.shape[1])], 1) if x.shape[1] < self.width else x
        out = torch.empty_like(x)
        for k in range(self.width // self.block):
            cols = slice(k * self.block, (k + 1) * self.block)
            out[:, cols] = x[:, cols] @ torch.from_numpy(self.r1[k % len(self.r1)]).to(x)
        out = out[:, torch.from_numpy(self.perm).to(x.device)]
        result = torch.empty_like(out)
        for k in range(self.width // self.block):
            cols = slice(k * self.block, (k + 1) * self.block)
            result[:, cols] = out[:, cols] @ torch.from_numpy(self.r2[k % len(self.r2)]).to(x)
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        smooth = torch.from_numpy(self.smooth).to(x)
        h = fake_quant(self._rotate(x / smooth), self.bits.a_bits, self.bits.a_sym, self.bits.a_clip)
        w = fake_quant(self._rotate(self.weight * smooth), self.bits.w_bits, self.bits.w_sym, self.bits.w_clip)
        return F.linear(h, w, self.bias)


def build(in_features: int, out_features: int, device: torch.device):
    """FP layer, its calibrated DuQuant copy and the naive reference (same transform), all on ``device``."""
    torch.manual_seed(0)
    fp = nn.Linear(in_features, out_features).to(device)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(device)
    model.load_state_dict({f"0.{k}": v for k, v in fp.state_dict().items()})
    calib = quantize_(model, CONFIG, LayerSelection())
    probe = planted_activations(CALIB_TOKENS, in_features, torch.Generator().manual_seed(1)).to(device)
    model(probe)
    layer = model[0]
    transform = fit_transform(CONFIG, layer.bits, layer.weight, layer.stats.channel_max, layer.stats.sample)
    calib.finish()
    naive = NaiveDuQuant(fp, transform, CONFIG)
    gap = ((layer(probe) - naive(probe)).norm() / naive(probe).norm()).item()
    if gap > 1e-3:
        raise AssertionError(f"DuQuant and the naive reference disagree at {in_features}x{out_features}: {gap:.2e}")
    return fp, layer, naive


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(variants: dict[str, Callable[[], torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Median ms per variant; one warm-up each, then reps interleaved across variants."""
    first = {name: timed(fn, device) for name, fn in variants.items()}
    reps = {name: max(3, min(25, math.ceil(TARGET_SECONDS * 1e3 / max(ms, 1e-3)))) for name, ms in first.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(max(reps.values())):
        for name, fn in variants.items():
            if i < reps[name]:
                samples[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or Path("results/bench") / f"duquant_{args.device}.json"
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": CONFIG.to_dict(),
        "calib_tokens": CALIB_TOKENS,
        "quick": args.quick,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rows = []
    print(f"torch {header['torch']}, {header['threads']} threads, {header['device_name']}")
    columns = ("in", 6), ("out", 6), ("tokens", 6), ("fp_ms", 9), ("duquant_ms", 10), ("naive_ms", 9), ("x fp", 6)
    print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'vs naive':>8}")
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for in_features, out_features in QUICK_SHAPES if args.quick else SHAPES:
            fp, layer, naive = build(in_features, out_features, device)
            for tokens in TOKENS:
                x = planted_activations(tokens, in_features, g).to(device)
                ms = measure({"fp": lambda: fp(x), "duquant": lambda: layer(x), "naive": lambda: naive(x)}, device)
                row = {
                    "in_features": in_features,
                    "out_features": out_features,
                    "tokens": tokens,
                    "device": args.device,
                    "fp_ms": round(ms["fp"], 4),
                    "duquant_ms": round(ms["duquant"], 4),
                    "naive_ms": round(ms["naive"], 4),
                    "ratio_vs_fp": round(ms["duquant"] / ms["fp"], 3),
                    "speedup_vs_naive": round(ms["naive"] / ms["duquant"], 2),
                }
                rows.append(row)
                print(
                    f"{in_features:>6} {out_features:>6} {tokens:>6} {row['fp_ms']:>9.3f} {row['duquant_ms']:>10.3f} "
                    f"{row['naive_ms']:>9.3f} {row['ratio_vs_fp']:>6.2f} {row['speedup_vs_naive']:>8.1f}"
                )
            del fp, layer, naive
    header["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
