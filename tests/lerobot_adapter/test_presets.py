"""Scope presets on the module names of the installed lerobot, counted on models built by lerobot's own classes on
the meta device: pi0.5 and pi0 at full size (their inner ``PI05Pytorch``/``PI0Pytorch`` under ``model``, as the
policy nests them; the policy class itself refuses the meta device), and SmolVLA at SmolVLA's default depths
(``num_vlm_layers=16`` of SmolVLM2-500M's 32 text layers, an expert as deep, its 12 SigLIP layers) with tiny
widths, which do not change the counts. These are the counts in the README's LeRobot table."""

from __future__ import annotations

import pytest
import torch
from tiny_smolvla import build_vlm

from duquant import LayerSelection, select_layers
from policies.lerobot_policy import pi_scope_presets, smolvla_scope_presets

PI_COUNTS = {"llm": 126, "expert": 126, "llm+expert": 252, "default": 252, "expert_mlp": 54, "llm+expert_mlp": 108,
             "qkvo": 144, "vision": 162}  # fmt: skip
SMOLVLA_COUNTS = {"llm": 112, "expert": 112, "llm+expert": 224, "default": 224, "expert_mlp": 48,
                  "llm+expert_mlp": 96, "qkvo": 128, "vision": 72}  # fmt: skip
# Never quantized: output heads, the image projector/connector, pi0.5's adaptive-norm conditioning (.dense), and
# the small action/state/time projections around the expert.
NEVER = ("lm_head", ".dense", "multi_modal_projector", "connector", "action_in_proj", "action_out_proj",
         "state_proj", "time_mlp")  # fmt: skip


def full_size(kind: str) -> torch.nn.Module:
    from lerobot.policies.factory import make_policy_config
    from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
    from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch

    with torch.device("meta"):
        inner = {"pi05": PI05Pytorch, "pi0": PI0Pytorch}[kind](make_policy_config(kind, device="cpu"))
    return torch.nn.ModuleDict({"model": inner})


@pytest.fixture(scope="module")
def smolvla(tmp_path_factory):
    from lerobot.policies.factory import make_policy_config
    from lerobot.policies.smolvla.modeling_smolvla import VLAFlowMatching

    vlm = tmp_path_factory.mktemp("smolvlm_depths")
    build_vlm(vlm, text_layers=32, vision_layers=12)
    config = make_policy_config("smolvla", vlm_model_name=str(vlm), load_vlm_weights=False, device="cpu")
    with torch.device("meta"):
        return torch.nn.ModuleDict({"model": VLAFlowMatching(config)})


def selected(model: torch.nn.Module, presets: dict, preset: str) -> list[str]:
    return [name for name, _ in select_layers(model, LayerSelection(**presets[preset]))]


def linears(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def test_pi05_presets_on_lerobot_module_names():
    model, presets = full_size("pi05"), pi_scope_presets()
    assert len(linears(model)) == 458 and sum(name.endswith(".dense") for name in linears(model)) == 37
    counts = {preset: len(selected(model, presets, preset)) for preset in presets}
    assert counts == PI_COUNTS
    llm, expert, vision = (selected(model, presets, p) for p in ("llm", "expert", "vision"))
    assert "model.paligemma_with_expert.paligemma.model.language_model.layers.17.mlp.down_proj" in llm
    assert "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj" in expert
    assert "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc2" in vision
    assert sorted(selected(model, presets, "default")) == sorted(llm + expert)
    assert not any("self_attn" in name for name in selected(model, presets, "llm+expert_mlp"))
    every = {name for preset in presets for name in selected(model, presets, preset)}
    assert not any(word in name for name in every for word in NEVER)
    assert set(linears(model)) - every == {n for n in linears(model) if any(w in n for w in NEVER)}


def test_pi0_presets_on_lerobot_module_names():
    model, presets = full_size("pi0"), pi_scope_presets()
    assert len(linears(model)) == 422  # pi0's expert has plain RMSNorms: no .dense
    assert {preset: len(selected(model, presets, preset)) for preset in presets} == PI_COUNTS
    every = {name for preset in presets for name in selected(model, presets, preset)}
    assert set(linears(model)) - every == {n for n in linears(model) if any(w in n for w in NEVER)}


def test_smolvla_presets_on_lerobot_module_names(smolvla):
    presets = smolvla_scope_presets()
    assert {preset: len(selected(smolvla, presets, preset)) for preset in presets} == SMOLVLA_COUNTS
    every = {name for preset in presets for name in selected(smolvla, presets, preset)}
    assert not any(word in name for name in every for word in NEVER)
