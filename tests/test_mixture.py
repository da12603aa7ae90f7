"""Sources (ArrayRecord, the pydocs corpus, bad files), weighted mixtures and stage schedules
(exact switch step, resume across the boundary), and one-line config errors."""

import glob
import json

import grain
import numpy as np
import pytest

from jaxlm.data import pipeline, sources
from jaxlm.data.config import DataConfig
from jaxlm.data.mixture import StagedMixture, pick_source, stage_at
from jaxlm.data.sources import SourceError, open_source, write_arrayrecord
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.schema import ConfigError, from_config_dict, to_config_dict


def constant_rows(value: int) -> grain.IterDataset:
    """An infinite stream of rows {'source': value, 'index': i}."""
    return (grain.MapDataset.range(1_000_000)
            .map(lambda i: {"source": np.int32(value), "index": np.int64(i)})
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def test_mixture_proportions_over_10k_rows_match_the_weights():
    weights = (0.5, 0.3, 0.15, 0.05)
    mix = StagedMixture([constant_rows(s) for s in range(4)], ((0, weights),), batch_size=50)
    it = iter(mix)
    rows = np.concatenate([next(it)["source"] for _ in range(200)])  # 10,000 rows
    share = np.bincount(rows, minlength=4) / len(rows)
    np.testing.assert_allclose(share, weights, atol=0.02)
    assert np.max(np.abs(share - weights)) <= 1 / len(rows)  # deterministic blending: ±1 row
    # unnormalised weights and a zero weight: the zero-weight source is never read
    it = iter(StagedMixture([constant_rows(0), constant_rows(1), constant_rows(2)],
                            ((0, (3.0, 0.0, 1.0)),), batch_size=8))
    rows = np.concatenate([next(it)["source"] for _ in range(100)])
    assert np.sum(rows == 1) == 0 and np.mean(rows == 0) == pytest.approx(0.75, abs=1 / 800)


def test_pick_source_and_stage_lookup():
    assert [stage_at(((0, ()), (5, ()), (9, ())), s) for s in (0, 4, 5, 8, 9, 100)] == [0, 0, 1, 1, 2, 2]
    counts = [0, 0]
    picks = []
    for _ in range(10):
        s = pick_source((0.7, 0.3), counts)
        counts[s] += 1
        picks.append(s)
    assert counts == [7, 3] and picks[:4] == [0, 1, 0, 0]


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Source A: documents of 'a'; source B: documents of 'b' — a row's source is visible."""
    root = tmp_path_factory.mktemp("corpora")
    for name in "ab":
        (root / name).mkdir()
        for i in range(5):
            (root / name / f"{i}.txt").write_text(name * (20 + 7 * i))
    return root


def mixed_config(root, **overrides):
    base = dict(sources=(f"text:{root}/a/*.txt", f"text:{root}/b/*.txt"), seq_len=8,
                batch_size=10, heldout_fraction=0.0)
    base.update(overrides)
    return DataConfig(**base)


def row_sources(batch) -> np.ndarray:
    """0 for a row of source A, 1 for source B (rows hold one source's bytes + <eot>)."""
    a, b = batch["inputs"] == ord("a"), batch["inputs"] == ord("b")
    assert not np.any(a.any(axis=1) & b.any(axis=1))
    return b.any(axis=1).astype(int)


def test_pipeline_mixes_sources_by_token_share(two_corpora):
    cfg = mixed_config(two_corpora, weights=(0.7, 0.3), batch_size=100)
    rows = np.concatenate([row_sources(b) for b in pipeline.take(
        pipeline.train_dataset(cfg, ByteTokenizer()), 100)])  # 10,000 rows
    assert abs(np.mean(rows == 0) - 0.7) <= 0.02


def test_stage_switches_at_exactly_the_configured_step_and_survives_resume(two_corpora):
    cfg = mixed_config(two_corpora, weights=(1.0, 0.0), stages=((5, 0.25, 0.75), (8, 0.0, 1.0)),
                       batch_size=4)
    tok = ByteTokenizer()
    it = iter(pipeline.train_dataset(cfg, tok))
    uninterrupted, states = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))  # as orbax's JsonSave stores it
        uninterrupted.append(next(it))
    share_b = [row_sources(b).mean() for b in uninterrupted]
    assert share_b == [0.0] * 5 + [0.75] * 3 + [1.0] * 4
    # resume before, exactly at, and after each boundary
    for resume_at in (3, 5, 6, 8, 10):
        resumed = iter(pipeline.train_dataset(cfg, tok))
        resumed.set_state(states[resume_at])
        for want in uninterrupted[resume_at:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    # source A continues where stage 0 left it after stage 1 (no restart of its stream)
    a_rows_stage0 = [r for b in uninterrupted[:5] for r, s in zip(b["inputs"], row_sources(b)) if s == 0]
    a_rows_stage1 = [r for b in uninterrupted[5:8] for r, s in zip(b["inputs"], row_sources(b)) if s == 0]
    fresh = iter(pipeline.train_dataset(mixed_config(two_corpora, weights=(1.0, 0.0), batch_size=1),
                                        tok))
    reference = [next(fresh)["inputs"][0] for _ in range(len(a_rows_stage0) + len(a_rows_stage1))]
    np.testing.assert_array_equal(np.array(a_rows_stage0 + a_rows_stage1), np.array(reference))


def test_stages_are_cli_overridable_and_validated():
    cd = to_config_dict(DataConfig(sources=("stdlib", "pydocs")))
    cd.stages = ((100, 0.2, 0.8),)  # what --config.data.stages="((100, 0.2, 0.8),)" sets
    cfg = from_config_dict(DataConfig, cd)
    assert cfg.schedule() == ((0, (0.5, 0.5)), (100, (0.2, 0.8)))
    assert from_config_dict(DataConfig, json.loads(json.dumps(cd.to_dict()))) == cfg  # config.json
    bad = [
        (dict(weights=(0.0, 0.0)), r"data.weights=\(0.0, 0.0\): expected non-negative weights with a positive sum"),
        (dict(weights=(1.0,)), r"data.weights=\(1.0,\): expected 2 weights"),
        (dict(stages=((10, -1.0, 2.0),)), r"data.stages\[0\].weights=\(-1.0, 2.0\): expected non-negative"),
        (dict(stages=((10, 0.0, 0.0),)), r"data.stages\[0\].weights=\(0.0, 0.0\): expected non-negative weights with a positive sum"),
        (dict(stages=((10, 1.0),)), r"data.stages\[0\].weights=\(1.0,\): expected 2 weights"),
        (dict(stages=((10, 1.0, 1.0), (10, 1.0, 0.0))), r"data.stages\[1\].start_step=10: expected > 10"),
        (dict(stages=((0, 1.0, 1.0),)), r"data.stages\[0\].start_step=0: expected > 0"),
        (dict(stages=((2.5, 1.0, 1.0),)), r"data.stages\[0\]=\(2.5, 1.0, 1.0\): expected \(start_step, w_0, w_1\)"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message) as err:
            from_config_dict(DataConfig, {"sources": ("stdlib", "pydocs"), **fields})
        assert "\n" not in str(err.value)


def test_arrayrecord_source_reads_records_and_names_bad_files(tmp_path):
    texts = ["def f():\n    return 1\n", "héllo ☃", "x" * 1000, ""]
    write_arrayrecord(str(tmp_path / "part-0.array_record"), texts[:2])
    write_arrayrecord(str(tmp_path / "part-1.array_record"), texts[2:])
    docs = open_source(f"arrayrecord:{tmp_path}/*.array_record")
    assert len(docs) == 4 and [docs[i] for i in range(4)] == texts
    assert docs.name(3) == f"{tmp_path}/part-1.array_record:1"
    cfg = DataConfig(sources=(f"arrayrecord:{tmp_path}/*.array_record",), seq_len=16,
                     batch_size=2, heldout_fraction=0.0)
    batch = pipeline.take(pipeline.train_dataset(cfg, ByteTokenizer()), 1)[0]
    assert batch["inputs"].shape == (2, 16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "not.array_record").write_text("just text")
    with pytest.raises(SourceError, match=r"data file .*not.array_record: not a readable ArrayRecord file"):
        open_source(f"arrayrecord:{tmp_path}/bad/*.array_record")
    write_arrayrecord(str(tmp_path / "bad" / "latin1.ar"), ["ok"])
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "bad" / "latin1.ar"), "group_size:1")
    writer.write("ok".encode())
    writer.write("caf\xe9".encode("latin-1"))
    writer.close()
    docs = open_source(f"arrayrecord:{tmp_path}/bad/latin1.ar")
    assert docs[0] == "ok"
    with pytest.raises(SourceError, match=r"latin1.ar:1: record is not UTF-8 text"):
        docs[1]


