"""Fine-tuning data: JSONL prompts with a completion (SFT) or a chosen/rejected pair (DPO).

    {"prompt": "def add(a, b):\\n", "completion": "    return a + b\\n"}                  sft
    {"prompt": "...", "chosen": "...", "rejected": "..."}                                 dpo

Every file is read and checked when the dataset is built (before a run writes anything); a
line that is not a JSON object, lacks a field or holds a non-string gets one error naming
`file:line` and the field.

One example is one row of `seq_len + 1` tokens, laid out as the pretraining stream is (documents
follow an <|endoftext|>):

    [EOT] prompt completion [EOT] pad ...        inputs = row[:-1], targets = row[1:]

`loss_mask` is 1 exactly where the target is a completion token or the closing EOT, so the
prompt (and padding) never contributes to the loss. Truncation, in this order:
  1. the prompt keeps its *last* `align.max_prompt_tokens` tokens (0: half of seq_len), the part
     nearest the completion;
  2. the row is cut on the right at `seq_len + 1` tokens, so an over-long completion loses its
     end and its closing EOT (the model is not taught to stop where the text was cut).
A DPO example applies this to both completions: leaves are [2, seq_len], index 0 chosen,
1 rejected, and a batch is [pairs, 2, seq_len] (a pair never straddles a data shard).

Rows split into train / held-out by a hash of `file-name:line` (as documents do). Training
visits the train rows in a fresh seeded order every epoch through grain, so the iterator's
`get_state()` / `set_state()` checkpoint its position; held-out batches come in file order, the
last one padded with empty rows (mask 0) so every held-out row counts once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import grain
import numpy as np

from jaxlm.data.pipeline import EpochOrder
from jaxlm.data.sources import in_heldout
from jaxlm.data.tokenizers import EOT, Tokenizer
from jaxlm.schema import ConfigError, field, section

FIELDS = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected")}


class PreferenceDataError(ValueError):
    """A fine-tuning data file that cannot be used; one line naming file:line and the field."""


@section
class AlignDataConfig:
    path: str = field("", "JSONL file or glob: {prompt, completion} rows for train.objective="
                      "'sft', {prompt, chosen, rejected} rows for 'dpo'")
    max_prompt_tokens: int = field(0, "prompt tokens kept (its last ones) before the "
                                   "completion (0: half of data.seq_len)", min=0)
    heldout_fraction: float = field(0.05, "fraction of rows held out for evaluation (split by "
                                    "a hash of file name and line)", min=0.0, max=0.5)
    seed: int = field(0, "shuffle seed of the row order", min=0)

    def prompt_budget(self, seq_len: int) -> int:
        return self.max_prompt_tokens or seq_len // 2

    def check(self, seq_len: int) -> None:
        """Cross-field checks against data.seq_len (called by the top-level config)."""
        if self.prompt_budget(seq_len) >= seq_len:
            raise ConfigError(f"align.max_prompt_tokens={self.max_prompt_tokens}: expected < "
                              f"data.seq_len={seq_len} (the completion needs a target)")


# ---- reading -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    name: str                  # "file.jsonl:line" (1-based), the split key and error location
    texts: tuple[str, ...]     # in the order of FIELDS[kind]


def read_rows(pattern: str, kind: str) -> list[Row]:
    """Every row of the JSONL files matching `pattern`, checked for the fields of `kind`."""
    if kind not in FIELDS:
        raise ConfigError(f"train.objective={kind!r}: expected one of {list(FIELDS)}")
    if not pattern:
        raise ConfigError(f"align.path='': expected a JSONL file of {'/'.join(FIELDS[kind])} "
                          f"rows with train.objective={kind!r}")
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise PreferenceDataError(f"align.path={pattern!r}: no files match")
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_parse(line, path, number, kind))
    if not rows:
        raise PreferenceDataError(f"align.path={pattern!r}: the files hold no rows")
    return rows


def _parse(line: str, path: str, number: int, kind: str) -> Row:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"{where}: not valid JSON ({e.msg})") from None
    expected = "{" + ", ".join(FIELDS[kind]) + "}"
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object {expected}")
    texts = []
    for name in FIELDS[kind]:
        if name not in record:
            raise PreferenceDataError(f"{where}: missing field '{name}' (expected {expected})")
        if not isinstance(record[name], str):
            raise PreferenceDataError(f"{where}: field '{name}' is "
                                      f"{type(record[name]).__name__}, expected a string")
        texts.append(record[name])
    return Row(f"{os.path.basename(path)}:{number}", tuple(texts))


def split_rows(rows: list[Row], split: str, heldout_fraction: float) -> list[Row]:
    want = split == "heldout"
    return [r for r in rows if in_heldout(r.name, heldout_fraction) == want]


# ---- encoding ----------------------------------------------------------------------------------

def encode_example(tokenizer: Tokenizer, prompt: str, completion: str, seq_len: int,
                   max_prompt_tokens: int) -> dict:
    """One row: {'inputs', 'targets' (int32), 'loss_mask' (float32)}, each [seq_len]."""
    eot = tokenizer.special_id(EOT)
    prompt_ids = np.asarray(tokenizer.encode(prompt), np.int32)
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_prompt_tokens):]
    completion_ids = np.asarray(tokenizer.encode(completion), np.int32)
    row = np.concatenate([[eot], prompt_ids, completion_ids, [eot]]).astype(np.int32)
    is_completion = np.zeros(len(row), np.float32)
    is_completion[1 + len(prompt_ids):] = 1.0
    row, is_completion = row[:seq_len + 1], is_completion[:seq_len + 1]
    pad = seq_len + 1 - len(row)
    row = np.pad(row, (0, pad))
    is_completion = np.pad(is_completion, (0, pad))
    return {"inputs": row[:-1], "targets": row[1:], "loss_mask": is_completion[1:]}


@dataclasses.dataclass(frozen=True)
class Encode:
    """Row -> SFT example [seq_len] or DPO pair [2, seq_len]."""

    tokenizer: Tokenizer
    kind: str
    seq_len: int
    max_prompt_tokens: int

    def __call__(self, row: Row) -> dict:
        prompt, *completions = row.texts
        examples = [encode_example(self.tokenizer, prompt, c, self.seq_len,
                                   self.max_prompt_tokens) for c in completions]
        if self.kind == "sft":
            return examples[0]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class _Pick:
    rows: tuple

    def __call__(self, element: tuple[int, int]) -> Row:
        return self.rows[element[1]]


def _encoder(cfg: AlignDataConfig, kind: str, tokenizer: Tokenizer, seq_len: int) -> Encode:
    cfg.check(seq_len)
    return Encode(tokenizer, kind, seq_len, cfg.prompt_budget(seq_len))


def train_dataset(cfg: AlignDataConfig, kind: str, tokenizer: Tokenizer, seq_len: int,
                  batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """Infinite batches of training rows (SFT: [batch, seq_len]; DPO: [batch, 2, seq_len]);
    each process reads its own slice of the rows and builds its share of every batch."""
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size}: expected a multiple of the "
                         f"{process_count} processes")
    encode = _encoder(cfg, kind, tokenizer, seq_len)
    rows = split_rows(read_rows(cfg.path, kind), "train", cfg.heldout_fraction)
    if not rows:
        raise PreferenceDataError(f"align.path={cfg.path!r}: no rows left for training after "
                                  f"align.heldout_fraction={cfg.heldout_fraction}")
    ds = grain.MapDataset.range(len(rows)).repeat().map_with_index(EpochOrder(len(rows),
                                                                              cfg.seed))
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.map(_Pick(tuple(rows))).map(encode).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.batch(batch_size // process_count, drop_remainder=True)


def heldout_batches(cfg: AlignDataConfig, kind: str, tokenizer: Tokenizer, seq_len: int,
                    batch_size: int, max_batches: int | None = None) -> list[dict]:
    """The held-out rows in file order as full batches (the last padded with mask-0 rows)."""
    encode = _encoder(cfg, kind, tokenizer, seq_len)
    rows = split_rows(read_rows(cfg.path, kind), "heldout", cfg.heldout_fraction)
    if not rows:
        raise PreferenceDataError(f"align.heldout_fraction={cfg.heldout_fraction}: the "
                                  f"held-out split of {cfg.path!r} has no rows")
    if max_batches is not None:
        rows = rows[:max_batches * batch_size]
    examples = [encode(r) for r in rows]
    empty = {k: np.zeros_like(v) for k, v in examples[0].items()}
    examples += [empty] * (-len(examples) % batch_size)
    return [{k: np.stack([e[k] for e in examples[i:i + batch_size]]) for k in empty}
            for i in range(0, len(examples), batch_size)]
