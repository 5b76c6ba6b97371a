"""openpi policies: the one-line install hint without openpi, and the scope presets on full-size pi0.5 modules."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duquant import LayerSelection, select_layers
from policies import make_policy
from policies.openpi_policy import OpenpiUnavailable, compile_mode, scope_presets

ROOT = Path(__file__).resolve().parents[1]


def openpi_installed() -> bool:
    try:
        importlib.import_module("openpi.policies.policy_config")
    except ImportError:
        return False
    return True


@pytest.mark.skipif(openpi_installed(), reason="openpi is installed here")
@pytest.mark.parametrize("name", ["openpi_pi05", "openpi_pi0"])
def test_without_openpi_one_line_says_how_to_install(name, tmp_path):
    with pytest.raises(OpenpiUnavailable) as caught:
        make_policy(name, str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and f"policy {name!r} needs openpi" in message
    assert "github.com/Physical-Intelligence/openpi" in message and "policy=remote" in message


@pytest.mark.skipif(openpi_installed(), reason="openpi is installed here")
def test_cli_prints_the_hint_as_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "examples/libero/main.py"), "policy=openpi_pi05"],
                            check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: policy 'openpi_pi05' needs openpi, which is not on PyPI")


def pi05_stacks() -> torch.nn.ModuleDict:
    """pi0.5's transformer stacks at full size on the meta device (no memory), named as openpi names them.

    openpi builds ``paligemma`` (PaliGemma 3B: Gemma 2B + SigLIP So400m) and ``gemma_expert`` (Gemma 300M)
    from these transformers classes and sizes, under ``paligemma_with_expert``.
    """
    from transformers import GemmaConfig, GemmaForCausalLM, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    vlm = PaliGemmaConfig()
    text = vlm.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 2048, 16384, 18
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 8, 1, 256
    vlm.vision_config.intermediate_size, vlm.vision_config.projection_dim = 4304, 2048
    expert = GemmaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=256, vocab_size=257152)  # fmt: skip
    with torch.device("meta"):
        return torch.nn.ModuleDict(
            {"paligemma": PaliGemmaForConditionalGeneration(vlm), "gemma_expert": GemmaForCausalLM(expert)}
        )


@pytest.fixture(scope="module")
def pi05_modules():
    """As openpi's PI0Pytorch nests the stacks."""
    return torch.nn.ModuleDict({"paligemma_with_expert": pi05_stacks()})


def selected(model, preset: str) -> list[str]:
    return [name for name, _ in select_layers(model, LayerSelection(**scope_presets()[preset]))]


def test_presets_select_pi05_stacks_by_their_real_names(pi05_modules):
    llm, expert, vision = (
        selected(pi05_modules, "llm"),
        selected(pi05_modules, "expert"),
        selected(pi05_modules, "vision"),
    )
    assert (len(llm), len(expert), len(vision)) == (18 * 7, 18 * 7, 27 * 6)
    assert "paligemma_with_expert.paligemma.model.language_model.layers.17.mlp.down_proj" in llm
    assert "paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj" in expert
    assert all(".vision_tower." in name and name.endswith(("_proj", "fc1", "fc2")) for name in vision)
    assert sorted(selected(pi05_modules, "default")) == sorted(llm + expert)
    assert len(selected(pi05_modules, "qkvo")) == 2 * 18 * 4 and len(selected(pi05_modules, "expert_mlp")) == 18 * 3
    every = {name for preset in scope_presets() for name in selected(pi05_modules, preset)}
    assert not any(name.endswith("lm_head") or "multi_modal_projector" in name for name in every)
    expert_layer = dict(pi05_modules.named_modules())["paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj"]
    assert (expert_layer.in_features, expert_layer.out_features) == (1024, 4096)


def test_a_missing_module_inside_openpi_is_named(tmp_path):
    """openpi present but one of its own imports missing: the error names that module, not 'needs openpi'."""
    package = tmp_path / "openpi"
    (package / "policies").mkdir(parents=True)
    (package / "training").mkdir()
    for init in (package, package / "policies", package / "training"):
        (init / "__init__.py").write_text("")
    (package / "policies" / "policy_config.py").write_text("import lerobot_absent_dependency\n")
    (package / "training" / "config.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "examples/libero/main.py"), "policy=openpi_pi05",
                             f"policy.path={tmp_path}"], check=False, capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "No module named 'lerobot_absent_dependency'" in result.stderr
    assert "openpi is installed" in result.stderr and "needs openpi, which" not in result.stderr


def test_compile_defaults_to_none_on_cpu_and_refuses_unknown_modes():
    assert compile_mode(None, "cpu") == compile_mode("auto", "cpu") == "none"
    assert compile_mode(None, "cuda:0") == "default" and compile_mode("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(ValueError, match="policy.compile='fast' is not one of auto, none, default"):
        compile_mode("fast", "cpu")
