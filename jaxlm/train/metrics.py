"""Metrics to a JSONL file and TensorBoard event files (only on process 0)."""

from __future__ import annotations

import json
import math
import os

import numpy as np


def to_python(value):
    """Scalars to float; per-layer arrays to their mean (the JSONL stays one number per key)."""
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else float(array.mean())


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            record[key] = value if isinstance(value, str) else to_python(value)
            if not isinstance(value, str) and math.isfinite(record[key]):
                self._tb.add_scalar(key, record[key], int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
