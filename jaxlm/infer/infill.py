"""Fill-in-the-middle generation with the PSM format the FIM data pipeline trains on.

    infill = Infiller(TextGenerator(generator, tokenizer))
    middle = infill("def add(a, b):\\n    ", "\\n\\nprint(add(1, 2))\\n")
    middles = infill.batch([(prefix, suffix), ...])

The prompt is `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>` (each part tokenized on
its own, exactly as `jaxlm.data.fim.assemble` builds PSM training examples, the middle left
empty), and the model writes the middle. Generation stops at <|endoftext|> (which ends the
middle in training) or at any FIM sentinel (a model that starts a new FIM block has finished
the middle); the stop token is not part of the returned middle. When prefix and suffix do not
fit in the model's window with `max_new_tokens`, the prefix keeps its end and the suffix its
start (the text nearest the hole), each at least half the room if it needs it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlm.data.fim import FimIds, assemble, encode_parts
from jaxlm.data.tokenizers import EOT, FIM_TOKENS


def fim_ids(tokenizer) -> FimIds:
    try:
        return FimIds.of(tokenizer)
    except KeyError:
        names = ", ".join(repr(n) for n in (EOT,) + FIM_TOKENS)
        raise ValueError(f"infill: the tokenizer lacks a FIM special token: expected all of "
                         f"{names} (train with data.tokenizer='bpe' or 'byte')") from None


def fit_parts(prefix_ids: np.ndarray, suffix_ids: np.ndarray, room: int):
    """Prefix tail and suffix head with at most `room` tokens together (the shorter part whole
    if it fits in half, the other one takes the rest)."""
    if len(prefix_ids) + len(suffix_ids) <= room:
        return prefix_ids, suffix_ids
    half = room // 2
    if len(suffix_ids) <= half:
        keep_prefix = room - len(suffix_ids)
    elif len(prefix_ids) <= room - half:
        keep_prefix = len(prefix_ids)
    else:
        keep_prefix = room - half
    keep_suffix = room - keep_prefix
    return prefix_ids[len(prefix_ids) - keep_prefix:], suffix_ids[:keep_suffix]


class Infiller:
    def __init__(self, text_generator, *, max_new_tokens: int = 64):
        self.text = text_generator
        self.ids = fim_ids(text_generator.tokenizer)
        self.max_new_tokens = max_new_tokens
        self.room = text_generator.prompt_budget(max_new_tokens) - 3  # the three sentinels
        if self.room < 0:
            raise ValueError(f"infill: max_new_tokens={max_new_tokens} leaves no room for the "
                             f"three FIM sentinels in a context of {self.text.max_context}")

    @property
    def stop_ids(self) -> list[int]:
        i = self.ids
        return [i.eot, i.prefix, i.middle, i.suffix, i.pad]

    def prompt_ids(self, prefix: str, suffix: str) -> np.ndarray:
        prefix_ids, suffix_ids = encode_parts(self.text.tokenizer, [prefix, suffix])
        prefix_ids, suffix_ids = fit_parts(prefix_ids, suffix_ids, self.room)
        tokens, _ = assemble(prefix_ids, np.zeros(0, np.int32), suffix_ids, self.ids, spm=False)
        return tokens

    def batch(self, pairs: Sequence[tuple[str, str]], **sampling) -> list[str]:
        """Middles for (prefix, suffix) pairs, generated in batches."""
        prompts = [self.prompt_ids(p, s) for p, s in pairs]
        new = self.text.generate_ids(prompts, self.max_new_tokens, stop_ids=self.stop_ids,
                                     **sampling)
        return [self.text.tokenizer.decode(x) for x in new]

    def __call__(self, prefix: str, suffix: str, **sampling) -> str:
        return self.batch([(prefix, suffix)], **sampling)[0]
