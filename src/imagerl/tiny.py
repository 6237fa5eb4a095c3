"""Shared pieces for tiny random-weight models of the real architecture classes, built offline.

Each policy family builds its own tiny model in its adapter file (`build_tiny_*`); what they share lives
here: an offline byte-level BPE tokenizer (no hub), trained in milliseconds on a small built-in corpus.
Byte-level BPE has the whole byte alphabet, so any prompt tokenizes without <unk>.
"""

from __future__ import annotations

import functools
from typing import Sequence

COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange", "cyan", "magenta")
SHAPES = ("square", "circle", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom", "center")

_CORPUS_EXTRA = (
    "a photo of a cat", "a sign that says hello", "a dog on the beach", "a bowl of fruit",
    "make the sky purple", "add a hat to the person", "remove the car", "an image of",
    "Is the image consistent with the prompt? Answer yes or no.", "yes", "no", "Yes", "No",
    "Rate the image from 0 to 10", "score", "reasoning", "<CoT>", "</CoT>", "<Re_edit>", "</Re_edit>",
)


def _corpus() -> list[str]:
    lines = []
    for c in COLORS:
        for s in SHAPES:
            for p in POSITIONS:
                lines.append(f"a {c} {s} on the {p}")
    lines.extend(_CORPUS_EXTRA)
    lines.extend(str(i) for i in range(100))
    return lines


@functools.lru_cache(maxsize=16)
def build_tokenizer(
    vocab_size: int = 512,
    specials: Sequence[str] = ("<pad>", "<bos>", "<eos>", "<unk>"),
    model_max_length: int = 512,
    append_eos: bool = False,
):
    """A `PreTrainedTokenizerFast` trained offline: ids 0..len(specials)-1 are the specials in order.

    `append_eos` adds `<bos> ... <eos>` post-processing (CLIP text encoders pool at the first EOS).
    Cached: the same arguments give the same (deterministic) tokenizer object; callers must not mutate it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = tuple(specials)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", specials.index("<bos>")), ("<eos>", specials.index("<eos>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
