"""Block rotations: orthogonal b x b matrices applied to every block of b channels.

A rotation R leaves a linear layer's output unchanged when the weight is
rotated with it ((x R)(w R)^T = x w^T) but reshapes the activation
distribution. DuQuant builds R greedily so that channel outliers are spread
over their block; ``hadamard`` and ``svd`` are data-free and data-driven
alternatives kept for ablations. Matrices are built in float64.

Tensors of rotations have shape [G, b, b]: G == 1 means one matrix shared by
all blocks (as the official DuQuant code does), G == K one per block.
"""

from __future__ import annotations

import functools
import math

import torch


def uniform_rotation(b: int) -> torch.Tensor:
    """A symmetric orthogonal matrix whose first row is 1/sqrt(b) everywhere.

    It is the Householder reflection swapping e_0 and the uniform unit vector,
    so x @ U moves the value of channel 0 evenly onto all b channels.
    """
    u = torch.full((b,), 1.0 / math.sqrt(b), dtype=torch.float64)
    v = -u
    v[0] += 1.0
    norm = v.dot(v)
    if norm < 1e-24:  # b == 1: e_0 already is the uniform vector
        return torch.eye(b, dtype=torch.float64)
    return torch.eye(b, dtype=torch.float64) - torch.outer(v, v) * (2.0 / norm)


def random_orthogonal(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Haar-random n x n orthogonal matrices (QR of Gaussian matrices, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(count, n, n, dtype=torch.float64, generator=generator))
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(signs == 0, 1.0, signs)[:, None, :]


def hadamard(b: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of order b (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != b:
        raise ValueError(f"Hadamard rotation needs a power-of-two block size, got {b}")
    return h / math.sqrt(b)


def svd_rotation(x: torch.Tensor) -> torch.Tensor:
    """Right singular vectors of each group's rows, strongest first ([G, R, b] -> [G, b, b])."""
    gram = x.double().transpose(1, 2) @ x.double()
    _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1)


@functools.lru_cache(maxsize=8)
def spread_steps(b: int, steps: int, seed: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The greedy's step matrices U diag(1, Q'_t), t < steps ([steps, b, b], float64; never mutated).

    Drawn on the CPU so every device gets the same matrices. Drawing Haar
    matrices costs more than a small layer's whole search, and a model's
    layers all share one block size, so the sequence is memoised per device.
    """
    spreads = uniform_rotation(b).expand(steps, b, b).clone()
    spreads[:, :, 1:] = spreads[:, :, 1:] @ random_orthogonal(b - 1, steps, torch.Generator().manual_seed(seed))
    return spreads.to(device)


def _peak(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the largest |value| and the channel (column) it sits in."""
    column_peak = torch.maximum(x.amax(1), -x.amin(1))
    return column_peak.max(-1)


def _rows_that_can_peak(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1)
    floor = norms.amax(1, keepdim=True) * (1.0 - 1e-4) / math.sqrt(x.shape[-1])
    return x[:, (norms >= floor).any(0)]


def _swap_to_front(matrix: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """P_c M P_c for each channel c, with P_c the transposition of 0 and c: [b, b] -> [G, b, b]."""
    b = matrix.shape[-1]
    order = torch.arange(b, device=channels.device).repeat(channels.shape[0], 1)
    order[:, 0] = channels
    order.scatter_(1, channels[:, None], 0)
    rows = matrix[order]
    return rows.gather(2, order[:, None, :].expand_as(rows))


def greedy_rotation(x: torch.Tensor, steps: int, seed: int, patience: int = 0) -> torch.Tensor:
    """DuQuant's greedy rotation for the rows of ``x`` ([G, R, b] -> [G, b, b], float64).

    Each step finds the largest |activation|, takes the channel it sits in and
    rotates with P_c U diag(1, Q') P_c: U spreads channel c over the block and
    the random orthogonal Q' keeps successive steps from cycling. The product
    of the prefix of steps with the smallest peak is returned, which may be
    the identity when no step helps. With ``patience`` > 0 the search stops
    once that many steps in a row lowered no group's peak: after the first
    few steps have spread the real outliers, later ones are a random walk
    whose rare new minima are only slightly lower.

    Rows with a norm below max_norm / sqrt(b) are dropped first: rotations
    keep norms, and the largest row always has an entry of at least
    max_norm / sqrt(b), so such rows can never hold the peak. The search runs
    in float32 and only remembers each step's channel; the float64 product of
    the best prefix is built once at the end.
    """
    groups, _, b = x.shape
    eye = torch.eye(b, dtype=torch.float64, device=x.device).expand(groups, b, b)
    if b == 1 or steps == 0:
        return eye.clone()
    spreads = spread_steps(b, steps, seed, x.device)
    current = _rows_that_can_peak(x.float())
    best_peak, channel = _peak(current)
    best_length = torch.zeros(groups, dtype=torch.long, device=x.device)
    channels = []
    stale = 0
    for t, spread in enumerate(spreads.float()):
        channels.append(channel)
        current = current @ _swap_to_front(spread, channel)
        peak, channel = _peak(current)
        better = peak < best_peak
        best_length = torch.where(better, t + 1, best_length)
        best_peak = torch.minimum(peak, best_peak)
        if patience:
            stale = 0 if bool(better.any()) else stale + 1
            if stale >= patience:
                break
    total, best = eye.clone(), eye.clone()
    for t in range(int(best_length.max())):
        total = total @ _swap_to_front(spreads[t], channels[t])
        best = torch.where((best_length == t + 1)[:, None, None], total, best)
    return best


def block_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Apply a block-diagonal rotation to the last dim of ``x`` [N, K*b] in one matmul."""
    groups, b, _ = rotation.shape
    rows, width = x.shape
    if groups == 1:
        return (x.reshape(-1, b) @ rotation[0]).reshape(rows, width)
    blocks = x.reshape(rows, groups, b).transpose(0, 1)
    return torch.bmm(blocks, rotation).transpose(0, 1).reshape(rows, width)
