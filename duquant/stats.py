"""Activation statistics recorded during calibration, bounded in memory.

Every forward call counts: the per-channel max |x| is a running max over all
rows of all calls (so a late outlier still moves the smoothing scales), and a
reservoir keeps a uniform sample of at most ``capacity`` rows for the steps
that need actual rows (rotations, permutation, static scales, the report).
The reservoir draws from its own seeded generator, so the sample depends only
on the seed and the stream of inputs this layer saw. For GPTQ the sum
X^T X over every row is kept too (C^2 float32, whatever the row count).
"""

from __future__ import annotations

from typing import Optional

import torch


class ActivationStats:
    """Running channel max, a seeded reservoir sample of the input rows and optionally X^T X of one layer."""

    def __init__(self, capacity: int, seed: int, hessian: bool = False):
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.channel_max: Optional[torch.Tensor] = None
        self.keeps_hessian = hessian
        self.hessian: Optional[torch.Tensor] = None  # sum of x^T x over all rows [C, C], float32
        self._rows: Optional[torch.Tensor] = None
        self.rows_seen = 0
        self.calls = 0

    @property
    def sample(self) -> Optional[torch.Tensor]:
        """The sampled rows [min(rows_seen, capacity), C] in the dtype they arrived in."""
        return None if self._rows is None else self._rows[: min(self.rows_seen, self.capacity)]

    def observe(self, x: torch.Tensor) -> None:
        # Statistics must stay ordinary tensors even when the model runs under
        # inference_mode, or a later update outside it would be refused.
        with torch.inference_mode(False), torch.no_grad():
            rows = x.detach().reshape(-1, x.shape[-1])
            self.calls += 1
            if rows.shape[0] == 0:
                return
            batch_max = rows.abs().amax(0).float()
            self.channel_max = batch_max if self.channel_max is None else torch.maximum(self.channel_max, batch_max)
            if self.keeps_hessian:
                if self.hessian is None:
                    self.hessian = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float32)
                self.hessian.addmm_(rows.T.float(), rows.float())
            if self._rows is None:
                self._rows = rows.new_empty(self.capacity, rows.shape[1])
            slots, picked = self._reservoir_slots(rows.shape[0])
            if len(slots):
                self._rows[slots.to(rows.device)] = rows[picked.to(rows.device)]
            self.rows_seen += rows.shape[0]

    def _reservoir_slots(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm R for a batch of n rows: (slot to write, row index), last writer wins per slot."""
        index = torch.arange(self.rows_seen, self.rows_seen + n, dtype=torch.float64)
        draws = torch.rand(n, generator=self.generator, dtype=torch.float64)
        slot = torch.where(index < self.capacity, index, torch.floor(draws * (index + 1))).long()
        keep = slot < self.capacity
        slot, row = slot[keep], torch.arange(n)[keep]
        slots, inverse = torch.unique(slot, return_inverse=True)
        last = torch.full_like(slots, -1).scatter_reduce(0, inverse, row, "amax")
        return slots, last
