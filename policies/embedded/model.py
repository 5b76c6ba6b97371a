"""A small VLA-shaped network: a transformer backbone over observation tokens and a flow-matching action expert.

The layout copies pi0 where quantization cares: linear layers are named
``{backbone,expert}.layers.{i}.self_attn.{q,k,v,o}_proj`` and
``{backbone,expert}.layers.{i}.mlp.{gate,up,down}_proj`` with hidden sizes that
are multiples of 64, so DuQuant scope presets and block rotations written for
pi0-style checkpoints apply unchanged. Everything else (input projections,
time MLP, action head) has names outside those stacks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from policies.base import ACTION_DIM

STATE_FEATURES = 11  # eef position (3) + rotation 6D (6) + gripper qpos (2)
POSE_FEATURES = 12  # object position (3) + rotation 6D (6) + object position relative to the eef (3)


@dataclass(frozen=True)
class ModelConfig:
    text_dim: int = 384
    width: int = 256
    mlp_dim: int = 1024
    depth: int = 2
    expert_width: int = 256
    expert_mlp_dim: int = 512
    expert_depth: int = 3
    heads: int = 4
    head_dim: int = 64
    horizon: int = 10
    num_steps: int = 10
    max_objects: int = 4

    def __post_init__(self) -> None:
        for name in ("width", "mlp_dim", "expert_width", "expert_mlp_dim"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64 (DuQuant block rotation)")
        if self.expert_width != self.width:
            raise ValueError("the expert reads backbone tokens with its own k/v projections: widths must match")


class WeightsError(ValueError):
    """A weights file that does not fit this model."""


def rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """First two columns of rotation matrices [..., 3, 3] -> [..., 6]: continuous, unlike axis-angle near pi."""
    return matrix[..., :, :2].flatten(-2)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula; exact at zero angle (the skew terms vanish with it)."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    axis = axis_angle / angle.clamp_min(1e-8)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    sin, cos = angle.sin()[..., None], angle.cos()[..., None]
    return eye + sin * skew + (1 - cos) * skew @ skew


def quaternion_to_matrix(quat_xyzw: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of (not necessarily unit) quaternions; q and -q give the same matrix."""
    x, y, z, w = F.normalize(quat_xyzw, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def state_features(state: torch.Tensor) -> torch.Tensor:
    """[..., 8] protocol state -> [..., 11]; rotation as 6D so the sign flips of axis-angle near pi vanish."""
    return torch.cat([state[..., :3], rotation_6d(axis_angle_to_matrix(state[..., 3:6])), state[..., 6:8]], dim=-1)


def pose_features(poses: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """[B, K, 7] object poses -> [B, K, 12]; the eef-relative position makes grasp targets explicit."""
    position = poses[..., :3]
    relative = position - state[:, None, :3]
    return torch.cat([position, rotation_6d(quaternion_to_matrix(poses[..., 3:7])), relative], dim=-1)


class Standardizer(nn.Module):
    """Per-feature mean/std kept as buffers, so the statistics travel inside the weights file."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, values: torch.Tensor, min_std: float = 1e-2) -> None:
        """Set the statistics from [N, dim] samples; the std floor keeps near-constant features from exploding."""
        flat = values.reshape(-1, values.shape[-1]).double()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(min_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLP(nn.Module):
    """SwiGLU feed-forward, as in Gemma/Llama-style VLA backbones."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention whose keys/values may be prefixed with a context that is projected separately."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, width, bias=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def context(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of context tokens, computed once and reused across denoising steps."""
        return self.split(self.k_proj(tokens)), self.split(self.v_proj(tokens))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        if context is not None:
            k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class Layer(nn.Module):
    """Pre-norm transformer block; ``context`` holds keys/values of tokens this block reads but does not update."""

    def __init__(self, width: int, mlp_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(width)
        self.self_attn = Attention(width, heads, head_dim)
        self.post_attention_layernorm = RMSNorm(width)
        self.mlp = GatedMLP(width, mlp_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Layers plus a final norm; the owner runs them, since backbone and expert feed their layers differently."""

    def __init__(self, depth: int, width: int, mlp_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width, mlp_dim, heads, head_dim) for _ in range(depth))
        self.norm = RMSNorm(width)


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sine/cosine features of the flow time t in [0, 1], with periods spanning the denoising range."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=t.dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = 2 * math.pi * t[:, None] / period
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class EmbeddedVLA(nn.Module):
    """Backbone over [instruction, state, objects...] tokens; expert denoises an action chunk by flow matching.

    Every expert layer reads the backbone's final tokens through its own key/value
    projections (pi0 concatenates prefix keys/values the same way). Unlike pi0,
    which reads layer i of the backbone, reading the final tokens leaves no
    backbone weight without influence on the actions, so quantizing any
    backbone layer is visible in the outcome.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        c = self.config = config
        self.state_stats = Standardizer(STATE_FEATURES)
        self.pose_stats = Standardizer(POSE_FEATURES)
        self.action_stats = Standardizer(ACTION_DIM)
        self.text_proj = nn.Linear(c.text_dim, c.width)
        self.state_proj = nn.Linear(STATE_FEATURES, c.width)
        self.pose_proj = nn.Linear(POSE_FEATURES, c.width)
        self.prefix_pos_emb = nn.Parameter(torch.randn(2 + c.max_objects, c.width) * 0.02)
        self.backbone = Transformer(c.depth, c.width, c.mlp_dim, c.heads, c.head_dim)
        self.action_in_proj = nn.Linear(ACTION_DIM, c.expert_width)
        self.time_mlp_in = nn.Linear(2 * c.expert_width, c.expert_width)
        self.time_mlp_out = nn.Linear(c.expert_width, c.expert_width)
        self.action_pos_emb = nn.Parameter(torch.randn(c.horizon, c.expert_width) * 0.02)
        self.expert = Transformer(c.expert_depth, c.expert_width, c.expert_mlp_dim, c.heads, c.head_dim)
        self.action_out_proj = nn.Linear(c.expert_width, ACTION_DIM)

    def encode(
        self, text: torch.Tensor, state: torch.Tensor, poses: torch.Tensor, pose_mask: torch.Tensor | None = None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Run the backbone once; returns each expert layer's context keys/values and the prefix mask.

        ``text`` [B, text_dim], ``state`` [B, 8], ``poses`` [B, K, 7]; ``pose_mask``
        [B, K] marks real objects when rows were padded to a common K.
        """
        b, k = poses.shape[:2]
        if k > self.config.max_objects:
            raise ValueError(f"{k} objects of interest, the model takes at most {self.config.max_objects}")
        if pose_mask is None:
            pose_mask = torch.ones(b, k, dtype=torch.bool, device=state.device)
        tokens = torch.cat(
            [
                self.text_proj(text)[:, None],
                self.state_proj(self.state_stats(state_features(state)))[:, None],
                self.pose_proj(self.pose_stats(pose_features(poses, state))),
            ],
            dim=1,
        )
        tokens = tokens + self.prefix_pos_emb[: 2 + k]
        mask = torch.cat([torch.ones(b, 2, dtype=torch.bool, device=state.device), pose_mask], dim=1)
        for layer in self.backbone.layers:
            tokens = layer(tokens, mask)
        tokens = self.backbone.norm(tokens)
        return [layer.self_attn.context(tokens) for layer in self.expert.layers], mask

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context, prefix_mask: torch.Tensor) -> torch.Tensor:
        """Flow velocity d x_t / d t for normalised noisy actions [B, H, 7] at times t [B]."""
        c = self.config
        temb = time_embedding(t, c.expert_width).to(x_t.dtype)[:, None].expand(-1, c.horizon, -1)
        x = self.time_mlp_out(F.silu(self.time_mlp_in(torch.cat([self.action_in_proj(x_t), temb], dim=-1))))
        x = x + self.action_pos_emb
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(len(x), c.horizon)], dim=1)
        for layer, kv in zip(self.expert.layers, context):
            x = layer(x, mask, kv)
        return self.action_out_proj(self.expert.norm(x))

    @torch.no_grad()
    def sample_actions(self, text, state, poses, noise: torch.Tensor) -> torch.Tensor:
        """Euler-integrate from noise (t=1) to actions (t=0); the backbone runs once for all steps."""
        context, mask = self.encode(text, state, poses)
        x, dt = noise, -1.0 / self.config.num_steps
        for i in range(self.config.num_steps):
            t = torch.full((len(x),), 1.0 + i * dt, dtype=x.dtype, device=x.device)
            x = x + dt * self.velocity(x, t, context, mask)
        return self.action_stats.inverse(x)

    def loss(self, text, state, poses, actions, noise, t, pose_mask=None) -> torch.Tensor:
        """Flow-matching loss: x_t = t * noise + (1 - t) * actions, target velocity noise - actions."""
        target = self.action_stats(actions)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * target
        context, mask = self.encode(text, state, poses, pose_mask)
        return F.mse_loss(self.velocity(x_t, t, context, mask), noise - target)


def save_weights(model: EmbeddedVLA, path: str | Path) -> None:
    """safetensors file whose metadata carries the config, so loading rebuilds the same architecture.

    The metadata holds a single key: safetensors writes metadata in hash-map order, so
    several keys would make identical weights hash differently from run to run.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(asdict(model.config))})
    os.chmod(path, 0o644)  # safetensors creates 0600 files; shipped weights must be readable by every user


def require_weights_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded policy weights not found at {path}; train them with scripts/train_embedded_policy.py "
            "or pass the path of an existing model.safetensors"
        )


def load_weights(path: str | Path) -> EmbeddedVLA:
    """Rebuild the model from a file written by :func:`save_weights`; refuses anything that does not match exactly."""
    path = Path(path)
    require_weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "config" not in metadata:
        raise WeightsError(f"{path} has no 'config' metadata: it was not written by save_weights")
    try:
        model = EmbeddedVLA(ModelConfig(**json.loads(metadata["config"])))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path} describes an unsupported architecture: {exc}") from exc
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if k in state}
    wrong = [f"{k} {got} != {want}" for k, (got, want) in shapes.items() if got != want]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{path} does not match the embedded model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    model.load_state_dict(state)
    return model.eval()
