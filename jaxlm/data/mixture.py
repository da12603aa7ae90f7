"""Weighted mixtures of row streams whose weights change at optimizer-step boundaries.

    StagedMixture(row_streams, schedule=((0, (0.7, 0.3)), (1000, (0.2, 0.8))), batch_size=16)

yields one batch (rows stacked) per optimizer step. Batch i is drawn entirely under the stage
active at step i (the last stage whose start_step <= i), so a switch happens at exactly the
configured step, however many rows a step takes.

The unit of mixing is a packed row (seq_len + 1 tokens of one source), so weights are
fractions of training *tokens*, as in Megatron's blended datasets and the Yi recipe — not of
documents, which vary in length by orders of magnitude between sources.

Within a stage the choice of source is deterministic: row r goes to the source whose share is
furthest behind its weight (argmax_s w_s·(r+1) − count_s, Megatron's blending rule), so after
n rows every source is within one row of n·w_s. grain's own `IterDataset.mix` interleaves the
same way but with fixed weights that must all be non-zero; a stage schedule needs the weights
to change with the step and a zero weight to mean "not in this stage", hence this small grain
iterator. Sources keep their position across stages: a stage switch changes how often each
stream is read, not where it is.

State (`get_state`, JSON-serialisable): the step, the stage's row counts, and each source
stream's own grain state — so a run resumed from a checkpoint, before or after a boundary,
produces the same batches as one that never stopped. `set_state` also repairs what JSON does
to grain's packer state (`tuples_from_json`).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import grain
import numpy as np


def stage_at(schedule: Sequence[tuple[int, Sequence[float]]], step: int) -> int:
    """Index of the stage active at `step` (schedule sorted by start step, first start 0)."""
    return bisect.bisect_right([start for start, _ in schedule], step) - 1


def pick_source(weights: Sequence[float], counts: Sequence[int]) -> int:
    """The source furthest behind its share: argmax_s w_s·(n+1) − counts_s, n = Σ counts
    (ties to the lowest index). A zero-weight source is never picked."""
    n = sum(counts) + 1
    best, best_gap = -1, -np.inf
    for s, (w, c) in enumerate(zip(weights, counts)):
        if w > 0 and w * n - c > best_gap:
            best, best_gap = s, w * n - c
    return best


def tuples_from_json(state: Any) -> Any:
    """Undoes what a JSON round trip does to grain's ConcatThenSplit state.

    The packer marks "no remainder" with the slice sentinel (-1, -1) and compares with `!=`;
    JSON (orbax's JsonSave) turns the tuple into [-1, -1], which compares unequal, so a restored
    packer would think it holds an empty remainder and silently skip one document. Every
    `remainder_slices` entry is turned back into a tuple."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in value.items()} if k == "remainder_slices"
                    else tuples_from_json(value)) for k, value in state.items()}
    if isinstance(state, list):
        return [tuples_from_json(v) for v in state]
    return state


def stack_rows(rows: list[dict]) -> dict:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class StagedMixtureIterator(grain.DatasetIterator):
    def __init__(self, parents: Sequence[grain.DatasetIterator],
                 schedule: tuple[tuple[int, tuple[float, ...]], ...], batch_size: int):
        super().__init__(list(parents))
        self._schedule = schedule
        self._batch_size = batch_size
        self._step = 0
        self._stage = 0
        self._counts = [0] * len(parents)

    def __next__(self) -> dict:
        stage = stage_at(self._schedule, self._step)
        if stage != self._stage:
            self._stage, self._counts = stage, [0] * len(self._parents)
        weights = self._schedule[stage][1]
        rows = []
        for _ in range(self._batch_size):
            s = pick_source(weights, self._counts)
            self._counts[s] += 1
            rows.append(next(self._parents[s]))
        self._step += 1
        batch = stack_rows(rows)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "stage": self._stage, "counts": list(self._counts),
                "sources": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        for parent, parent_state in zip(self._parents, state["sources"]):
            parent.set_state(tuples_from_json(parent_state))
        self._step, self._stage = int(state["step"]), int(state["stage"])
        self._counts = [int(c) for c in state["counts"]]

    @property
    def step(self) -> int:
        """Batches produced so far (= the optimizer step of the next batch)."""
        return self._step


class StagedMixture(grain.IterDataset):
    """Batches of `batch_size` rows from `parents` (infinite row streams of one structure),
    mixed by the weights of the stage active at each batch's step."""

    def __init__(self, parents: Sequence[grain.IterDataset],
                 schedule: tuple[tuple[int, tuple[float, ...]], ...], batch_size: int):
        super().__init__(list(parents))
        if not schedule or schedule[0][0] != 0:
            raise ValueError(f"stage schedule {schedule}: expected a first stage at step 0")
        for start, weights in schedule:
            if len(weights) != len(parents):
                raise ValueError(f"stage at step {start}: weights {weights} expected one per "
                                 f"source ({len(parents)})")
            if min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"stage at step {start}: weights {weights} expected "
                                 "non-negative with a positive sum")
        self._schedule = tuple((int(start), tuple(float(w) / sum(weights) for w in weights))
                               for start, weights in schedule)
        self._batch_size = batch_size

    def __iter__(self) -> StagedMixtureIterator:
        return StagedMixtureIterator([p.__iter__() for p in self._parents], self._schedule,
                                     self._batch_size)
