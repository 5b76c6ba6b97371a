"""Packs: fitted transforms cached as safetensors files, one per layer.

A pack's file name carries a hash of everything the transform depends on:
the quantization settings of the layer, its weight, its calibration
statistics and the pack format version. A changed knob, weight or input
therefore looks up a different file and a stale pack is never reused. A pack
that cannot be read, does not describe a valid transform, or whose tensors no
longer match the content hash stored in its metadata (bytes altered on disk
behind an intact header) is reported by file name and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LayerBits, QuantConfig
from .stats import ActivationStats
from .transform import Transform

PACK_FORMAT = "duquant-pack"
PACK_VERSION = 2  # 2: metadata "sha256" of the tensors; a version-1 pack (no hash) is keyed apart, never read
# Fields that cannot change a layer's transform: which layers, and how the quantized layer computes.
_UNKEYED = ("include", "exclude", "layers", "overrides", "backend")


class CorruptPackError(ValueError):
    """A pack file exists but does not hold a valid transform for its layer."""


def pack_key(name: str, cfg: QuantConfig, bits: LayerBits, weight: torch.Tensor, stats: ActivationStats) -> str:
    """Hash of the layer's settings, weight and calibration statistics."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _UNKEYED}
    header = {"version": PACK_VERSION, "layer": name, "settings": settings, "bits": vars(bits), "rows": stats.rows_seen}
    digest = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=20)
    for tensor in (weight, stats.channel_max, stats.sample):
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: what a pack's metadata vouches for."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        _hash_tensor(digest, tensors[name])
    return digest.hexdigest()


def _hash_tensor(digest: "hashlib._Hash", tensor: Optional[torch.Tensor]) -> None:
    if tensor is None:
        digest.update(b"none")
        return
    t = tensor.detach().contiguous().cpu()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


class PackStore:
    """A directory of packs."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def path(self, name: str, key: str) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:24]}.safetensors"

    def load(self, name: str, key: str, in_features: int, device: torch.device) -> Optional[Transform]:
        """The cached transform, or None when there is no pack; CorruptPackError names a bad file."""
        path = self.path(name, key)
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CorruptPackError(f"pack {path} is unreadable ({err})") from None
        # safetensors checks only the header: altered tensor bytes would otherwise load as a valid-looking transform.
        if metadata.get("sha256") != content_sha256(tensors):
            raise CorruptPackError(f"pack {path} is damaged: its tensors do not match the sha256 in its metadata")
        transform = _decode(path, metadata, tensors, name, key, in_features)
        for field_name, tensor in transform.tensors().items():
            setattr(transform, field_name, tensor.to(device))
        return transform

    def save(self, name: str, key: str, transform: Transform) -> Path:
        """Write atomically, so a crash mid-write never leaves a truncated pack under the real name."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(name, key)
        metadata = {
            "format": PACK_FORMAT,
            "version": str(PACK_VERSION),
            "layer": name,
            "key": key,
            "in_features": str(transform.in_features),
            "block": str(transform.block),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in transform.tensors().items()}
        metadata["sha256"] = content_sha256(tensors)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_or_rebuild(
        self, name: str, key: str, in_features: int, device: torch.device
    ) -> tuple[Optional[Transform], str]:
        """(transform, "hit") on a valid pack, (None, "miss") without one, (None, "rebuilt") after a corrupt one."""
        try:
            transform = self.load(name, key, in_features, device)
        except CorruptPackError as err:
            warnings.warn(f"{err}; rebuilding it", stacklevel=2)
            return None, "rebuilt"
        return transform, "hit" if transform is not None else "miss"


def _decode(path: Path, metadata: dict, tensors: dict, name: str, key: str, in_features: int) -> Transform:
    def bad(reason: str) -> CorruptPackError:
        return CorruptPackError(f"pack {path} is invalid: {reason}")

    expected = {"format": PACK_FORMAT, "version": str(PACK_VERSION), "layer": name, "key": key}
    for field_name, value in expected.items():
        if metadata.get(field_name) != value:
            raise bad(f"metadata {field_name}={metadata.get(field_name)!r}, expected {value!r}")
    if metadata.get("in_features") != str(in_features):
        raise bad(f"in_features={metadata.get('in_features')!r}, expected {in_features}")
    try:
        block = int(metadata.get("block", ""))
    except ValueError:
        raise bad(f"block={metadata.get('block')!r} is not an integer") from None
    known = {"smooth", "r1", "perm", "r2", "row_rotation", "act_scale"}
    if set(tensors) - known:
        raise bad(f"unexpected tensors {sorted(set(tensors) - known)}")
    t = Transform(in_features, block, **tensors)
    width = t.width
    if block < 0 or (block == 0) != (t.r1 is None):
        raise bad(f"block={block} does not match the rotations present")
    shapes = {"smooth": (in_features,), "perm": (width,), "act_scale": (width,)}
    for field_name, shape in shapes.items():
        tensor = getattr(t, field_name)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise bad(f"{field_name} has shape {tuple(tensor.shape)}, expected {shape}")
    for field_name in ("r1", "r2", "row_rotation"):
        r = getattr(t, field_name)
        if r is not None and (r.dim() != 3 or r.shape[1] != r.shape[2] or r.dtype != torch.float32):
            raise bad(f"{field_name} is not a float32 [G, b, b] stack of rotations")
    for field_name in ("r1", "r2"):
        r = getattr(t, field_name)
        if r is not None and (r.shape[1] != block or r.shape[0] not in (1, width // block)):
            raise bad(f"{field_name} has shape {tuple(r.shape)} for block {block} and width {width}")
    if t.perm is not None and not torch.equal(torch.sort(t.perm).values, torch.arange(width)):
        raise bad("perm is not a permutation")
    for field_name, tensor in t.tensors().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise bad(f"{field_name} has non-finite values")
    return t
