"""Tokenizers behind one interface: `encode`, `decode`, `vocab_size`, special ids by name,
`bytes_per_token`.

Three backends (`data.tokenizer`):

* `byte`: ids 0–255 are the UTF-8 bytes, followed by the special tokens in `SPECIAL_TOKENS`
  order.
* `bpe`: a byte-level BPE trained here with Hugging Face `tokenizers` on the training split of
  `data.sources` (`train_bpe`); the five special tokens come first. `data.tokenizer_path` (or,
  when empty, `bpe_cache_path`: a file named by a hash of the fields it is trained from) is its
  cache: trained on first use when the file does not exist, loaded otherwise. Training is
  deterministic, so a deleted cache comes back identical.
* `file`: any existing `tokenizer.json`; it must carry `<|endoftext|>` (and the four FIM tokens
  when `data.fim_rate > 0`).

Code never hard-codes a special id; it asks `tokenizer.special_id("<fim_middle>")`. Text never
turns into a special token: a document that contains the string "<|endoftext|>" is encoded as
ordinary text, so only the pipeline places special tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Iterator, Protocol, Sequence

import numpy as np

EOT = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
SPECIAL_TOKENS = (EOT, *FIM_TOKENS)


class TokenizerError(ValueError):
    """An unusable tokenizer file; the message names the file (and the missing token)."""


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text` (no special tokens added)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens render as their names."""

    def special_id(self, name: str) -> int:
        """Id of a special token such as '<|endoftext|>'; KeyError naming it if absent."""

    def bytes_per_token(self, ids: np.ndarray) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (special tokens count 0), for bits-per-byte."""


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


def _uses_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json decodes with the GPT-2 byte-level alphabet (one char = one byte)."""
    def has(node):
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False
    return has(spec.get("decoder"))


def _token_bytes(token: str, byte_level: bool) -> int:
    """UTF-8 bytes one vocabulary entry stands for.

    Exact for byte-level BPE (every char of the GPT-2 alphabet is one byte) and for
    SentencePiece-style vocabularies (`▁` is a space, `<0xAB>` byte-fallback pieces are one
    byte). Other vocabularies (e.g. WordPiece `##` continuations) get the UTF-8 length of the
    token string, an approximation.
    """
    if byte_level:
        return len(token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1
    return len(token.replace("\u2581", " ").encode("utf-8"))


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (the trained BPE, or any file)."""

    def __init__(self, path: str, required: Sequence[str] = (EOT,)):
        import tokenizers  # HF tokenizers, a dependency of the `bpe` and `file` backends

        self.path = path
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
            tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # OSError, JSON errors, and tokenizers' own Exception type
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"tokenizer file {path}: cannot load it ({first})") from None
        tok.encode_special_tokens = True  # text never becomes a special token
        self._tok = tok
        self._special = {t.content: i for i, t in tok.get_added_tokens_decoder().items()
                         if t.special}
        for name in required:
            if name not in self._special:
                raise TokenizerError(f"tokenizer file {path}: no special token {name!r} "
                                     f"(required; it has {sorted(self._special) or 'none'})")
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        byte_level = _uses_byte_level(spec)
        table = np.zeros(self.vocab_size, np.int64)
        for token, i in vocab.items():
            if token not in self._special:
                table[i] = _token_bytes(token, byte_level)
        self._bytes = table

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of several texts in one call (the Rust side may use several threads)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"tokenizer {self.path} has no special token {name!r}; it has "
                           f"{sorted(self._special)}")
        return self._special[name]

    def bytes_per_token(self, ids: np.ndarray) -> np.ndarray:
        return self._bytes[np.asarray(ids)]


def _training_texts(data_cfg, max_chars: int) -> Iterator[str]:
    """Training-split documents of every source, shuffled with a fixed seed, each source
    contributing characters in proportion to its stage-0 mixture weight."""
    from jaxlm.data.sources import open_source, split_by_name

    weights = data_cfg.schedule()[0][1]
    for spec, weight in zip(data_cfg.sources, weights):
        if weight == 0:
            continue
        docs = split_by_name(open_source(spec), "train", data_cfg.heldout_fraction)
        budget = int(max_chars * weight)
        for i in np.random.default_rng(0).permutation(len(docs)):
            if budget <= 0:
                break
            text = docs[int(i)][:budget]
            budget -= len(text)
            yield text


def train_bpe(data_cfg, vocab_size: int, out_path: str, log=print) -> str:
    """Trains a byte-level BPE of `vocab_size` tokens (the five special tokens first, ids 0–4)
    on up to `data.bpe_train_chars` characters of the training split; writes `out_path`
    atomically and returns it. `experiments/launch.py --mode train_tokenizer` calls this."""
    from tokenizers import Tokenizer as HFCore, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"data.bpe_vocab_size={vocab_size}: expected >= "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + the special tokens)")
    start = time.perf_counter()
    tok = HFCore(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = list(_training_texts(data_cfg, data_cfg.bpe_train_chars))
    if not texts:
        raise TokenizerError(f"data.sources={data_cfg.sources}: no training text to train a BPE on")
    tok.train_from_iterator(texts, trainer, length=len(texts))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out_path)
    log(f"trained a {tok.get_vocab_size()}-token byte-level BPE on "
        f"{sum(map(len, texts)) / 1e6:.1f}M characters in {time.perf_counter() - start:.1f}s: "
        f"{out_path}")
    return out_path


def bpe_cache_path(data_cfg) -> str:
    """Where `data.tokenizer='bpe'` keeps its tokenizer when `data.tokenizer_path` is empty: a
    file named by a hash of everything the BPE is trained from (sources, their stage-0 weights,
    the held-out fraction, vocabulary size, character budget, Python version — the `stdlib`
    and `pydocs` corpora are the interpreter's), so a changed field trains a new one."""
    key = json.dumps([list(data_cfg.sources), list(data_cfg.schedule()[0][1]),
                      data_cfg.heldout_fraction, data_cfg.bpe_vocab_size,
                      data_cfg.bpe_train_chars, sys.version_info[:2]])
    root = os.environ.get("JAXLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxlm"))
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    return os.path.join(root, "tokenizers", f"bpe{data_cfg.bpe_vocab_size}-{digest}.json")


def load_tokenizer(data_cfg, log=print) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (and `data.tokenizer_path`)."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = data_cfg.tokenizer_path
    if data_cfg.tokenizer == "bpe":
        path = path or bpe_cache_path(data_cfg)
        if not os.path.exists(path):
            train_bpe(data_cfg, data_cfg.bpe_vocab_size, path, log=log)
        tok = HFTokenizer(path, required=SPECIAL_TOKENS)
        if tok.vocab_size > data_cfg.bpe_vocab_size:
            raise TokenizerError(f"tokenizer file {path} has {tok.vocab_size} tokens but "
                                 f"data.bpe_vocab_size={data_cfg.bpe_vocab_size}; delete it to "
                                 "retrain, or point data.tokenizer_path elsewhere")
        return tok
    if data_cfg.tokenizer == "file":
        required = SPECIAL_TOKENS if data_cfg.fim_rate > 0 else (EOT,)
        return HFTokenizer(path, required=required)
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}: expected 'byte', 'bpe' or 'file'")
