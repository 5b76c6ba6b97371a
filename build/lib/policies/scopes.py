"""Quantization scope presets for policies laid out like pi0: a VLM backbone and an action expert, each a
stack of transformer layers with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` linears."""

from __future__ import annotations

ATTN, MLP = r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"


def pi0_presets(llm_layer: str, expert_layer: str, exclude: list[str], **extra: list[str]) -> dict[str, dict]:
    """Fresh presets ``llm``, ``expert``, ``llm+expert`` (also ``default``), ``expert_mlp``, ``llm+expert_mlp``,
    ``qkvo``, plus ``extra``.

    ``llm+expert_mlp`` keeps attention in floating point: on pi0.5, plain DuQuant W4A8 on every backbone and
    expert linear cost 97.1% -> 76.3% on LIBERO (QuantVLA, arXiv 2602.20309), and VLAQuantBench found the
    attention (and adaptive-norm) layers the ones that break at W4A4.

    ``llm_layer`` and ``expert_layer`` are regexes ending at one layer's dot (e.g. ``...layers\\.\\d+\\.``);
    ``extra`` maps more preset names to their include regexes. Every preset gets ``exclude``.
    """

    def preset(*include: str) -> dict[str, list[str]]:
        return {"include": list(include), "exclude": list(exclude)}

    both = (llm_layer + ATTN, llm_layer + MLP, expert_layer + ATTN, expert_layer + MLP)
    presets = {
        "llm": preset(llm_layer + ATTN, llm_layer + MLP),
        "expert": preset(expert_layer + ATTN, expert_layer + MLP),
        "llm+expert": preset(*both),
        "default": preset(*both),
        "expert_mlp": preset(expert_layer + MLP),
        "llm+expert_mlp": preset(llm_layer + MLP, expert_layer + MLP),
        "qkvo": preset(llm_layer + ATTN, expert_layer + ATTN),
    }
    presets.update({name: preset(*include) for name, include in extra.items()})
    return presets
