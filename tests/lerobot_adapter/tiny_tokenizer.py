"""A byte-level BPE tokenizer trained on a few LIBERO instructions: a stand-in for a hub tokenizer, built offline."""

from __future__ import annotations

CORPUS = ["put the black bowl on the plate", "pick up the alphabet soup and place it in the basket",
          "open the top drawer and put the bowl inside", "turn on the stove", "State: 0 1 2 3 4 5 6 7 8 9;",
          "Task: Action:"] * 10  # fmt: skip


def byte_bpe(specials: list[str], **tokens):
    """A fast tokenizer over every byte (so any prompt encodes) with ``specials`` first; ``tokens`` as
    ``PreTrainedTokenizerFast`` takes them (``pad_token=...``, ``extra_special_tokens=...``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)
