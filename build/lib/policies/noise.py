"""Seeded per-episode noise, the rule every policy family shares so reruns and batch layouts agree."""

from __future__ import annotations

import numpy as np
import torch


def noise_key(seed: int, step: int) -> int:
    """A 63-bit generator key that depends only on (episode seed, step), equal under numpy 1.x and 2.x."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, np.uint64)
    return int(state[0]) >> 1  # a Python int: numpy 1.x refuses ``np.uint64 >> int``


def episode_noise(seeds: list[int], steps: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal sample of ``shape`` per row, a function of (episode seed, step) only."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_key(s, t))) for s, t in zip(seeds, steps)]
    return torch.stack(rows)
