"""Hugging Face checkpoints <-> jaxlm (config + stacked params), streamed tensor by tensor.

    cfg, params = import_hf("path/to/hf_model")      # config.json + safetensors (sharded or not)
    export_hf(cfg, params, "path/to/new_dir")         # loads with AutoModelForCausalLM

Import allocates every jaxlm parameter once (float32 NumPy arrays with the stacked `layers` axis)
and copies each stored tensor straight into its slice, in row chunks of at most `chunk_bytes`
through `safe_open`, so peak memory is the parameters plus one chunk. Names, shapes and the
tensor set are checked against the family's table before anything is allocated. The returned
params are NumPy arrays in the layout of `nn.unbox(init_params(Decoder(cfg), rng))`; pass them to
`model.apply` as they are or `jax.device_put` them with shardings.

Export writes config.json (readable by transformers 4.57 and 5.x) and safetensors into a hidden
temporary directory next to `out_dir` and renames it into place at the end: a failure leaves no
`out_dir` at all, and an existing non-empty `out_dir` is refused.

Families live in their own modules as tables (`tables.py` explains the rows); register new ones
in FAMILIES.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from jaxlm.interop import granite, llama, mamba2, mixtral, stablelm
from jaxlm.interop.safetensors_io import (PlannedTensor, Reader, StoredTensor, list_tensors,
                                          row_chunks, write_checkpoint)
from jaxlm.interop.tables import Family, Tensor
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder, init_params
from jaxlm.schema import from_config_dict

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, stablelm.FAMILY, mixtral.FAMILY,
                                                   mamba2.FAMILY, granite.FAMILY)}
# Stored tensors that transformers itself ignores on load (old checkpoints kept RoPE buffers).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
CHUNK_BYTES = 16 << 20


def family_for_architecture(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    for family in FAMILIES.values():
        for arch in archs:
            if arch in family.architectures:
                return family
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ValueError(f"config.json architectures={archs!r}: unknown architecture; expected one "
                     f"of {known}")


def family_for_config(cfg: ModelConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family={cfg.family!r}: no Hugging Face converter yet; expected "
                         f"one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.family]


def param_shapes(cfg: ModelConfig) -> dict:
    """The jaxlm parameter tree of `cfg` as ShapeDtypeStructs (nothing is allocated)."""
    model = Decoder(cfg)
    return jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))


# ---- the plan: every (HF tensor, jaxlm slice) pair of a config --------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    row: Tensor
    path: tuple[str, ...]  # full jaxlm path
    index: tuple[int, ...]  # position on the leading (layers, count) axes of the leaf


def _leaf(tree: Mapping, path: Sequence[str]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def plan(cfg: ModelConfig, family: Family, shapes: Mapping) -> dict[str, list[Placement]]:
    """HF tensor name -> the jaxlm slices it fills, checked to cover `shapes` exactly once."""
    placements: dict[str, list[Placement]] = collections.defaultdict(list)

    def add(row: Tensor, name: str, path: tuple[str, ...], index: tuple[int, ...]):
        placements[name].append(Placement(row, path, index))

    for row in family.global_tensors(cfg):
        if row.count:
            for j in range(row.count):
                add(row, row.hf.format(index=j), row.path, (j,))
        else:
            add(row, row.hf, row.path, ())
    period = len(cfg.layer_pattern)
    for layer, kind in enumerate(cfg.layer_kinds):
        slot, repeat = layer % period, layer // period
        for row in family.layer_tensors(cfg, kind):
            path = ("blocks", f"slot_{slot}") + row.path
            for j in range(max(row.count, 1)):
                index = (repeat, j) if row.count else (repeat,)
                add(row, row.hf.format(layer=layer, index=j), path, index)
    _check_coverage(family, placements, shapes)
    return dict(placements)


def _check_coverage(family: Family, placements, shapes) -> None:
    seen: dict[tuple[str, ...], set] = collections.defaultdict(set)
    leaves = _flatten(shapes)
    for name, group in placements.items():
        _check_parts(family, name, [p.row for p in group])
        for p in group:
            leaf = leaves.get(p.path)
            where = f"{family.name} converter row {name!r}"
            if leaf is None:
                raise ValueError(f"{where}: jaxlm has no parameter {'/'.join(p.path)}")
            if p.index in seen[p.path]:
                raise ValueError(f"{where}: {'/'.join(p.path)}{list(p.index)} is filled twice")
            seen[p.path].add(p.index)
            slice_shape = leaf.shape[len(p.index):]
            if int(np.prod(slice_shape)) != int(np.prod(p.row.piece_shape)):
                raise ValueError(f"{where}: HF shape {p.row.piece_shape} does not fit "
                                 f"{'/'.join(p.path)} slice {slice_shape}")
    for path, leaf in leaves.items():
        depth = len(next(iter(seen[path]))) if seen.get(path) else 0
        expected = int(np.prod(leaf.shape[:depth])) if depth else 1
        if len(seen.get(path, ())) != expected:
            raise ValueError(f"{family.name} converter does not fill jaxlm parameter "
                             f"{'/'.join(path)} {list(leaf.shape)}")


def _check_parts(family: Family, name: str, rows: list[Tensor]) -> None:
    """One HF tensor is either one row, or fused rows whose ranges tile one axis."""
    where = f"{family.name} converter row {name!r}"
    if len(rows) == 1 and rows[0].part is None:
        return
    if any(r.part is None for r in rows) or len({(r.shape, r.part[0]) for r in rows}) != 1:
        raise ValueError(f"{where}: filled by several rows that are not parts of one axis")
    axis, end = rows[0].part[0], 0
    for r in sorted(rows, key=lambda r: r.part[1]):
        if r.part[1] != end:
            raise ValueError(f"{where}: parts leave a gap or overlap at {end} on axis {axis}")
        end = r.part[2]
    if end != rows[0].shape[axis]:
        raise ValueError(f"{where}: parts end at {end}, the tensor's axis {axis} has "
                         f"{rows[0].shape[axis]}")


def _slice_view(dest: np.ndarray, p: Placement) -> np.ndarray:
    """`dest[index]` reshaped to the HF piece in jaxlm axis order; always a view into `dest`."""
    piece = p.row.piece_shape
    view = dest[p.index].reshape(tuple(piece[a] for a in p.row.axes))
    if view.flags.owndata:  # reshape had to copy: writes would be lost
        raise RuntimeError(f"{'/'.join(p.path)}: slice is not contiguous")
    return view


def _piece(array: np.ndarray, row: Tensor) -> np.ndarray:
    if row.part is None:
        return array
    axis, start, stop = row.part
    return np.take(array, np.arange(start, stop), axis=axis)


# ---- import -----------------------------------------------------------------------------------

def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{model_dir}: no config.json")
    with open(path) as f:
        return json.load(f)


def config_from_hf(hf: dict) -> ModelConfig:
    """The jaxlm ModelConfig of an HF config.json dict (validated, one-line errors)."""
    return from_config_dict(ModelConfig, family_for_architecture(hf).config_from_hf(hf))


def _check_stored(model_dir: str, cfg: ModelConfig, family: Family,
                  placements: Mapping[str, list[Placement]],
                  stored: Mapping[str, StoredTensor]) -> list[StoredTensor]:
    """The stored tensors to read; raises on a missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(placements) - set(stored))
    if missing:
        raise ValueError(f"{model_dir}: missing tensor {missing[0]!r} "
                         f"({len(missing)} missing in all)")
    to_read = []
    for name, t in stored.items():
        if name not in placements:
            if IGNORED.search(name) or (cfg.tie_embeddings and name == family.head_name):
                continue
            raise ValueError(f"{model_dir}: unexpected tensor {name!r} for "
                             f"{family.export_architecture} with this config.json")
        expected = placements[name][0].row.shape
        if t.shape != expected:
            raise ValueError(f"{model_dir}: tensor {name!r} has shape {list(t.shape)}, expected "
                             f"{list(expected)}")
        to_read.append(t)
    return sorted(to_read, key=lambda t: (t.file, t.name))


