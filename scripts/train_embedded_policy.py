"""Train the embedded policy on scripted-expert demos and write the shipped weights.

    python scripts/train_embedded_policy.py --demos data/demos/demos.npz --out policies/embedded/weights

Writes ``model.safetensors`` (weights, normalisation statistics, architecture)
and ``recipe.json`` (arguments, seed, sha256 of the demos, final loss) so the
shipped file can be reproduced and audited. Sized to finish within an hour on
two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from policies.base import file_sha256
from policies.embedded.model import EmbeddedVLA, ModelConfig, pose_features, save_weights, state_features
from policies.embedded.text import InstructionEncoder


@dataclass
class Demos:
    """Per-step tensors plus, for each step, the indices of its action chunk (clamped to the episode's end)."""

    state: torch.Tensor  # [N, 8]
    poses: torch.Tensor  # [N, K, 7]
    pose_mask: torch.Tensor  # [N, K] real objects (rows are padded when suites with fewer objects are mixed)
    actions: torch.Tensor  # [N, 7]
    chunks: torch.Tensor  # [N, H] step indices
    episode: torch.Tensor  # [N] episode of each step
    episode_text: torch.Tensor  # [E, 384] instruction embedding of each episode


def chunk_indices(episode_index: np.ndarray, horizon: int) -> np.ndarray:
    """[N, horizon] indices of each step's next actions, repeating an episode's last step past its end."""
    n = len(episode_index)
    last = np.empty(n, dtype=np.int64)
    ends = np.flatnonzero(np.r_[episode_index[1:] != episode_index[:-1], True])
    starts = np.r_[0, ends[:-1] + 1]
    for start, end in zip(starts, ends):
        last[start : end + 1] = end
    return np.minimum(np.arange(n)[:, None] + np.arange(horizon)[None], last[:, None])


def load_demos(paths: list[Path], horizon: int, encoder: InstructionEncoder) -> tuple[Demos, list[dict]]:
    """One training set from one or more demo files (e.g. noise-free and noise-injected collections)."""
    parts, summaries = [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if np.any(np.diff(arrays["episode_index"]) < 0):
            raise ValueError(f"{path}: steps must be grouped by episode in order")
        parts.append(arrays)
        summaries.append({
            "path": str(path),
            "sha256": file_sha256(path),
            "episodes": len(arrays["instruction"]),
            "steps": len(arrays["episode_index"]),
            "suites": sorted({str(s) for s in arrays.get("suite", [])}),
            "max_objects": int(arrays["object_poses"].shape[1]),
        })  # fmt: skip
    k = max(a["object_poses"].shape[1] for a in parts)
    poses, masks, episode_index, offset = [], [], [], 0
    for a in parts:
        n, own = a["object_poses"].shape[:2]
        padded, mask = np.zeros((n, k, 7), np.float32), np.zeros((n, k), bool)
        padded[:, :own] = a["object_poses"]
        mask[:, :own] = a.get("object_mask", np.ones((n, own), dtype=bool))
        poses.append(padded)
        masks.append(mask)
        episode_index.append(a["episode_index"].astype(np.int64) + offset)
        offset += len(a["instruction"])
    episodes = np.concatenate(episode_index)
    instructions = [str(s) for a in parts for s in a["instruction"]]
    demos = Demos(
        state=torch.as_tensor(np.concatenate([a["state"] for a in parts]), dtype=torch.float32),
        poses=torch.as_tensor(np.concatenate(poses)),
        pose_mask=torch.as_tensor(np.concatenate(masks)),
        actions=torch.as_tensor(np.concatenate([a["actions"] for a in parts]), dtype=torch.float32),
        chunks=torch.as_tensor(chunk_indices(episodes, horizon)),
        episode=torch.as_tensor(episodes),
        episode_text=encoder(instructions),
    )
    return demos, summaries


def fit_statistics(model: EmbeddedVLA, demos: Demos) -> None:
    """Normalisation statistics from the demos; padded object slots are left out."""
    model.state_stats.fit(state_features(demos.state))
    model.pose_stats.fit(pose_features(demos.poses, demos.state)[demos.pose_mask])
    model.action_stats.fit(demos.actions)


def sample_batch(demos: Demos, size: int, obs_noise: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random steps with their action chunks; ``obs_noise`` (metres) jitters eef and object positions."""
    idx = torch.randint(len(demos.state), (size,), generator=gen)
    state, poses = demos.state[idx].clone(), demos.poses[idx].clone()
    if obs_noise > 0:
        state[:, :3] += obs_noise * torch.randn(state[:, :3].shape, generator=gen)
        poses[..., :3] += obs_noise * torch.randn(poses[..., :3].shape, generator=gen)
    return demos.episode_text[demos.episode[idx]], state, poses, demos.actions[demos.chunks[idx]], demos.pose_mask[idx]


def flow_time(size: int, gen: torch.Generator) -> torch.Tensor:
    """t ~ Beta(1.5, 1) (inverse CDF u^(1/1.5)) squeezed into [0.001, 1]: more weight on noisy times, as pi0."""
    return torch.rand(size, generator=gen).pow(1 / 1.5) * 0.999 + 0.001


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> tuple[EmbeddedVLA, dict]:
    config = ModelConfig()
    demos, data = load_demos([Path(p) for p in args.demos], config.horizon, InstructionEncoder())
    torch.manual_seed(args.seed)  # after loading: the sentence encoder's first load draws from the global RNG
    gen = torch.Generator().manual_seed(args.seed)
    model = EmbeddedVLA(config)
    fit_statistics(model, demos)
    # Flow-matching policies act better from an exponential moving average of the weights than from the last
    # step's, which carry the noise of the last few batches (as Diffusion Policy and LeRobot do).
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay)) if args.ema_decay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        text, state, poses, actions, mask = sample_batch(demos, args.batch_size, args.obs_noise, gen)
        noise = torch.randn(actions.shape, generator=gen)
        loss = model.loss(text, state, poses, actions, noise, flow_time(len(actions), gen), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = float(np.mean(losses[-args.log_every :]))
            print(f"step {step + 1}/{args.steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    tail = losses[-min(len(losses), args.log_every) :]
    recipe = {
        "command": "python scripts/train_embedded_policy.py " + " ".join(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "seed": args.seed,
        "data": data,
        "config": asdict(config),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": float(np.mean(tail)),
        "final_loss_window": len(tail),
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return (model if ema is None else ema.module).eval(), recipe


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", nargs="+", default=["data/demos/demos.npz"],
                   help="demos file(s) written by scripts/collect_demos.py, trained on together")  # fmt: skip
    p.add_argument("--out", default="policies/embedded/weights", help="directory for model.safetensors + recipe.json")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--obs-noise", type=float, default=0.0, help="std (m) of position jitter on eef/object inputs")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="ship an exponential moving average of the weights with this decay (0: the last step's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    model, recipe = train(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    recipe["weights_sha256"] = file_sha256(out / "model.safetensors")
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {out / 'model.safetensors'} (final loss {recipe['final_loss']:.4f})")
    return recipe


if __name__ == "__main__":
    main()
