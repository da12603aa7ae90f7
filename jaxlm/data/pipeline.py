"""grain pipelines: documents -> tokens -> packed rows -> (FIM) -> mixture -> batches,
deterministic given a seed.

Training (infinite; every source reshuffled every epoch):

    per source s:  document indices -> shuffle(seed_s) -> repeat -> tokenize + <|endoftext|>
                   -> concat-then-split into rows of seq_len + 1
                   -> FIM on each document piece with probability fim_rate   (jaxlm/data/fim.py)
    StagedMixture: batch i takes batch_size rows from the sources by the weights of the stage
                   active at step i                                          (mixture.py)
    -> inputs / targets / loss_mask

Evaluation reads the held-out split (all sources) once in a fixed order: 'heldout' is the
left-to-right loss; with fim_rate > 0, 'fim' is the same documents with every piece PSM
FIM-transformed and the loss on middle tokens only. The training iterator is a grain
`DatasetIterator`, so `get_state()` / `set_state()` checkpoint and restore its exact position.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from jaxlm.data.config import DataConfig
from jaxlm.data.fim import FimIds, FimRows
from jaxlm.data.mixture import StagedMixture
from jaxlm.data.sources import ConcatDocuments, Documents, open_split
from jaxlm.data.tokenizers import EOT, Tokenizer

HELDOUT_SEED = 12345  # the fixed shuffle of the held-out documents


def open_documents(data_cfg: DataConfig, split: str) -> Documents:
    """All configured sources concatenated, restricted to `split` ('train' or 'heldout')."""
    parts = open_split(data_cfg.sources, split, data_cfg.heldout_fraction)
    if len(parts) == 1:
        return parts[0]
    return ConcatDocuments(parts)


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """Document text -> {'tokens': ids followed by <|endoftext|>} (int32)."""

    tokenizer: Tokenizer

    def __call__(self, text: str) -> dict:
        ids = self.tokenizer.encode(text)
        eot = self.tokenizer.special_id(EOT)
        return {"tokens": np.concatenate([ids, np.array([eot], np.int32)]).astype(np.int32)}


class EpochOrder:
    """Position k of the repeated document stream -> (epoch, document index): epoch e visits
    the documents in a permutation drawn from (seed, e).

    A NumPy permutation per epoch (8 bytes per document, the current epoch's cached) rather
    than grain's `shuffle`: grain's index_shuffle costs milliseconds per element on corpora of
    a few hundred documents (it walks cycles of a much larger domain)."""

    def __init__(self, num_docs: int, seed: int):
        self.num_docs, self.seed = num_docs, seed
        self._epoch, self._order = -1, None

    def __call__(self, k: int, _unused=None) -> tuple[int, int]:
        epoch, i = divmod(k, self.num_docs)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
        return epoch, int(self._order[i])


@dataclasses.dataclass(frozen=True)
class TokenizeDocument:
    """(epoch, document index) -> {'tokens'}; with `origin`, also what FIM keys its randomness
    on: per-token 'offset' in the document and per-document 'doc' and 'epoch'."""

    docs: Documents
    tokenizer: Tokenizer
    origin: bool = False

    def __call__(self, element: tuple[int, int]) -> dict:
        epoch, index = element
        out = Tokenize(self.tokenizer)(self.docs[index])
        if self.origin:
            out["offset"] = np.arange(len(out["tokens"]), dtype=np.int32)
            out["doc"] = np.int64(index)
            out["epoch"] = np.int64(epoch)
        return out


def plain_rows(row: dict) -> dict:
    """Packed row without FIM: every non-padding token is a target."""
    return {"tokens": row["tokens"], "tokens_segment_ids": row["tokens_segment_ids"],
            "tokens_positions": row["tokens_positions"],
            "target_mask": (row["tokens_segment_ids"] > 0).astype(np.float32)}


def packed_rows(docs: Documents, tokenizer: Tokenizer, seq_len: int, *, seed: int, repeat: bool,
                fim: FimRows | None = None, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
    """Rows of seq_len + 1 tokens {'tokens', 'tokens_segment_ids', 'tokens_positions',
    'target_mask'} from `docs` in a seeded order (reshuffled every epoch when `repeat`)."""
    ds = grain.MapDataset.range(len(docs))
    if repeat:
        ds = ds.repeat()
    ds = ds.map_with_index(EpochOrder(len(docs), seed))
    if process_count > 1:
        ds = ds[process_index::process_count]
    # No prefetch threads: on two cores they only contend with the training step for the GIL
    # and the CPU (measured: 16 threads ran the FIM + BPE pipeline 3.7x slower than none).
    ds = ds.map(TokenizeDocument(docs, tokenizer, origin=fim is not None)).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    length = seq_len + 1
    if fim is None:
        packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": length})
        return packed.map(plain_rows)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": length, "offset": length, "doc": length, "epoch": length},
        meta_features=("doc", "epoch"))
    return packed.map(fim)


@dataclasses.dataclass(frozen=True)
class RowsToBatch:
    """Stacked rows of seq_len + 1 -> model inputs, shifted targets and the loss mask."""

    document_masking: bool

    def __call__(self, rows: dict) -> dict:
        tokens = rows["tokens"]
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "loss_mask": rows["target_mask"][:, 1:].astype(np.float32)}
        if self.document_masking:
            batch["positions"] = rows["tokens_positions"][:, :-1].astype(np.int32)
            batch["segment_ids"] = rows["tokens_segment_ids"][:, :-1].astype(np.int32)
        return batch


def source_seed(seed: int, source: int) -> int:
    """Shuffle seed of source `source` (source 0 uses data.seed itself)."""
    return (seed + 1_000_003 * source) % 2 ** 32


def train_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite training batches; each process reads its own slice of every source and builds
    its share of every global batch."""
    batch_size = batch_size or data_cfg.batch_size
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size}: expected a multiple of the "
                         f"{process_count} processes")
    parts = open_split(data_cfg.sources, "train", data_cfg.heldout_fraction)
    for spec, part in zip(data_cfg.sources, parts):
        if len(part) == 0:
            raise ValueError(f"data.sources: {spec!r} has no documents in the train split")
    if data_cfg.fim_rate > 0:
        FimIds.of(tokenizer)  # a missing sentinel fails here, naming it
    streams = []
    for s, docs in enumerate(parts):
        fim = (FimRows(tokenizer, data_cfg.fim_rate, data_cfg.fim_spm_rate, seed=data_cfg.seed,
                       source=s) if data_cfg.fim_rate > 0 else None)
        streams.append(packed_rows(docs, tokenizer, data_cfg.seq_len,
                                   seed=source_seed(data_cfg.seed, s), repeat=True, fim=fim,
                                   process_index=process_index, process_count=process_count))
    mixture = StagedMixture(streams, data_cfg.schedule(), batch_size // process_count)
    return mixture.map(RowsToBatch(data_cfg.document_masking))


def _heldout_docs(data_cfg: DataConfig) -> Documents:
    docs = open_documents(data_cfg, "heldout")
    if len(docs) == 0:
        raise ValueError(f"data.heldout_fraction={data_cfg.heldout_fraction}: the held-out "
                         "split has no documents")
    return docs


def heldout_dataset(data_cfg: DataConfig, tokenizer: Tokenizer,
                    batch_size: int | None = None) -> grain.IterDataset:
    """Held-out batches in a fixed order (a fixed shuffle, so a few batches see many files)."""
    rows = packed_rows(_heldout_docs(data_cfg), tokenizer, data_cfg.seq_len, seed=HELDOUT_SEED,
                       repeat=False)
    return rows.batch(batch_size or data_cfg.batch_size, drop_remainder=True).map(
        RowsToBatch(data_cfg.document_masking))


def fim_heldout_dataset(data_cfg: DataConfig, tokenizer: Tokenizer,
                        batch_size: int | None = None) -> grain.IterDataset:
    """The held-out rows with every document piece FIM-transformed in PSM order (pieces too
    short to take the three sentinels stay as they are) and the loss on middle tokens only:
    how well the model infills."""
    fim = FimRows(tokenizer, fim_rate=1.0, spm_rate=0.0, seed=HELDOUT_SEED, middle_only=True)
    rows = packed_rows(_heldout_docs(data_cfg), tokenizer, data_cfg.seq_len, seed=HELDOUT_SEED,
                       repeat=False, fim=fim)
    return rows.batch(batch_size or data_cfg.batch_size, drop_remainder=True).map(
        RowsToBatch(data_cfg.document_masking))


def eval_datasets(data_cfg: DataConfig, tokenizer: Tokenizer,
                  batch_size: int | None = None) -> dict[str, grain.IterDataset]:
    """Named evaluation sets the training loop reports; 'heldout' (left-to-right loss on the
    held-out split) is the main one, 'fim' (middle-token loss of PSM infilling) comes with
    data.fim_rate > 0."""
    sets = {"heldout": heldout_dataset(data_cfg, tokenizer, batch_size)}
    if data_cfg.fim_rate > 0:
        sets["fim"] = fim_heldout_dataset(data_cfg, tokenizer, batch_size)
    return sets


def take(dataset: grain.IterDataset, n: int) -> list[dict]:
    out = []
    for batch in dataset:
        if len(out) == n:
            break
        out.append(batch)
    return out


def unigram_cross_entropy(train_docs: Documents, tokenizer: Tokenizer, eval_batches: list[dict],
                          vocab_size: int, max_chars: int = 4_000_000) -> float:
    """Loss (nats/token) of the add-one-smoothed unigram model of the training text on the
    evaluation targets: the baseline a language model must beat."""
    counts = np.zeros(vocab_size, np.float64)
    seen = 0
    for i in range(len(train_docs)):
        text = train_docs[i]
        counts += np.bincount(Tokenize(tokenizer)(text)["tokens"], minlength=vocab_size)[:vocab_size]
        seen += len(text)
        if seen >= max_chars:
            break
    log_p = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    losses, weights = [], []
    for batch in eval_batches:
        losses.append(-(log_p[batch["targets"]] * batch["loss_mask"]).sum())
        weights.append(batch["loss_mask"].sum())
    return float(np.sum(losses) / max(np.sum(weights), 1.0))


def iterate(dataset: grain.IterDataset) -> Iterator[dict]:
    """A checkpointable iterator (grain DatasetIterator: get_state / set_state)."""
    return iter(dataset)
