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

import numpy as np
import torch

HUB_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # what real SmolVLA checkpoints name
IMAGE = 256  # lerobot's LIBERO datasets store 256 x 256 frames; the harness renders 224: the adapter resizes
CHUNK, N_ACTION_STEPS, LAYERS = 6, 4, 4
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>",
             "<end_of_utterance>", "<video>"]  # fmt: skip
_CORPUS = ["put the black bowl on the plate", "pick up the alphabet soup and place it in the basket",
           "open the top drawer and put the bowl inside", "turn on the stove"] * 10  # fmt: skip


def build_vlm(out: Path, tie_embeddings: bool) -> None:
    """Config, tokenizer and processor files of a tiny SmolVLM (64 px images, 64-wide Llama text model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )  # fmt: skip
    size = 64
    SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": size, "patch_size": 16},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS,
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
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    vlm, ckpt = root / "vlm", root / "smolvla_libero_tiny"
    build_vlm(vlm, tie_embeddings)
    camera = PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE))
    config = SmolVLAConfig(
        vlm_model_name=str(vlm), load_vlm_weights=False, num_vlm_layers=LAYERS, num_expert_layers=-1,
        self_attn_every_n_layers=2, expert_width_multiplier=0.75, resize_imgs_with_padding=(64, 64),
        chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, num_steps=2, max_state_dim=16, max_action_dim=16,
        tokenizer_max_length=24, device="cpu",
        input_features={"observation.images.image": camera, "observation.images.image2": camera,
                        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
    )  # fmt: skip
    torch.manual_seed(0)
    SmolVLAPolicy(config).save_pretrained(ckpt)
    stats = {key: {"mean": np.full(n, 0.1, np.float32), "std": np.full(n, 0.5, np.float32)}
             for key, n in (("observation.state", 8), ("action", 7))}  # fmt: skip
    for pipeline in make_smolvla_pre_post_processors(config, dataset_stats=stats):
        pipeline.save_pretrained(ckpt)
    _name_hub_vlm(ckpt)
    shutil.move(vlm, ckpt / "tokenizer")
    return ckpt


def _name_hub_vlm(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["vlm_model_name"] = HUB_VLM
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    for step in pre["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = HUB_VLM
    (ckpt / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
