"""Tokenizers behind one interface: `encode`, `decode`, `vocab_size`, special ids by name.

The byte-level tokenizer is the default: ids 0–255 are the UTF-8 bytes, followed by the special
tokens in `SPECIAL_TOKENS` order. Code never hard-codes a special id; it asks
`tokenizer.special_id("<fim_middle>")`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

EOT = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
SPECIAL_TOKENS = (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text` (no special tokens added)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens render as their names."""

    def special_id(self, name: str) -> int:
        """Id of a special token such as '<|endoftext|>'; KeyError naming it if absent."""


class ByteTokenizer:
    """UTF-8 bytes (0–255) plus the special tokens; decoding replaces invalid UTF-8."""

    def __init__(self, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self._special = {name: 256 + i for i, name in enumerate(special_tokens)}
        self._names = {i: name for name, i in self._special.items()}
        self.vocab_size = 256 + len(self._special)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in (int(t) for t in ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._names.get(i, f"<unk:{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"tokenizer has no special token {name!r}; it has {sorted(self._special)}")
        return self._special[name]

    def bytes_per_token(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of text each id stands for (special tokens count 0), for bits-per-byte."""
        return (np.asarray(ids) < 256).astype(np.int64)


def load_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (and `data.tokenizer_path`)."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}: expected 'byte'")
