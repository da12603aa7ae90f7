"""Text in, text out: a tokenizer in front of the cached `Generator`, for many prompts at once.

    complete = TextGenerator(generator, tokenizer, batch_size=16)
    texts = complete(["def add(a, b):\\n", "import os\\n"], max_new_tokens=64)

Prompts are encoded, sorted by length (so a batch pads little) and run `batch_size` at a time;
the last batch is filled up with repeats of one of its prompts so every batch has the same
number of rows (min(batch_size, number of prompts)) and batches of similar widths share one
compiled program. A prompt longer than the model can take with its new tokens keeps its last
tokens (what a left-to-right model needs); `stop_ids` end a row, and the stop token itself is
not part of the returned text. Ids past the tokenizer's vocabulary (a model vocabulary padded
larger) are never drawn.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxlm.data.tokenizers import EOT


class TextGenerator:
    def __init__(self, generator, tokenizer, *, batch_size: int = 16,
                 max_context: Optional[int] = None):
        """max_context: most positions a prompt and its new tokens may use (default
        model.max_seq_len; e.g. the training sequence length, past which RoPE positions were
        never seen)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        limit, limit_vocab = generator.cfg.max_seq_len, generator.cfg.vocab_size
        if max_context is not None and not 2 <= max_context <= limit:
            raise ValueError(f"max_context={max_context}: expected 2 .. model.max_seq_len="
                             f"{limit}")
        if tokenizer.vocab_size > generator.cfg.vocab_size:
            raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size}: larger than "
                             f"model.vocab_size={generator.cfg.vocab_size}")
        self.generator = generator
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_context = max_context or limit
        # a model's vocabulary padded past the tokenizer's: never draw ids it cannot decode
        self.vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < limit_vocab else 0

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Most prompt tokens that fit with `max_new_tokens` new ones."""
        budget = self.max_context - max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected < the context of "
                             f"{self.max_context} positions (room for a prompt token)")
        return budget

    def default_stops(self) -> list[int]:
        return [self.tokenizer.special_id(EOT)]

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                     stop_ids: Optional[Sequence[int]] = None, **sampling) -> list[list[int]]:
        """New ids per prompt (stop token removed); prompts are left-truncated to fit."""
        budget = self.prompt_budget(max_new_tokens)
        stops = self.default_stops() if stop_ids is None else list(stop_ids)
        prompts = [np.asarray(p, np.int32)[-budget:] for p in prompts]
        if any(p.size == 0 for p in prompts):
            raise ValueError("generate: a prompt encodes to no tokens; expected at least one")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        width = min(self.batch_size, len(prompts))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = [prompts[i] for i in rows]
            batch += [batch[-1]] * (width - len(batch))
            new = self.generator(batch, max_new_tokens, stop_ids=stops,
                                 vocab_limit=self.vocab_limit, **sampling)
            for i, ids in zip(rows, new):
                out[i] = ids[:-1] if ids and ids[-1] in stops else ids
        return out

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, *,
                 stop_ids: Optional[Sequence[int]] = None, **sampling) -> list[str]:
        """Completions of `prompts` (text after each prompt, without its stop token)."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        new = self.generate_ids(ids, max_new_tokens, stop_ids=stop_ids, **sampling)
        return [self.tokenizer.decode(x) for x in new]
