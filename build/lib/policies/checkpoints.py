"""One line for a checkpoint that does not fit its model, instead of torch's multi-page ``load_state_dict`` error."""

from __future__ import annotations

import re

_SIZE = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
                   r"the shape in current model is torch\.Size\((\[[^\]]*\])\)")  # fmt: skip
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)")


def state_dict_mismatch(err: BaseException, shown: int = 3) -> str | None:
    """The first mismatched tensors of a ``load_state_dict`` error (torch's or safetensors' strict loader), or
    None when ``err`` is another error."""
    text = str(err)
    if "Error(s) in loading state_dict" not in text and "size mismatch for" not in text:
        return None
    resized = [f"{name} (file {file}, model {model})" for name, file, model in _SIZE.findall(text)]
    parts = [_listed(f"{len(resized)} resized", resized, shown)] if resized else []
    for kind, keys in _KEYS.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        parts.append(_listed(f"{len(names)} {kind.lower()}", names, shown))
    return "; ".join(parts) if parts else text.splitlines()[0]


def _listed(what: str, names: list[str], shown: int) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{what}: {', '.join(names[:shown])}{more}"
