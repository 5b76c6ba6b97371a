"""Checkpoint checks that end in one line: a checkpoint that does not fit its model (instead of torch's multi-page
``load_state_dict`` error), and weights whose sha256 is not the expected one."""

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
    parts = [listed_names(f"{len(resized)} resized", resized, shown)] if resized else []
    for kind, keys in _KEYS.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        parts.append(listed_names(f"{len(names)} {kind.lower()}", names, shown))
    return "; ".join(parts) if parts else text.splitlines()[0]


def listed_names(what: str, names: list[str], shown: int = 3) -> str:
    """``what: a, b, c and 5 more``: a long list of tensor names kept to one readable line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{what}: {', '.join(names[:shown])}{more}"


class WeightsHashError(ValueError):
    """Weights whose sha256 is not the one they must have; the message is one line."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


def expected_sha256(value: str | None) -> str | None:
    """``policy.sha256`` in lower case, refused unless it is 64 hex digits: checked before any weights are read."""
    if value is None:
        return None
    digest = str(value).strip().lower()
    if not _SHA256.fullmatch(digest):
        raise WeightsHashError(f"policy.sha256 must be 64 hex digits, got {value!r}")
    return digest


def check_sha256(weights: str, actual: str | None, expected: str | None, source: str = "policy.sha256") -> None:
    """Refuse weights whose sha256 differs from ``expected`` (None: nothing to check). Damaged or swapped weights
    load without complaint and compute garbage (non-finite or plausible-but-wrong actions), so a hash that is known
    is always compared."""
    if expected is not None and actual != expected:
        raise WeightsHashError(f"{weights} has sha256 {actual}, but {source} expects {expected}: damaged or swapped")