def test_pydocs_corpus_reads_the_packaged_documentation_or_says_how_to_get_it(tmp_path, monkeypatch):
    installed = glob.glob(sources.PYDOCS_ROOTS)
    if installed:  # the real corpus (apt-get install python3-doc): ~500 pages of prose
        docs = open_source("pydocs")
        assert len(docs) > 400
        names = {docs.name(i) for i in range(len(docs))}
        assert "tutorial/introduction.rst.txt" in names
        index = sorted(names).index("tutorial/introduction.rst.txt")
        assert "An Informal Introduction to Python" in docs[sorted(range(len(docs)), key=docs.name)[index]]
    fake = tmp_path / "doc" / "python3.99" / "html" / "_sources"
    (fake / "library").mkdir(parents=True)
    (fake / "library" / "os.rst.txt").write_text("The os module provides a portable way.\n")
    (fake / "index.rst.txt").write_text("Welcome.\n")
    monkeypatch.setattr(sources, "PYDOCS_ROOTS", str(tmp_path / "doc" / "python3*" / "html" / "_sources"))
    docs = open_source("pydocs")
    assert [docs.name(i) for i in range(len(docs))] == ["index.rst.txt", "library/os.rst.txt"]
    assert docs[1] == "The os module provides a portable way.\n"
    monkeypatch.setattr(sources, "PYDOCS_ROOTS", str(tmp_path / "nowhere" / "_sources"))
    with pytest.raises(SourceError, match="apt-get install python3-doc") as err:
        open_source("pydocs")
    assert "\n" not in str(err.value) and "data source 'pydocs'" in str(err.value)


def test_bad_sources_fail_in_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SourceError, match=r"file .*empty.txt is empty"):
        open_source(f"text:{tmp_path}/empty.txt")
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n\n{"content": "no text"}\n')
    cfg = DataConfig(sources=(f"jsonl:{tmp_path}/rows.jsonl",), seq_len=4, batch_size=1,
                     heldout_fraction=0.0)
    with pytest.raises(SourceError, match=r"rows.jsonl:3: no field 'text' in the JSON object"):
        pipeline.take(pipeline.train_dataset(cfg, ByteTokenizer()), 10)
    with pytest.raises(SourceError, match="expected 'stdlib', 'pydocs'"):
        open_source("parquet:x")
