"""FIM: PSM/SPM round trips, the StarCoder re-fitting of pieces, the rates, determinism, and
the FIM held-out set whose loss covers middle tokens only."""

import json
import os
import sysconfig

import numpy as np
import pytest

from jaxlm.data import pipeline
from jaxlm.data.config import DataConfig
from jaxlm.data.fim import FimIds, cut_points, fim_document, fim_piece, undo_fim
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
    return load_tokenizer(DataConfig(sources=(f"text:{STDLIB_JSON}",), tokenizer="bpe",
                                     tokenizer_path=path, bpe_vocab_size=600,
                                     heldout_fraction=0.0), log=lambda m: None)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


def random_documents(rng, n):
    alphabet = list("abc xyz\n\t()=:_") + ["é", "ß", "☃", "中", "文", "𝄞", "🙂", "\u0301"]
    docs = ["", "a", "é", "🙂", "\n"]
    while len(docs) < n:
        length = int(rng.integers(0, 60))
        docs.append("".join(alphabet[i] for i in rng.integers(0, len(alphabet), length)))
    return docs


def test_psm_and_spm_round_trip_random_documents(tok):
    rng = np.random.default_rng(1)
    ids = FimIds.of(tok)
    for k, doc in enumerate(random_documents(rng, 300)):
        for spm in (False, True):
            doc_rng = np.random.default_rng([7, k, int(spm)])
            lo, hi = cut_points(len(doc), np.random.default_rng([7, k, int(spm)]))
            tokens, middle = fim_document(doc, tok, doc_rng, spm, ids)
            assert undo_fim(tokens, tok) == doc
            # the mask marks exactly the middle's tokens
            np.testing.assert_array_equal(tokens[middle == 1], tok.encode(doc[lo:hi]))
            # sentinel layout of the order
            if spm:
                assert tokens[0] == ids.prefix and tokens[1] == ids.suffix
            else:
                assert tokens[0] == ids.prefix and tokens[1 + len(tok.encode(doc[:lo]))] == ids.suffix
            assert len(tokens) == 3 + sum(len(tok.encode(p)) for p in (doc[:lo], doc[lo:hi], doc[hi:]))


def test_cut_points_are_uniform_over_all_positions():
    rng = np.random.default_rng(0)
    draws = np.array([cut_points(4, rng) for _ in range(20000)])
    assert np.all(draws[:, 0] <= draws[:, 1]) and draws.min() == 0 and draws.max() == 4
    # each of the two unsorted draws is uniform on {0..4}: P(lo = 0) = 1 - (4/5)^2 = 0.36
    assert np.mean(draws[:, 0] == 0) == pytest.approx(0.36, abs=0.015)
    assert np.mean(draws[:, 1] == 4) == pytest.approx(0.36, abs=0.015)


def test_fim_rate_and_spm_rate_are_respected():
    tok = ByteTokenizer()
    ids = FimIds.of(tok)
    text = "".join(f"    value_{i} = compute({i}) * 2  # step {i}\n" for i in range(10))  # 400+ chars
    piece = np.append(tok.encode(text), ids.eot).astype(np.int32)
    n = 4000
    # Allowed bias on top of 4 sigma: pieces that cannot fit (prefix + suffix <= 3 bytes,
    # P ~ 1e-4) and PSM with an empty prefix, which reads like SPM (P(lo = 0) ~ 0.5%).
    for fim_rate, spm_rate in ((0.5, 0.5), (0.1, 0.9), (0.0, 0.5), (1.0, 0.0)):
        out = [fim_piece(piece, tok, ids, np.random.default_rng([3, i]), fim_rate, spm_rate)[0]
               for i in range(n)]
        transformed = np.array([o[0] == ids.prefix for o in out])
        assert abs(transformed.mean() - fim_rate) <= 4 * np.sqrt(fim_rate * (1 - fim_rate) / n) + 0.002
        if transformed.any():
            spm = np.array([o[1] == ids.suffix for o in out])[transformed]
            sigma = np.sqrt(spm_rate * (1 - spm_rate) / len(spm))
            assert abs(spm.mean() - spm_rate) <= 4 * sigma + 0.01
        for o in out:
            assert len(o) == len(piece)


