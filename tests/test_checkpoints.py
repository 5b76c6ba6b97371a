"""A checkpoint that does not fit its model is summed up in one line, from the real loaders' errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model

from policies.checkpoints import state_dict_mismatch


def model(width: int, depth: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(depth)))


def test_resized_missing_and_unexpected_tensors_are_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(model(8, 6), str(path))
    with pytest.raises(RuntimeError) as resized:
        load_model(model(4, 6), str(path))  # safetensors' strict loader, as openpi loads its checkpoints
    line = state_dict_mismatch(resized.value)
    assert line.startswith("12 resized: 0.weight (file [8, 8], model [4, 4]), 0.bias (file [8], model [4])")
    assert line.endswith("and 9 more") and "\n" not in line

    with pytest.raises(RuntimeError) as keys:
        load_model(model(8, 4), str(path))
    assert state_dict_mismatch(keys.value) == "4 unexpected: 4.bias, 4.weight, 5.bias and 1 more"
    with pytest.raises(RuntimeError) as keys:
        model(8, 7).load_state_dict(model(8, 6).state_dict())  # torch's own strict loader
    assert state_dict_mismatch(keys.value) == "2 missing: 6.weight, 6.bias"


def test_other_errors_are_left_alone():
    assert state_dict_mismatch(RuntimeError("CUDA out of memory")) is None
