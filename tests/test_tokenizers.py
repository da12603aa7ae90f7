"""Tokenizers: the trained byte-level BPE, any tokenizer.json, dispatch, special ids by name,
bytes per token, one-line errors for bad tokenizer files."""

import json
import os
import sysconfig

import numpy as np
import pytest

from jaxlm.data.config import DataConfig
from jaxlm.data.tokenizers import (EOT, FIM_PAD, SPECIAL_TOKENS, ByteTokenizer, HFTokenizer,
                                   TokenizerError, bpe_cache_path, load_tokenizer, train_bpe)

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")


def random_unicode(rng: np.random.Generator, n: int) -> str:
    """Code points from every plane that UTF-8 can encode (no surrogates), mixed with ASCII,
    whitespace runs and the special tokens' own spellings."""
    pools = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x800), (0x800, 0xD800), (0xE000, 0x10000),
             (0x10000, 0x110000)]
    out = []
    for _ in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            out.append(SPECIAL_TOKENS[rng.integers(0, len(SPECIAL_TOKENS))])
        elif kind == 1:
            out.append(" " * int(rng.integers(1, 6)))
        else:
            lo, hi = pools[int(rng.integers(0, len(pools)))]
            out.append(chr(int(rng.integers(lo, hi))))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
    cfg = DataConfig(sources=(f"text:{STDLIB_JSON}",), tokenizer="bpe", tokenizer_path=path,
                     bpe_vocab_size=700, heldout_fraction=0.0)
    logs = []
    tok = load_tokenizer(cfg, log=logs.append)  # the file does not exist: trained on first use
    assert os.path.exists(path) and "700-token byte-level BPE" in logs[0]
    return tok


def test_bpe_round_trips_arbitrary_unicode(bpe):
    rng = np.random.default_rng(0)
    for length in (0, 1, 2, 17, 300):
        for _ in range(20):
            text = random_unicode(rng, length)
            ids = bpe.encode(text)
            assert ids.dtype == np.int32
            assert bpe.decode(ids) == text
            # text never becomes a special token, even when it spells one
            assert not set(ids.tolist()) & {bpe.special_id(n) for n in SPECIAL_TOKENS}
            # bytes per token add up to the UTF-8 length (bits-per-byte needs it exact)
            assert int(bpe.bytes_per_token(ids).sum()) == len(text.encode("utf-8"))


def test_bpe_vocabulary_and_special_ids_come_from_the_tokenizer(bpe):
    assert bpe.vocab_size == 700
    spec = json.load(open(bpe.path, encoding="utf-8"))
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert {name: bpe.special_id(name) for name in SPECIAL_TOKENS} == added
    assert sorted(added.values()) == [0, 1, 2, 3, 4]  # trained with the specials first
    assert bpe.decode([bpe.special_id(EOT), *bpe.encode("x = 1")]) == EOT + "x = 1"
    assert bpe.bytes_per_token(np.array([bpe.special_id(n) for n in SPECIAL_TOKENS])).sum() == 0
    # merges learned from code: common words are one token
    assert len(bpe.encode("return self")) < len("return self") / 2
    with pytest.raises(KeyError, match="<nope>"):
        bpe.special_id("<nope>")


def test_load_tokenizer_dispatches_on_the_backend(bpe):
    assert isinstance(load_tokenizer(DataConfig()), ByteTokenizer)
    bpe_cfg = DataConfig(tokenizer="bpe", tokenizer_path=bpe.path, bpe_vocab_size=700)
    again = load_tokenizer(bpe_cfg, log=lambda m: pytest.fail(f"retrained: {m}"))
    text = "def f(x):\n    return x  # ☃\n"
    np.testing.assert_array_equal(again.encode(text), bpe.encode(text))
    as_file = load_tokenizer(DataConfig(tokenizer="file", tokenizer_path=bpe.path, fim_rate=0.5))
    assert isinstance(as_file, HFTokenizer) and as_file.vocab_size == 700
    with pytest.raises(TokenizerError, match="has 700 tokens but data.bpe_vocab_size=600"):
        load_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=bpe.path, bpe_vocab_size=600))


def test_tokenizer_file_missing_a_special_token_names_file_and_token(bpe, tmp_path):
    spec = json.load(open(bpe.path, encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != FIM_PAD]
    path = tmp_path / "no_pad.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    # without FIM only <|endoftext|> is required
    tok = load_tokenizer(DataConfig(tokenizer="file", tokenizer_path=str(path)))
    assert tok.special_id(EOT) == 0
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(DataConfig(tokenizer="file", tokenizer_path=str(path), fim_rate=0.5))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'<fim_pad>'" in message


def test_unusable_tokenizer_files_fail_in_one_line(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(TokenizerError, match=f"{missing} does not exist"):
        load_tokenizer(DataConfig(tokenizer="file", tokenizer_path=str(missing)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(DataConfig(tokenizer="file", tokenizer_path=str(broken)))
    assert "\n" not in str(err.value) and f"tokenizer file {broken}: cannot load it" in str(err.value)
    with pytest.raises(TokenizerError, match="data.bpe_vocab_size=100: expected >= 261"):
        train_bpe(DataConfig(), 100, str(tmp_path / "small.json"))


def test_sentencepiece_style_vocabulary_counts_bytes(tmp_path):
    """A non-byte-level tokenizer.json (WordLevel over ▁-words with <0x..> byte pieces): bytes
    per token follow the SentencePiece conventions."""
    vocab = {EOT: 0, "▁hello": 1, "<0xE2>": 2, "é": 3, "[UNK]": 4}
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": EOT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    path = tmp_path / "sp.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tok = HFTokenizer(str(path))
    assert tok.vocab_size == 5
    np.testing.assert_array_equal(tok.bytes_per_token(np.array([0, 1, 2, 3])), [0, 6, 1, 2])


def test_bpe_cache_follows_its_fields_and_retrains_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    fields = dict(tokenizer="bpe", sources=(f"text:{STDLIB_JSON}",), bpe_vocab_size=300,
                  heldout_fraction=0.0)
    cfg = DataConfig(**fields)
    path = bpe_cache_path(cfg)
    assert path.startswith(str(tmp_path / "tokenizers")) and path == bpe_cache_path(DataConfig(**fields))
    for change in (dict(bpe_vocab_size=301), dict(bpe_train_chars=10), dict(heldout_fraction=0.1),
                   dict(sources=("stdlib",))):
        assert bpe_cache_path(DataConfig(**{**fields, **change})) != path
    assert load_tokenizer(cfg, log=lambda m: None).vocab_size == 300 and os.path.exists(path)
    first = open(path, "rb").read()
    os.remove(path)
    load_tokenizer(cfg, log=lambda m: None)
    assert open(path, "rb").read() == first  # deterministic: a lost cache comes back the same
