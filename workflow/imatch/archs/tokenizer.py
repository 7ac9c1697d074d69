"""A small byte-level BPE tokenizer for tiny backbones, trained offline on the task's own words.

Every answer symbol (a..o, 1..7) is a single token, as in the real tokenizers, so the closed-set
scoring of tiny and real models is the same code.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from imatch import demo_data, prompts
from imatch.levels import ELEMENT_DIGITS, OVERALL_LETTERS


def corpus() -> list[str]:
    words = [*demo_data.COLOURS, *demo_data.SHAPES, *demo_data.COUNT_WORDS.values(), *demo_data.RELATIONS.values(),
             *demo_data.STYLES, *(t for t, _ in demo_data.MEANINGLESS_PROMPTS), "A picture showing", "and", "real",
             "synthetic", "unknown", "object", "object-other", "color", "counting", "Counting", "spatial", "other"]
    lines = [prompts.OVERALL_QUESTION, prompts.ELEMENT_QUESTION, *prompts.METADATA_FIELDS.values(),
             "Prompt:", "Prompt type:", "Element:", "Element levels (1 = absent, 7 = clearly present):",
             " ".join(words), "0123456789 .,:;-()", *OVERALL_LETTERS, *ELEMENT_DIGITS]
    return lines * 20


def train_bpe(special_tokens: list[str], vocab_size: int = 800) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    for symbol in OVERALL_LETTERS + ELEMENT_DIGITS:
        ids = tok.encode(symbol).ids
        if len(ids) != 1:
            raise AssertionError(f"answer symbol {symbol!r} is not a single token: {ids}")
    return tok