def import_hf(model_dir: str, chunk_bytes: int = CHUNK_BYTES) -> tuple[ModelConfig, dict]:
    """Reads an HF model directory into (ModelConfig, params as nested dicts of NumPy arrays)."""
    hf = read_config(model_dir)
    family = family_for_architecture(hf)
    cfg = config_from_hf(hf)
    shapes = param_shapes(cfg)
    placements = plan(cfg, family, shapes)
    to_read = _check_stored(model_dir, cfg, family, placements, list_tensors(model_dir))

    dtype = _np_dtype(cfg.param_dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, dtype), shapes)
    with Reader() as reader:
        for t in to_read:
            group = placements[t.name]
            if len(group) == 1 and group[0].row.part is None:
                _copy_in_chunks(reader, t, group[0], _leaf(params, group[0].path), chunk_bytes)
                continue
            whole = reader.rows(t)
            for p in group:
                _slice_view(_leaf(params, p.path), p)[...] = _piece(whole, p.row).transpose(
                    p.row.axes)
            del whole
    return cfg, params


def _copy_in_chunks(reader: Reader, t: StoredTensor, p: Placement, dest: np.ndarray,
                    chunk_bytes: int) -> None:
    view = _slice_view(dest, p)
    axis0 = p.row.axes.index(0)  # where HF rows land in the jaxlm-ordered view
    row_bytes = int(np.prod(t.shape[1:], dtype=np.int64)) * 4
    for start, stop in row_chunks(t.shape[0], row_bytes, chunk_bytes):
        target = [slice(None)] * view.ndim
        target[axis0] = slice(start, stop)
        view[tuple(target)] = reader.rows(t, start, stop).transpose(p.row.axes)


