"""Zigzag channel permutation: balance outlier mass across rotation blocks."""

from __future__ import annotations

import torch


def zigzag_permutation(channel_max: torch.Tensor, block: int) -> torch.Tensor:
    """Order channels so each block of ``block`` gets a fair share of large and small ones.

    Channels are sorted by magnitude (largest first) and dealt to the K blocks
    back and forth, 0, 1, ..., K-1, K-1, ..., 0, 0, 1, ..., so the blocks'
    sums of magnitudes end up close and the next rotation has similar work in
    every block. Returns ``perm`` with ``x_permuted = x[..., perm]``.
    """
    width = channel_max.numel()
    if width % block:
        raise ValueError(f"zigzag needs a width divisible by the block size, got {width} and {block}")
    blocks = width // block
    ranked = torch.argsort(channel_max.flatten(), descending=True, stable=True)
    rank = torch.arange(width, device=channel_max.device)
    phase = rank % (2 * blocks)
    target_block = torch.where(phase < blocks, phase, 2 * blocks - 1 - phase)
    slot = target_block * block + rank // blocks
    perm = torch.empty_like(ranked)
    perm[slot] = ranked
    return perm
