"""Metrics to a JSONL file and TensorBoard event files (only on process 0)."""

from __future__ import annotations

import json
import math
import os

import sys

import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch at import time when it is installed (about 3.5 s per launch here),
    though writing scalars never needs it; so torch is hidden for the duration of that import
    unless something already imported it. A later `import torch` works as usual.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


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
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

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