def test_pieces_keep_their_length_truncating_or_padding_the_suffix(bpe):
    ids = FimIds.of(bpe)
    text = "    return self.value + other.value\n"
    # 1. canonical tokens: the three sentinels (and cut merges) make it longer -> the end of the
    #    suffix (then the start of the prefix) is cut; the middle is always whole
    piece = np.append(bpe.encode(text), ids.eot).astype(np.int32)
    transformed = 0
    for i in range(200):
        tokens, middle = fim_piece(piece, bpe, ids, np.random.default_rng([5, i]), 1.0, 0.0)
        assert len(tokens) == len(piece) and tokens[-1] == ids.eot
        if tokens[0] == ids.prefix:
            transformed += 1
            assert ids.pad not in tokens
            restored = undo_fim(tokens[:-1], bpe)
            assert restored in text and len(restored) < len(text)
            middle_text = bpe.decode(tokens[middle == 1])
            assert middle_text in restored and middle_text in text
        else:  # prefix and suffix together too short to absorb the excess: left as it was
            np.testing.assert_array_equal(tokens, piece)
    assert transformed >= 120  # ~9 tokens: cuts near both ends leave too little to trim
    # 2. one token per character: re-tokenizing merges them -> shorter -> suffix padded
    piece = np.concatenate([np.concatenate([bpe.encode(c) for c in text]), [ids.eot]]).astype(np.int32)
    tokens, middle = fim_piece(piece, bpe, ids, np.random.default_rng(0), 1.0, 0.5)
    assert len(tokens) == len(piece) and ids.pad in tokens
    assert undo_fim(tokens[:-1], bpe) == text  # padding only: the document is intact
    # pads sit at the end of the suffix, right before <fim_middle> (PSM) / the middle (SPM)
    pads = np.flatnonzero(tokens == ids.pad)
    assert np.all(np.diff(pads) == 1) and tokens[pads[-1] + 1] == ids.middle


def _rows(batches):
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                           for b in batches])


def test_pipeline_fim_is_deterministic_per_document_not_per_batch(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x + {i}  # ünïcode\n" * 3)
    base = dict(sources=(f"text:{tmp_path}/*.py",), seq_len=48, heldout_fraction=0.0, fim_rate=0.5)
    tok = ByteTokenizer()
    ids = FimIds.of(tok)
    a = _rows(pipeline.take(pipeline.train_dataset(DataConfig(batch_size=2, **base), tok), 12))
    b = _rows(pipeline.take(pipeline.train_dataset(DataConfig(batch_size=6, **base), tok), 4))
    np.testing.assert_array_equal(a, b)
    starts = np.sum(a == ids.prefix)
    pieces = np.sum(a == ids.eot) + len(a)  # a piece ends at an <|endoftext|> or a row end
    assert 0.2 * pieces < starts < 0.8 * pieces  # fim_rate 0.5 (loose: pieces can't all fit)
    c = _rows(pipeline.take(pipeline.train_dataset(DataConfig(batch_size=2, seed=1, **base), tok), 12))
    assert not np.array_equal(a, c)
    # the loss skips <fim_pad> targets and nothing else
    batch = pipeline.take(pipeline.train_dataset(DataConfig(batch_size=6, **base), tok), 1)[0]
    np.testing.assert_array_equal(batch["loss_mask"], (batch["targets"] != ids.pad).astype(np.float32))


def middle_mask_reference(tokens, ids):
    """Independent parse of PSM pieces: a token is a middle token if it follows a <fim_middle>
    before any <|endoftext|> / <fim_prefix> / row end, and is no special token. (An SPM piece
    would put its prefix there too, so agreeing with the mask also shows the order is PSM.)"""
    out = np.zeros(len(tokens), np.float32)
    inside = False
    for i, t in enumerate(tokens):
        if t == ids.middle:
            inside = True
        elif t in (ids.eot, ids.prefix):
            inside = False
        elif inside and t not in (ids.suffix, ids.pad):
            out[i] = 1.0
    return out


def test_fim_heldout_set_scores_middle_tokens_only(tok):
    cfg = DataConfig(seq_len=64, batch_size=4, fim_rate=0.5, heldout_fraction=0.05)
    ids = FimIds.of(tok)
    batches = pipeline.take(pipeline.eval_datasets(cfg, tok)["fim"], 3)
    assert set(pipeline.eval_datasets(cfg, tok)) == {"heldout", "fim"}
    assert "fim" not in pipeline.eval_datasets(DataConfig(seq_len=64, batch_size=4), tok)
    total = 0
    for batch in batches:
        for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
            row = np.append(inputs, targets[-1])
            np.testing.assert_array_equal(mask, middle_mask_reference(row, ids)[1:])
            total += mask.sum()
    assert total > 50
    # the same held-out documents as the left-to-right set, in the same order
    plain = pipeline.take(pipeline.eval_datasets(cfg, tok)["heldout"], 1)[0]
    assert np.sum(plain["inputs"] == ids.eot) == np.sum(batches[0]["inputs"] == ids.eot)


def test_state_restores_exactly_with_fim(tmp_path):
    cfg = DataConfig(seq_len=32, batch_size=3, fim_rate=0.5, seed=2)
    tok = ByteTokenizer()
    it = iter(pipeline.train_dataset(cfg, tok))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    it2 = iter(pipeline.train_dataset(cfg, tok))
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
