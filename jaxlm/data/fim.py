"""Fill-in-the-middle (Bavarian et al. 2022), applied the way StarCoder's pipeline applies it.

A document is cut at two character positions drawn uniformly from [0, len] (then sorted) into
prefix / middle / suffix; each part is tokenized separately and the parts are reordered around
the sentinel tokens (ids read from the tokenizer):

    PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

How this fits concat-then-split packing (context-level FIM, as in StarCoder's Megatron
pipeline): documents are tokenized (+ <|endoftext|>) and packed into rows of seq_len + 1 tokens
first; then every *piece* of a document inside a row (a maximal run of one document's tokens;
a document longer than a row is cut into pieces at row boundaries) is, with probability
`fim_rate`, decoded back to text, FIM-transformed, and re-fitted to its original token count:
the end of the suffix is truncated when the transformed piece is longer, and the suffix is
padded with <fim_pad> when it is shorter. So rows keep their length, every FIM example sits inside one row with its prefix, suffix and
middle together, and the packer's checkpointable state is untouched. The trailing
<|endoftext|> of a piece stays after the transformed content, where it ends the middle (PSM) —
the stop signal used at inference.

Randomness is keyed by (seed, source, document index, epoch, the piece's token offset in its
document), so the transform of a given document in a given epoch does not depend on batch size,
worker count or resume point.

One deviation from StarCoder: when the suffix is too short to absorb the excess (the
sentinels alone add 3 tokens), StarCoder leaves the piece untransformed, which lowers the
realised FIM rate by the probability that the second cut lands within a few tokens of the end
(~15% for 50-token pieces). Here the rest of the excess comes off the *start* of the prefix — a
prefix that begins mid-document is what every packed row shows anyway — and only pieces whose
prefix and suffix together are that short stay as they were, so the realised rate is fim_rate
up to a fraction of a percent.

Warts: a piece cut at a row boundary may split a multi-byte character, which decodes as U+FFFD;
the transform then sees a slightly altered text (StarCoder has the same). Targets that are
<fim_pad> carry no loss (StarCoder trains on them; predicting where padding goes is noise).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlm.data.tokenizers import EOT, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, Tokenizer


@dataclasses.dataclass(frozen=True)
class FimIds:
    """The sentinel ids, looked up by name in the tokenizer."""

    prefix: int
    middle: int
    suffix: int
    pad: int
    eot: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "FimIds":
        return cls(tokenizer.special_id(FIM_PREFIX), tokenizer.special_id(FIM_MIDDLE),
                   tokenizer.special_id(FIM_SUFFIX), tokenizer.special_id(FIM_PAD),
                   tokenizer.special_id(EOT))


def cut_points(num_chars: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two character positions drawn uniformly from [0, num_chars], sorted."""
    lo, hi = sorted(int(x) for x in rng.integers(0, num_chars + 1, size=2))
    return lo, hi


def assemble(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray, ids: FimIds,
             spm: bool) -> tuple[np.ndarray, np.ndarray]:
    """PSM or SPM token sequence of the three tokenized parts, and a mask that is 1 exactly on
    the middle's tokens."""
    def const(value, n=1):
        return np.full(n, value, np.int32)

    if spm:
        parts = [const(ids.prefix), const(ids.suffix), suffix, const(ids.middle), prefix, middle]
        is_middle = [0, 0, 0, 0, 0, 1]
    else:
        parts = [const(ids.prefix), prefix, const(ids.suffix), suffix, const(ids.middle), middle]
        is_middle = [0, 0, 0, 0, 0, 1]
    tokens = np.concatenate([np.asarray(p, np.int32) for p in parts])
    mask = np.concatenate([np.full(len(p), m, np.int32) for p, m in zip(parts, is_middle)])
    return tokens, mask


def encode_parts(tokenizer: Tokenizer, parts: Sequence[str]) -> list[np.ndarray]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(parts)
    return [tokenizer.encode(p) for p in parts]


