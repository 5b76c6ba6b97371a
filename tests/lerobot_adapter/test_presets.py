"""Scope presets of lerobot's pi0/pi0.5 on their real module names, without lerobot's pi0 classes (they need a
patched transformers that is not on PyPI): the transformer stacks at pi0.5's full size on the meta device, nested
as lerobot's PI05Policy nests them (``model.paligemma_with_expert.{paligemma,gemma_expert}``)."""

from __future__ import annotations

import pytest
import torch
from test_openpi_policy import pi05_stacks

from duquant import LayerSelection, select_layers
from policies.lerobot_policy import pi_scope_presets


@pytest.fixture(scope="module")
def pi05_modules():
    stacks = pi05_stacks()
    with torch.device("meta"):
        # pi0.5's patched Gemma modulates each expert norm with a linear ``dense`` (adaptive RMSNorm)
        for layer in stacks["gemma_expert"].model.layers:
            layer.input_layernorm.dense = torch.nn.Linear(1024, 3 * 1024)
        heads = {
            name: torch.nn.Linear(1024, 1024)
            for name in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")
        }
    model = torch.nn.ModuleDict({"paligemma_with_expert": stacks, **heads})
    return torch.nn.ModuleDict({"model": model})


def selected(model, preset: str) -> list[str]:
    return [name for name, _ in select_layers(model, LayerSelection(**pi_scope_presets()[preset]))]


def test_presets_select_lerobot_pi05_stacks_by_their_real_names(pi05_modules):
    llm, expert, vision = (selected(pi05_modules, p) for p in ("llm", "expert", "vision"))
    assert (len(llm), len(expert), len(vision)) == (18 * 7, 18 * 7, 27 * 6)
    assert "model.paligemma_with_expert.paligemma.model.language_model.layers.17.mlp.down_proj" in llm
    assert "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj" in expert
    assert "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc2" in vision
    assert sorted(selected(pi05_modules, "default")) == sorted(llm + expert)
    assert len(selected(pi05_modules, "qkvo")) == 2 * 18 * 4 and len(selected(pi05_modules, "expert_mlp")) == 18 * 3
    every = {name for preset in pi_scope_presets() for name in selected(pi05_modules, preset)}
    excluded = ("lm_head", ".dense", "multi_modal_projector", "action_in_proj", "action_out_proj", "time_mlp")
    assert not any(word in name for name in every for word in excluded)