# ---- export -----------------------------------------------------------------------------------

def _check_params(cfg: ModelConfig, params: Mapping, shapes: Mapping) -> None:
    have, want = _flatten(params), _flatten(shapes)
    for path, s in want.items():
        if path not in have:
            raise ValueError(f"params: missing {'/'.join(path)} (expected by model config)")
        if tuple(np.shape(have[path])) != tuple(s.shape):
            raise ValueError(f"params: {'/'.join(path)} has shape {list(np.shape(have[path]))}, "
                             f"expected {list(s.shape)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"params: unexpected {'/'.join(extra[0])} for this model config")


def _hf_value(params: Mapping, group: list[Placement], dtype) -> np.ndarray:
    """Assembles one HF tensor from its jaxlm slices (pieces concatenated for fused tensors)."""
    pieces = []
    for p in sorted(group, key=lambda p: p.row.part[1] if p.row.part else 0):  # by start
        value = np.asarray(_leaf(params, p.path)[p.index])
        piece = p.row.piece_shape
        value = value.reshape(tuple(piece[a] for a in p.row.axes))
        pieces.append(value.transpose(np.argsort(p.row.axes)))
    row = group[0].row
    whole = pieces[0] if row.part is None else np.concatenate(pieces, axis=row.part[0])
    return whole.astype(dtype, copy=False)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def hf_config(cfg: ModelConfig, extra_config: Optional[Mapping[str, Any]] = None) -> dict:
    """The config.json dict `export_hf` writes (raises if `cfg` has no HF equivalent)."""
    family = family_for_config(cfg)
    out = family.config_to_hf(cfg)
    out["torch_dtype"] = out["dtype"] = cfg.param_dtype
    out.update(extra_config or {})
    return out


def export_hf(cfg: ModelConfig, params: Mapping, out_dir: str, *,
              max_shard_bytes: Optional[int] = None,
              extra_config: Optional[Mapping[str, Any]] = None,
              copy_files: Iterable[str] = ()) -> str:
    """Writes `out_dir` with config.json + safetensors that transformers loads; returns out_dir.

    extra_config: config.json fields to add (e.g. bos/eos token ids of the tokenizer).
    copy_files: files copied in as they are (e.g. tokenizer.json).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: already exists and is not empty; export never overwrites")
    copy_files = list(copy_files)
    for path in copy_files:
        if not os.path.isfile(path):
            raise ValueError(f"copy_files: {path!r} is not a file")
    config_json = hf_config(cfg, extra_config)
    family = family_for_config(cfg)
    params = jax.tree.map(np.asarray, params)  # host arrays once (no copy for NumPy inputs)
    shapes = param_shapes(cfg)
    _check_params(cfg, params, shapes)
    placements = plan(cfg, family, shapes)
    dtype = _np_dtype(cfg.param_dtype)
    planned = [PlannedTensor(name, group[0].row.shape, dtype,
                             lambda group=group: _hf_value(params, group, dtype))
               for name, group in placements.items()]

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.partial-")
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
        write_checkpoint(tmp, planned, max_shard_bytes)
        for path in copy_files:
            shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
        os.rename(tmp, out_dir)  # atomic; replaces an empty out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