def fim_document(text: str, tokenizer: Tokenizer, rng: np.random.Generator, spm: bool,
                 ids: FimIds | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole document FIM-transformed, without any length constraint: (tokens, middle mask)."""
    ids = ids or FimIds.of(tokenizer)
    lo, hi = cut_points(len(text), rng)
    prefix, middle, suffix = encode_parts(tokenizer, [text[:lo], text[lo:hi], text[hi:]])
    return assemble(prefix, middle, suffix, ids, spm)


def undo_fim(tokens: Sequence[int], tokenizer: Tokenizer, ids: FimIds | None = None) -> str:
    """The document text of a PSM or SPM sequence (<fim_pad> dropped): the inverse of
    `fim_document`. ValueError if the sentinels are not in a FIM order."""
    ids = ids or FimIds.of(tokenizer)
    t = [int(x) for x in tokens if int(x) != ids.pad]
    if len(t) < 3 or t[0] != ids.prefix or t.count(ids.suffix) != 1 or t.count(ids.middle) != 1:
        raise ValueError("not a FIM sequence: expected <fim_prefix> first and one <fim_suffix> "
                         "and one <fim_middle>")
    s, m = t.index(ids.suffix), t.index(ids.middle)
    if s == 1:  # SPM: <PRE><SUF> suffix <MID> prefix+middle (tokenized separately: no boundary)
        suffix, prefix_middle = t[2:m], t[m + 1:]
        return tokenizer.decode(prefix_middle) + tokenizer.decode(suffix)
    if not s < m:
        raise ValueError("not a FIM sequence: <fim_suffix> after <fim_middle>")
    prefix, suffix, middle = t[1:s], t[s + 1:m], t[m + 1:]
    return tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix)


def fim_piece(piece: np.ndarray, tokenizer: Tokenizer, ids: FimIds, rng: np.random.Generator,
              fim_rate: float, spm_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """One document piece of a packed row (its tokens, maybe ending in <|endoftext|>) ->
    (tokens of the same length, middle mask). With probability `fim_rate` the content before
    the <|endoftext|> is FIM-transformed and re-fitted to its token count: excess tokens come
    off the end of the suffix, then the start of the prefix; a shortfall becomes <fim_pad> at
    the end of the suffix."""
    n = len(piece)
    unchanged = piece, np.zeros(n, np.int32)
    if rng.random() >= fim_rate:
        return unchanged
    spm = rng.random() < spm_rate
    ends_with_eot = n > 0 and piece[-1] == ids.eot
    content = piece[:-1] if ends_with_eot else piece
    text = tokenizer.decode(content)
    lo, hi = cut_points(len(text), rng)
    prefix, middle, suffix = encode_parts(tokenizer, [text[:lo], text[lo:hi], text[hi:]])
    excess = len(prefix) + len(middle) + len(suffix) + 3 - len(content)
    if excess > 0:
        if len(prefix) + len(suffix) <= excess:
            return unchanged
        from_suffix = min(excess, len(suffix))
        suffix = suffix[:len(suffix) - from_suffix]
        prefix = prefix[excess - from_suffix:]
    elif excess < 0:
        suffix = np.concatenate([suffix, np.full(-excess, ids.pad, np.int32)])
    tokens, mask = assemble(prefix, middle, suffix, ids, spm)
    if ends_with_eot:
        tokens = np.append(tokens, np.int32(ids.eot))
        mask = np.append(mask, np.int32(0))
    return tokens, mask


@dataclasses.dataclass(frozen=True)
class FimRows:
    """Packed row -> row with every document piece FIM-transformed with probability
    `fim_rate`; adds 'target_mask' (1 where a token counts as a target: everywhere but padding
    and <fim_pad>, or, with `middle_only`, only on middle tokens).

    The row carries the packer's per-token 'offset' (position of the token in its document)
    and per-piece meta features 'doc' and 'epoch' (see `pipeline`)."""

    tokenizer: Tokenizer
    fim_rate: float
    spm_rate: float
    seed: int
    source: int = 0
    middle_only: bool = False

    def __call__(self, row: dict) -> dict:
        ids = FimIds.of(self.tokenizer)
        tokens = row["tokens"].astype(np.int32, copy=True)
        segments = row["tokens_segment_ids"]
        middle = np.zeros(len(tokens), np.int32)
        bounds = np.flatnonzero(np.diff(segments)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(tokens)]])
        for start, end in zip(starts, ends):
            segment = int(segments[start])
            if segment == 0:  # padding at the end of a finite stream
                continue
            key = [self.seed, self.source, int(row["doc"][segment - 1]),
                   int(row["epoch"][segment - 1]), int(row["offset"][start])]
            new, mask = fim_piece(tokens[start:end], self.tokenizer, ids,
                                  np.random.default_rng(key), self.fim_rate, self.spm_rate)
            tokens[start:end] = new
            middle[start:end] = mask
        if self.middle_only:
            target_mask = middle.astype(np.float32)
        else:
            target_mask = ((segments > 0) & (tokens != ids.pad)).astype(np.float32)
        return {"tokens": tokens, "tokens_segment_ids": segments,
                "tokens_positions": row["tokens_positions"], "target_mask": target_mask}
