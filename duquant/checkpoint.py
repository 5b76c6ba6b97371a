"""Saved quantized models: quantize once, evaluate or serve many times.

A directory holds one safetensors file with the ``state_dict`` of every
quantized layer (integer codes packed as they are stored, scales, zero points,
the fitted transform, the bias) under the layer's qualified name, and in its
metadata what each layer is (mode, bits, block size), the caller's metadata
(e.g. which model and weights it was made from) and a sha256 of all tensors,
checked on load. Only quantized layers are saved: the rest of the model comes
from its own checkpoint, which is why callers record which one that was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .api import _replace
from .config import LayerBits
from .linear import DuQuantLinear
from .pack import content_sha256

FORMAT = "duquant-quantized"
VERSION = "1"
FILE_NAME = "quantized.safetensors"


class QuantizedCheckpointError(ValueError):
    """A saved quantized model is missing, damaged, or does not fit the model it is loaded into."""


def save_quantized(model: nn.Module, directory: Path | str, metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write every quantized :class:`DuQuantLinear` of ``model`` to ``directory``/quantized.safetensors, atomically."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DuQuantLinear)]
    if not layers or not all(m.quantized for _, m in layers):
        raise QuantizedCheckpointError("save_quantized needs a quantized model: quantize_ it and finish calibration first")
    tensors, described = {}, {}
    for name, layer in layers:
        for key, value in layer.state_dict().items():
            if key == "_extra_state":
                described[name] = value
            else:
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    header = {"format": FORMAT, "version": VERSION, "layers": json.dumps(described), "sha256": content_sha256(tensors),
              "metadata": json.dumps(metadata or {})}  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)
    return path


def read_metadata(directory: Path | str) -> dict[str, Any]:
    """The caller's metadata of a saved model (cheap: the header only)."""
    _, header, _ = _open(directory, tensors=False)
    return json.loads(header["metadata"])


def load_quantized(model: nn.Module, directory: Path | str, backend: str = "fake") -> dict[str, Any]:
    """Replace the saved layers of ``model`` (a freshly built FP model, or one already set up by ``quantize_``)
    by the saved quantized layers, computing with ``backend``; returns the saved metadata."""
    path, header, tensors = _open(directory, tensors=True)
    if header.get("sha256") != content_sha256(tensors):
        raise QuantizedCheckpointError(f"{path} is damaged: its tensors do not match the sha256 in its metadata")
    modules = dict(model.named_modules())
    for name, state in json.loads(header["layers"]).items():
        module = modules.get(name)
        if isinstance(module, nn.Linear):
            module = _swap(model, module, state, backend)
        elif not isinstance(module, DuQuantLinear):
            raise QuantizedCheckpointError(f"{path} holds layer {name!r}, which is not a linear layer of this model")
        prefix = f"{name}."
        layer_state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict({**layer_state, "_extra_state": state})
        except (RuntimeError, ValueError) as err:
            raise QuantizedCheckpointError(f"{path}: layer {name!r} does not fit this model ({_first_line(err)})") from None
    return json.loads(header["metadata"])


def _swap(model: nn.Module, linear: nn.Linear, state: dict, backend: str) -> DuQuantLinear:
    layer = DuQuantLinear(linear, state["mode"], LayerBits(**state["bits"]), backend=backend)
    _replace(model, linear, layer)
    return layer


def _open(directory: Path | str, tensors: bool) -> tuple[Path, dict, dict]:
    """(path, header, tensors if asked) of a saved model, its format checked."""
    path = _path(directory)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise QuantizedCheckpointError(f"{path} is not a readable quantized model ({err})") from None
    _check_format(path, header)
    return path, header, loaded


def _path(directory: Path | str) -> Path:
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        raise QuantizedCheckpointError(f"no saved quantized model at {directory} (expected {path})")
    return path


def _check_format(path: Path, header: dict) -> None:
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise QuantizedCheckpointError(
            f"{path} is not a {FORMAT} v{VERSION} file (format={header.get('format')!r}, version={header.get('version')!r})"
        )


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
