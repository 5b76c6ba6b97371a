"""Tiny random pi0 / pi0.5 checkpoints built with lerobot's own classes: test scaffolding, never product code.

lerobot hard-codes pi0/pi0.5's sizes: ``get_gemma_config`` maps the only variant names it accepts
(``gemma_2b``, ``gemma_300m``) to fixed widths, and the PaliGemma vision tower is SigLIP So400m with a
2048-wide projector, so the smallest pi0.5 it builds has ~4.1B parameters. ``tiny_sizes`` replaces those two
things in lerobot's pi0 and pi0.5 modeling modules (Gemma ``width`` wide and 2 layers deep, a 1-layer 32-wide
SigLIP), so lerobot's real classes build, save and load a model of ~25M parameters (mostly PaliGemma's
257152-token embeddings). It must be active wherever a tiny checkpoint is built or loaded: in this process
(a context manager) and in runner subprocesses (``sitecustomize.py`` here applies it when ``TINY_PI_WIDTH`` is
set). A checkpoint loaded at another width meets lerobot's own size-mismatch path.

pi0/pi0.5's processor hard-codes the hub tokenizer ``google/paligemma-3b-pt-224``: the build hands it a local
tokenizer, then the checkpoint is laid out as one from the hub (the saved preprocessor names the hub tokenizer,
the local one sits in ``tokenizer/``).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from libero_layout import libero_features, libero_stats, name_hub_tokenizer
from tiny_tokenizer import byte_bpe

HUB_TOKENIZER = "google/paligemma-3b-pt-224"  # what lerobot's pi0/pi0.5 processors name
WIDTH, CHUNK, N_ACTION_STEPS, LAYERS = 64, 6, 4, 2
WIDTH_ENV = "TINY_PI_WIDTH"


def _modules():
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    return modeling_pi0, modeling_pi05


@contextmanager
def tiny_sizes(width: int = WIDTH):
    """lerobot's pi0/pi0.5 at tiny sizes: PaliGemma's Gemma ``width`` wide, the expert half that, SigLIP 32."""
    saved = _patch(width)
    try:
        yield
    finally:
        for module, gemma, paligemma in saved:
            module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma = gemma, paligemma


def apply_from_env() -> None:
    """For runner subprocesses: tiny sizes for the whole process when ``TINY_PI_WIDTH`` is set."""
    if os.environ.get(WIDTH_ENV):
        _patch(int(os.environ[WIDTH_ENV]))


def _patch(width: int) -> list:
    saved = [(module, module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma)
             for module in _modules()]  # fmt: skip
    for module, _, paligemma in saved:
        module.get_gemma_config = _gemma_config(module.GemmaConfig, width)
        module.PaliGemmaForConditionalGenerationWithPiGemma = _small_vision(paligemma)
    return saved


def _gemma_config(gemma_config, width: int):
    def get_gemma_config(variant: str):
        w = {"gemma_2b": width, "gemma_300m": width // 2}[variant]  # the 2B backbone twice the expert's width
        return gemma_config(width=w, depth=LAYERS, mlp_dim=2 * w, num_heads=2, num_kv_heads=1, head_dim=16)

    return get_gemma_config


def _small_vision(paligemma):
    def build(config):
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 32, 64, 1
        vision.num_attention_heads, vision.patch_size = 2, 16
        vision.projection_dim = config.text_config.hidden_size  # the projector feeds the Gemma backbone
        return paligemma(config=config)

    return build


def build_checkpoint(root: Path, kind: str, width: int = WIDTH) -> Path:
    """Save a random lerobot ``kind`` (``pi05`` or ``pi0``) with LIBERO's features and stats; returns its directory."""
    from lerobot.policies.factory import get_policy_class, make_policy_config
    from lerobot.policies.pi0 import processor_pi0
    from lerobot.policies.pi05 import processor_pi05

    tokenizer, ckpt = root / f"{kind}_tokenizer", root / f"{kind}_libero_tiny"
    byte_bpe(["<pad>", "<eos>", "<bos>", "<unk>"], pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
             unk_token="<unk>").save_pretrained(tokenizer)  # fmt: skip
    inputs, outputs = libero_features()
    config = make_policy_config(
        kind, image_resolution=(64, 64), chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, num_inference_steps=2,
        max_state_dim=8, max_action_dim=8, tokenizer_max_length=48, device="cpu", input_features=inputs,
        output_features=outputs,
    )  # fmt: skip
    processors = {"pi05": processor_pi05, "pi0": processor_pi0}[kind]
    with tiny_sizes(width), _local_tokenizer(processors, tokenizer):
        torch.manual_seed(0)
        get_policy_class(kind)(config).save_pretrained(ckpt)
        make = getattr(processors, f"make_{kind}_pre_post_processors")
        for pipeline in make(config, dataset_stats=libero_stats()):
            pipeline.save_pretrained(ckpt)
    name_hub_tokenizer(ckpt, HUB_TOKENIZER)
    shutil.move(tokenizer, ckpt / "tokenizer")
    return ckpt


@contextmanager
def _local_tokenizer(processors, tokenizer: Path):
    """The processor module's ``TokenizerProcessorStep`` reading ``tokenizer`` instead of the hub name."""
    step = processors.TokenizerProcessorStep
    processors.TokenizerProcessorStep = lambda **kwargs: step(**{**kwargs, "tokenizer_name": str(tokenizer)})
    try:
        yield
    finally:
        processors.TokenizerProcessorStep = step
