"""Forward time and weight memory of quantized linears, per layer at pi0 shapes and per policy.

Layers: at pi0's linear shapes (hidden 1024/2048, MLP 4096/16384) and several
token counts, times in one process, interleaved rep by rep so load drift hits
all variants alike: FP32 and BF16 ``nn.Linear``; DuQuant W8A8 and W4A8 with
``backend=fake`` (quantize-dequantize in float) and ``backend=int`` (integer
codes, exact int8 GEMM); DuQuant W4A16 ``int`` (packed 4-bit codes dequantized
at use); with ``--naive`` also a naive per-block NumPy port of the W4A8 fake
forward. Weight bytes per layer: the weight as the layer holds it, with scales
and zero points (``weight_bytes``), and the DuQuant transform apart
(``transform_bytes``: smoothing, rotations, permutation).

Policy: the embedded policy's call latency (p50, one batch of 2 rows, 10
flow-matching steps) and the resident bytes of its quantized layers, for FP and
each of the above, calibrated on its own first calls.

Usage: scripts/bench_duquant.py [--out FILE] [--device cpu|cuda] [--quick] [--threads N] [--naive] [--no-policy]
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

from duquant import Calibration, DuQuantLinear, LayerSelection, QuantConfig, quantize_, select_layers
from duquant.quantizer import fake_quant
from duquant.transform import Transform, fit_transform

SHAPES = [(1024, 4096), (4096, 1024), (2048, 2048), (2048, 16384), (16384, 2048)]
QUICK_SHAPES = [(1024, 4096), (4096, 1024), (2048, 2048)]
TOKENS = [10, 64, 256, 800]
# Forward time does not depend on how long the greedy search ran, so calibration is kept short.
BASE = dict(mode="duquant", rotation_steps=32)
QUANTIZED = {  # variant -> (w_bits, a_bits, backend)
    "fake_w8a8": (8, 8, "fake"), "int_w8a8": (8, 8, "int"),
    "fake_w4a8": (4, 8, "fake"), "int_w4a8": (4, 8, "int"),
    "int_w4a16": (4, 16, "int"),
}  # fmt: skip
CALIB_TOKENS = 128
TARGET_SECONDS = 0.4  # per variant and shape/token point
WEIGHT_BUFFERS = ("weight", "qweight", "w_scale", "w_zero", "fwd_w_scale")


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


def config(variant: str) -> QuantConfig:
    w_bits, a_bits, backend = QUANTIZED[variant]
    return QuantConfig(**BASE, w_bits=w_bits, a_bits=a_bits, backend=backend)


def calibrating_copy(fp: nn.Linear, cfg: QuantConfig, probe: torch.Tensor) -> tuple[DuQuantLinear, Calibration]:
    """A DuQuant copy of ``fp`` that has recorded ``probe``, and its calibration handle (not finished yet)."""
    model = nn.Sequential(nn.Linear(fp.in_features, fp.out_features)).to(probe.device)
    model.load_state_dict({f"0.{k}": v for k, v in fp.state_dict().items()})
    calibration = quantize_(model, cfg, LayerSelection())
    model(probe)
    return model[0], calibration


def quantized_layer(fp: nn.Linear, variant: str, probe: torch.Tensor) -> DuQuantLinear:
    """A DuQuant copy of ``fp`` for ``variant``, calibrated on ``probe``."""
    layer, calibration = calibrating_copy(fp, config(variant), probe)
    calibration.finish()
    return layer


def resident_bytes(layer: nn.Module) -> dict[str, int]:
    """Bytes the layer keeps: its weight with scales and zero points, and the transform apart (shared tensors once)."""
    if isinstance(layer, nn.Linear):
        return {"weight_bytes": layer.weight.nbytes, "transform_bytes": 0}
    seen, weight, transform = set(), 0, 0
    for name, buffer in layer.named_buffers():
        if buffer is None or name == "bias" or buffer.data_ptr() in seen:
            continue
        seen.add(buffer.data_ptr())
        if name in WEIGHT_BUFFERS:
            weight += buffer.nbytes
        else:
            transform += buffer.nbytes
    kernel = 0 if layer.kernel is None else layer.kernel.nbytes()
    return {"weight_bytes": weight + kernel, "transform_bytes": transform}


def naive_reference(fp: nn.Linear, probe: torch.Tensor) -> "NaiveDuQuant":
    """The naive port with the same fitted transform as the W4A8 layer (checked to agree with it)."""
    cfg = config("fake_w4a8")
    layer, calibration = calibrating_copy(fp, cfg, probe)
    transform = fit_transform(cfg, layer.bits, layer.weight, layer.stats.channel_max, layer.stats.sample)
    calibration.finish()
    naive = NaiveDuQuant(fp, transform, cfg)
    gap = ((layer(probe) - naive(probe)).norm() / naive(probe).norm()).item()
    if gap > 1e-3:
        raise AssertionError(f"DuQuant and the naive reference disagree at {fp.in_features}x{fp.out_features}: {gap:.2e}")
    return naive


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


def bench_layers(shapes, device: torch.device, naive: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(3)
    print(f"{'in':>6} {'out':>6} {'tokens':>6} " + " ".join(f"{v:>10}" for v in ("fp32", "bf16", *QUANTIZED)) + "  (ms)")
    for in_features, out_features in shapes:
        torch.manual_seed(0)
        fp = nn.Linear(in_features, out_features).to(device)
        probe = planted_activations(CALIB_TOKENS, in_features, torch.Generator().manual_seed(1)).to(device)
        layers: dict[str, Callable] = {"fp32": fp, "bf16": nn.Linear(in_features, out_features).to(device, torch.bfloat16)}
        layers["bf16"].load_state_dict({k: v.bfloat16() for k, v in fp.state_dict().items()})
        layers.update({variant: quantized_layer(fp, variant, probe) for variant in QUANTIZED})
        fp32_bytes = fp.weight.nbytes
        memory = {name: resident_bytes(layer) for name, layer in layers.items()}
        if naive:
            layers["naive_w4a8"] = naive_reference(fp, probe)
        for tokens in TOKENS:
            x = planted_activations(tokens, in_features, g).to(device)
            inputs = {name: x.bfloat16() if name == "bf16" else x for name in layers}
            ms = measure({name: (lambda f=f, i=inputs[name]: f(i)) for name, f in layers.items()}, device)
            rows.append({"in_features": in_features, "out_features": out_features, "tokens": tokens, "device": device.type,
                         "ms": {k: round(v, 4) for k, v in ms.items()},
                         "ratio_vs_fp32": {k: round(v / ms["fp32"], 3) for k, v in ms.items()},
                         "bytes": memory,
                         "weight_ratio_vs_fp32": {k: round(m["weight_bytes"] / fp32_bytes, 4) for k, m in memory.items()}})  # fmt: skip
            print(f"{in_features:>6} {out_features:>6} {tokens:>6} " + " ".join(f"{ms[v]:>10.3f}" for v in ms))
        print("weight bytes / fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["weight_ratio_vs_fp32"].items()))
        del layers
    return rows


def bench_policy(device: torch.device, calls: int = 20) -> list[dict]:
    """The embedded policy's p50 call latency and the bytes of its quantized layers, per variant."""
    from libero_eval.config import QuantRunConfig
    from libero_eval.quantize import layer_selection, quantizing
    from policies.base import ObservationBatch
    from policies.embedded import EmbeddedPolicy

    rng = np.random.default_rng(0)
    batch = ObservationBatch(
        state=rng.normal(size=(2, 8)).astype(np.float32), instructions=["put the bowl on the plate"] * 2,
        object_poses=rng.normal(size=(2, 4, 7)).astype(np.float32), episode_ids=["a", "b"], episode_seeds=[0, 1],
        steps=[0, 0],
    )  # fmt: skip
    rows = []
    for variant in ("fp", *QUANTIZED):
        policy = EmbeddedPolicy(None, device=device.type)
        module = policy.module
        if variant != "fp":
            w_bits, a_bits, backend = QUANTIZED[variant]
            cfg = QuantRunConfig(**BASE, w_bits=w_bits, a_bits=a_bits, backend=backend, calib_steps=4)
            policy = quantizing(policy, cfg, "unused")
            policy._calibration.store = None  # no pack cache: nothing written
        for _ in range(6):  # calibration (4) and warm-up
            policy.predict(batch)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            policy.predict(batch)
            times.append((time.perf_counter() - start) * 1e3)
        quantized = [m for m in module.modules() if isinstance(m, DuQuantLinear)]
        # For FP, the linears a default run quantizes.
        counted = quantized or [m for _, m in select_layers(module, layer_selection(policy, QuantRunConfig()))]
        weight = sum(resident_bytes(m)["weight_bytes"] for m in counted)
        transform = sum(resident_bytes(m)["transform_bytes"] for m in counted)
        rows.append({"variant": variant, "p50_ms": round(statistics.median(times), 2), "layers": len(counted),
                     "weight_bytes": weight, "transform_bytes": transform})  # fmt: skip
    fp_bytes = rows[0]["weight_bytes"]
    print(f"\n{'policy':>10} {'p50 ms':>8} {'x fp':>6} {'weights MB':>10} {'x fp32':>7} {'transform MB':>12}")
    for row in rows:
        row["ratio_vs_fp"] = round(row["p50_ms"] / rows[0]["p50_ms"], 3)
        row["weight_ratio_vs_fp32"] = round(row["weight_bytes"] / fp_bytes, 4)
        print(f"{row['variant']:>10} {row['p50_ms']:>8.1f} {row['ratio_vs_fp']:>6.2f} {row['weight_bytes'] / 2**20:>10.2f} "
              f"{row['weight_ratio_vs_fp32']:>7.3f} {row['transform_bytes'] / 2**20:>12.2f}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--naive", action="store_true", help="also time the naive per-block port of W4A8")
    parser.add_argument("--no-policy", action="store_true", help="skip the embedded policy")
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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": {**BASE, "variants": QUANTIZED},
        "calib_tokens": CALIB_TOKENS,
        "quick": args.quick,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"torch {header['torch']}, {header['threads']} threads, {header['device_name']} ({header['cpu_capability']})")
    with torch.inference_mode():
        layers = bench_layers(QUICK_SHAPES if args.quick else SHAPES, device, args.naive)
        policy = [] if args.no_policy else bench_policy(device)
    header["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "layers": layers, "policy": policy}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
