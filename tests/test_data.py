"""Data: byte tokenizer, the embedded corpus and its split, packing, determinism, resume."""

import json
import os

import numpy as np
import pytest

from jaxlm.data import pipeline
from jaxlm.data.config import DataConfig
from jaxlm.data.sources import SourceError, open_source, split_by_name, stdlib_files
from jaxlm.data.tokenizers import EOT, SPECIAL_TOKENS, ByteTokenizer


def test_byte_tokenizer_round_trips_unicode_and_names_specials():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ☃ 𝄞'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(256, 261))
    assert tok.decode([*tok.encode("a"), tok.special_id(EOT)]) == "a" + EOT
    with pytest.raises(KeyError, match="<nope>"):
        tok.special_id("<nope>")


def test_stdlib_corpus_has_no_tests_and_a_stable_disjoint_split():
    files = stdlib_files()
    assert len(files) > 300
    assert not any(f"{os.sep}test{os.sep}" in f or f"{os.sep}tests{os.sep}" in f or
                   "site-packages" in f for f in files)
    docs = open_source("stdlib")
    train = split_by_name(docs, "train", 0.05)
    held = split_by_name(docs, "heldout", 0.05)
    names_train = {train.name(i) for i in range(len(train))}
    names_held = {held.name(i) for i in range(len(held))}
    assert not names_train & names_held
    assert len(names_train) + len(names_held) == len(docs)
    assert 0.02 < len(held) / len(docs) < 0.09
    assert names_held == {split_by_name(docs, "heldout", 0.05).name(i) for i in range(len(held))}


@pytest.fixture(scope="module")
def small_cfg():
    return DataConfig(seq_len=16, batch_size=4, seed=3)


def test_batches_are_shifted_packed_rows_and_deterministic(small_cfg):
    tok = ByteTokenizer()
    a = pipeline.take(pipeline.train_dataset(small_cfg, tok), 5)
    b = pipeline.take(pipeline.train_dataset(small_cfg, tok), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    first = a[0]
    assert first["inputs"].shape == (4, 16) and first["targets"].shape == (4, 16)
    np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])
    assert np.all(first["loss_mask"] == 1.0)
    other_seed = pipeline.take(pipeline.train_dataset(
        DataConfig(seq_len=16, batch_size=4, seed=4), tok), 1)[0]
    assert not np.array_equal(other_seed["inputs"], first["inputs"])


def test_iterator_state_restores_the_exact_position(small_cfg):
    tok = ByteTokenizer()
    it = iter(pipeline.train_dataset(small_cfg, tok))
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as it round-trips through a checkpoint
    expected = [next(it)["inputs"] for _ in range(3)]
    it2 = iter(pipeline.train_dataset(small_cfg, tok))
    it2.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(it2)["inputs"], want)


def test_document_masking_restarts_positions_at_each_document(tmp_path):
    (tmp_path / "a.txt").write_text("abcdef")
    (tmp_path / "b.txt").write_text("xyz")
    cfg = DataConfig(sources=(f"text:{tmp_path}/*.txt",), seq_len=8, batch_size=1,
                     heldout_fraction=0.0, document_masking=True)
    batch = pipeline.take(pipeline.train_dataset(cfg, ByteTokenizer()), 1)[0]
    seg, pos = batch["segment_ids"][0], batch["positions"][0]
    starts = np.flatnonzero(pos == 0)
    assert len(starts) >= 2 and np.all(np.diff(seg)[starts[1:] - 1] != 0)


def test_unigram_baseline_matches_a_direct_count(small_cfg):
    tok = ByteTokenizer()
    docs = pipeline.open_documents(small_cfg, "train")
    batches = pipeline.take(pipeline.heldout_dataset(small_cfg, tok), 2)
    got = pipeline.unigram_cross_entropy(docs, tok, batches, 300, max_chars=50_000)
    counts = np.zeros(300)
    seen = 0
    for i in range(len(docs)):
        text = docs[i]
        ids = np.append(tok.encode(text), tok.special_id(EOT))
        np.add.at(counts, ids, 1)
        seen += len(text)
        if seen >= 50_000:
            break
    p = (counts + 1) / (counts.sum() + 300)
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    assert got == pytest.approx(-np.mean(np.log(p[targets])), rel=1e-9)


def test_bad_sources_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="no files match"):
        open_source(f"text:{tmp_path}/missing/*.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SourceError, match="empty.txt is empty"):
        open_source(f"text:{tmp_path}/empty.txt")
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SourceError, match=r"rows.jsonl:2: no field 'text'"):
        open_source(f"jsonl:{tmp_path}/rows.jsonl")  # at open, not when a shuffle reaches it
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n\n{"text": "two"}\n')
    docs = open_source(f"jsonl:{tmp_path}/rows.jsonl")
    assert [docs[0], docs[1], docs.name(1).rsplit(":", 1)[1]] == ["ok", "two", "3"]
    with pytest.raises(SourceError, match="expected 'stdlib'"):
        open_source("parquet:foo")
