"""Seeds derived from the config seed, so each random stream is fixed by what it is for, not by run order."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (e.g. a layer name and what the randomness is used for)."""
    text = ":".join([str(seed), *purpose])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
