"""An audit log of the data order: one line per training step with a hash of its batch.

    <workdir>/batches.jsonl        {"step": 0, "batch": "3f2a…"}   (process 0's rows)
    <workdir>/batches.<p>.jsonl    the same for process p > 0

Lines are appended and flushed as batches are drawn, so after a crash and a resume a step can
appear more than once; the last line of each step is the batch that the final state saw. Two
runs saw the same data in the same order iff their last-per-step hashes agree.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np


def batch_hash(batch: dict) -> str:
    """SHA-256 (first 16 hex digits) over every array of the batch: key, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        array = np.ascontiguousarray(np.asarray(batch[key]))
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def log_path(workdir: str, process_index: int = 0) -> str:
    name = "batches.jsonl" if process_index == 0 else f"batches.{process_index}.jsonl"
    return os.path.join(workdir, name)


def read(path: str) -> dict[int, str]:
    """step -> hash of the batch the run kept for that step (the last line of each step)."""
    seen: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                seen[int(record["step"])] = record["batch"]
    return dict(sorted(seen.items()))


class BatchLog:
    def __init__(self, path: str | None):
        self._file = open(path, "a", encoding="utf-8") if path else None

    def write(self, step: int, batch: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": int(step), "batch": batch_hash(batch)}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
