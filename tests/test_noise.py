"""Seeded policy noise: a function of (episode seed, step) alone, and the same under numpy 1.x and 2.x.

The expected values were computed under numpy 2; `make test` also runs this file in the numpy-1 reference venv
(.venv-numpy1), where ``np.uint64 >> int`` raises, so a regression there fails this test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.noise import episode_noise, noise_key

KEYS = {(7, 0): 8460147692890830636, (700001, 5): 4074662921489553933, (2**40 + 3, 215): 3899939548771802021}
NOISE = [0.5872635245323181, 0.048416558653116226, -0.7210715413093567, -0.321724534034729, -0.05797894299030304,
         1.7251547574996948, 2.6335220336914062, 0.42265355587005615, 0.6924622654914856, -0.4802316725254059,
         -0.6106210350990295, 0.4545100927352905]  # fmt: skip


@pytest.mark.parametrize("seed, step", list(KEYS))
def test_keys_are_fixed_63_bit_integers(seed, step):
    key = noise_key(np.int64(seed) if seed < 2**63 else seed, np.int64(step))  # numpy scalars, as batches carry them
    assert type(key) is int and key == KEYS[seed, step] and 0 <= key < 2**63


def test_noise_depends_on_seed_and_step_only():
    noise = episode_noise([700000, 700105], [0, 10], (2, 3))
    assert noise.shape == (2, 2, 3) and noise.dtype == torch.float32
    assert noise.flatten().tolist() == pytest.approx(NOISE, abs=0)
    # Another batch layout: the same rows, alone and in the other order.
    assert torch.equal(episode_noise([700105], [10], (2, 3))[0], noise[1])
    assert torch.equal(episode_noise([700105, 700000], [10, 0], (2, 3)), noise.flip(0))
    assert not torch.equal(episode_noise([700000], [5], (2, 3))[0], noise[0])

