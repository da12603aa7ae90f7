"""grain pipelines: documents -> tokens -> packed rows -> batches, deterministic given a seed.

Training (infinite, reshuffled every epoch):

    documents (train split) -> shuffle(seed) -> repeat -> tokenize + <|endoftext|>
        -> concat-then-split into rows of seq_len + 1 -> batch -> inputs / targets

Evaluation reads the held-out split once in a fixed order. The training iterator is a grain
`DatasetIterator`, so `get_state()` / `set_state()` checkpoint and restore its exact position.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from jaxlm.data.config import DataConfig
from jaxlm.data.sources import ConcatDocuments, Documents, open_source, split_by_name
from jaxlm.data.tokenizers import EOT, Tokenizer


def open_documents(data_cfg: DataConfig, split: str) -> Documents:
    """All configured sources concatenated, restricted to `split` ('train' or 'heldout')."""
    parts = [split_by_name(open_source(spec), split, data_cfg.heldout_fraction)
             for spec in data_cfg.sources]
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


def rows_to_batch(rows: dict, document_masking: bool) -> dict:
    """Packed rows of seq_len + 1 -> model inputs and shifted targets."""
    tokens = rows["tokens"]
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": (rows["tokens_segment_ids"][:, 1:] > 0).astype(np.float32)}
    if document_masking:
        batch["positions"] = rows["tokens_positions"][:, :-1].astype(np.int32)
        batch["segment_ids"] = rows["tokens_segment_ids"][:, :-1].astype(np.int32)
    return batch


def pack_and_batch(documents: grain.IterDataset, data_cfg: DataConfig, batch_size: int,
                   drop_remainder: bool = True) -> grain.IterDataset:
    packed = grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={"tokens": data_cfg.seq_len + 1})
    batched = packed.batch(batch_size, drop_remainder=drop_remainder)
    return batched.map(lambda rows: rows_to_batch(rows, data_cfg.document_masking))


def train_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite training batches; each process reads its own slice of every global batch."""
    docs = open_documents(data_cfg, "train")
    if len(docs) == 0:
        raise ValueError(f"data.sources={data_cfg.sources}: the train split has no documents")
    batch_size = batch_size or data_cfg.batch_size
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size}: expected a multiple of the "
                         f"{process_count} processes")
    ds = grain.MapDataset.source(docs).shuffle(seed=data_cfg.seed).repeat()
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.map(Tokenize(tokenizer)).to_iter_dataset()
    return pack_and_batch(ds, data_cfg, batch_size // process_count)


def heldout_dataset(data_cfg: DataConfig, tokenizer: Tokenizer,
                    batch_size: int | None = None) -> grain.IterDataset:
    """Held-out batches in a fixed order (a fixed shuffle, so a few batches see many files)."""
    docs = open_documents(data_cfg, "heldout")
    if len(docs) == 0:
        raise ValueError(f"data.heldout_fraction={data_cfg.heldout_fraction}: the held-out "
                         "split has no documents")
    ds = grain.MapDataset.source(docs).shuffle(seed=12345).map(Tokenize(tokenizer))
    return pack_and_batch(ds.to_iter_dataset(), data_cfg, batch_size or data_cfg.batch_size)


def eval_datasets(data_cfg: DataConfig, tokenizer: Tokenizer,
                  batch_size: int | None = None) -> dict[str, grain.IterDataset]:
    """Named evaluation sets the training loop reports; 'heldout' (left-to-right loss on the
    held-out split) is the main one."""
    return {"heldout": heldout_dataset(data_cfg, tokenizer, batch_size)}


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
