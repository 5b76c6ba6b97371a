"""A tiny random SmolVLA checkpoint, built offline with lerobot's and transformers' own classes in a few seconds.

SmolVLA reads its VLM's config and processor (not its weights: ``load_vlm_weights=False``) from
``vlm_model_name``. Here that is a SmolVLM of a few layers with a byte-level BPE tokenizer trained on a handful
of sentences, carrying the special tokens SmolVLM's processor looks up. After saving, the checkpoint is laid out
as one downloaded from the hub: its config names the hub VLM, and the local VLM files sit in ``tokenizer/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from libero_layout import libero_features, libero_stats, name_hub_tokenizer
from tiny_tokenizer import byte_bpe

HUB_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # what real SmolVLA checkpoints name
CHUNK, N_ACTION_STEPS, LAYERS = 6, 4, 4
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>",
             "<end_of_utterance>", "<video>"]  # fmt: skip


def build_vlm(out: Path, tie_embeddings: bool = False, text_layers: int = LAYERS, vision_layers: int = 2) -> None:
    """Config, tokenizer and processor files of a tiny SmolVLM (64 px images, 64-wide Llama text model)."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tokenizer = byte_bpe(
        _SPECIALS, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )  # fmt: skip
    size = 64
    SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": vision_layers,
                       "num_attention_heads": 2, "image_size": size, "patch_size": 16},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id,
                     "tie_word_embeddings": tie_embeddings},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    ).save_pretrained(out)  # fmt: skip
    images = SmolVLMImageProcessor(do_resize=True, size={"longest_edge": size}, do_image_splitting=False,
                                   max_image_size={"longest_edge": size})  # fmt: skip
    SmolVLMProcessor(image_processor=images, tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=(size // 16) ** 2 // 4).save_pretrained(out)  # fmt: skip


def build_checkpoint(root: Path, tie_embeddings: bool = False) -> Path:
    """Save a random SmolVLA with LIBERO's features and normalization stats; returns the checkpoint directory.

    ``tie_embeddings`` ties the VLM's lm_head to its token embeddings: safetensors then stores the tensor once.
    """
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    vlm, ckpt = root / "vlm", root / "smolvla_libero_tiny"
    build_vlm(vlm, tie_embeddings)
    inputs, outputs = libero_features()
    config = SmolVLAConfig(
        vlm_model_name=str(vlm), load_vlm_weights=False, num_vlm_layers=LAYERS, num_expert_layers=-1,
        self_attn_every_n_layers=2, expert_width_multiplier=0.75, resize_imgs_with_padding=(64, 64),
        chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, num_steps=2, max_state_dim=16, max_action_dim=16,
        tokenizer_max_length=24, device="cpu", input_features=inputs, output_features=outputs,
    )  # fmt: skip
    torch.manual_seed(0)
    SmolVLAPolicy(config).save_pretrained(ckpt)
    for pipeline in make_smolvla_pre_post_processors(config, dataset_stats=libero_stats()):
        pipeline.save_pretrained(ckpt)
    config_path = ckpt / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vlm_model_name": HUB_VLM}, indent=2))
    name_hub_tokenizer(ckpt, HUB_VLM)
    shutil.move(vlm, ckpt / "tokenizer")
    return ckpt
