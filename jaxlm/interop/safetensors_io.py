"""Streaming safetensors I/O: list a (possibly sharded) checkpoint, read tensors in row chunks,
write tensors one at a time.

Reading goes through `safetensors.safe_open(framework="numpy")`. Its NumPy backend has no
bfloat16 (NumPy lacks the type), so BF16 tensors are read from the raw bytes at the offsets of
the file header and widened with `ml_dtypes` (installed with JAX). Writing is our own ~30 lines of
the documented format (8-byte little-endian header length, JSON header, raw little-endian data)
so that a model is written tensor by tensor: `safetensors.numpy.save_file` would need the whole
converted state dict in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F32, BF16, ...


def list_tensors(model_dir: str) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `model_dir` (single file or sharded with an index)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: expected a 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ValueError(f"{model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin "
                         "checkpoints are pickles and are not read)")
    out: dict[str, StoredTensor] = {}
    for name in files:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise ValueError(f"{index_path}: shard {name!r} is listed but missing")
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    continue  # the index is authoritative when a tensor appears twice
                piece = f.get_slice(key)
                out[key] = StoredTensor(key, path, tuple(piece.get_shape()), piece.get_dtype())
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in out:
                raise ValueError(f"{index_path}: tensor {key!r} is mapped to {name!r} but not "
                                 "stored there")
    return out


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


class Reader:
    """Reads stored tensors (whole or a range of rows of axis 0; at least 1-D) as float32 NumPy
    arrays, keeping one open handle per shard."""

    def __init__(self):
        self._open: dict[str, object] = {}
        self._headers: dict[str, tuple[dict, int]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def rows(self, t: StoredTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = t.shape[0] if stop is None else stop
        if t.dtype == "BF16":
            return self._raw_rows(t, start, stop).astype(np.float32)
        if t.file not in self._open:
            handle = safe_open(t.file, framework="numpy")
            self._open[t.file] = handle.__enter__()
        return np.asarray(self._open[t.file].get_slice(t.name)[start:stop], dtype=np.float32)

    def _raw_rows(self, t: StoredTensor, start: int, stop: int) -> np.ndarray:
        if t.file not in self._headers:
            self._headers[t.file] = _header(t.file)
        header, data_start = self._headers[t.file]
        begin, _ = header[t.name]["data_offsets"]
        row = int(np.prod(t.shape[1:], dtype=np.int64))
        dtype = np.dtype(DTYPES[t.dtype])
        flat = np.fromfile(t.file, dtype=dtype, count=(stop - start) * row,
                           offset=data_start + begin + start * row * dtype.itemsize)
        return flat.reshape((stop - start,) + t.shape[1:])


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape, dtype, and a function producing its value."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: str, tensors: list[PlannedTensor]) -> None:
    """Writes one safetensors file, computing and writing one tensor at a time."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            value = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if value.shape != t.shape:
                raise ValueError(f"tensor {t.name!r}: produced shape {value.shape}, planned "
                                 f"{t.shape}")
            f.write(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def shard(tensors: list[PlannedTensor], max_shard_bytes: int | None) -> list[list[PlannedTensor]]:
    """Greedy split into shards of at most `max_shard_bytes` (one tensor may exceed it alone)."""
    if not max_shard_bytes:
        return [tensors]
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_checkpoint(out_dir: str, tensors: list[PlannedTensor],
                     max_shard_bytes: int | None = None) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index; returns the file names."""
    shards = shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_file(os.path.join(out_dir, SINGLE_FILE), shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, group in zip(names, shards):
        write_file(os.path.join(out_dir, name), group)
        weight_map.update({t.name: name for t in group})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_FILE]


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of at most ~chunk_bytes covering `rows` rows."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    for start in range(0, max(rows, 1), step):
        yield start, min(start + step, rows)
