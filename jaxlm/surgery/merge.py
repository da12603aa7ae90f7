"""Model merging on parameter trees (SPEC §F): linear / uniform soup, SLERP, task arithmetic, TIES.

Every function takes nested dicts of arrays with identical structure and shapes (checked first,
with a one-line error naming the first differing path), computes in float64 and returns NumPy
arrays in the inputs' dtype. Operations that look at a whole tensor (SLERP's angle, TIES's
magnitude trim) treat each *layer* as its own tensor, as mergekit does on HF checkpoints: leaves
under `blocks` are stacked over the repeats of the layer pattern, so they are processed slice by
slice along that leading axis. Global layer l is slot l % P, repeat l // P (P slots in `blocks`),
which is how a per-layer SLERP `layer_t` lines up with the stacked axis.

Merged models must also share a config; `check_same_config` names the first differing field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

Tree = Mapping[str, Any]
STACKED = "blocks"  # the decoder's scanned (per-layer stacked) subtree


# ---- structure -------------------------------------------------------------------------------

def _flatten(tree: Tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def check_same_structure(trees: Sequence[Tree], names: Optional[Sequence[str]] = None) -> None:
    """Raises ValueError naming the first path whose presence or shape differs."""
    names = list(names or [f"checkpoint {i}" for i in range(len(trees))])
    flats = [_flatten(t) for t in trees]
    first = flats[0]
    for name, flat in zip(names[1:], flats[1:]):
        for path in sorted(set(first) | set(flat)):
            where = "/".join(path)
            if path not in flat:
                raise ValueError(f"{name}: missing {where} (present in {names[0]})")
            if path not in first:
                raise ValueError(f"{name}: unexpected {where} (absent in {names[0]})")
            if np.shape(flat[path]) != np.shape(first[path]):
                raise ValueError(f"{name}: {where} has shape {list(np.shape(flat[path]))}, "
                                 f"{names[0]} has {list(np.shape(first[path]))}")


def check_same_config(configs: Sequence[Any]) -> None:
    """Configs (dataclasses, e.g. ModelConfig) must be equal; names the first differing field."""
    def fields(obj, prefix=""):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out.update(fields(value, f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = value
        return out

    first = fields(configs[0])
    for i, cfg in enumerate(configs[1:], 1):
        other = fields(cfg)
        for key in first:
            if first[key] != other.get(key):
                raise ValueError(f"model.{key} differs: {first[key]!r} (checkpoint 0) vs "
                                 f"{other.get(key)!r} (checkpoint {i}); merged checkpoints must "
                                 "share a config")


def _num_slots(tree: Tree) -> int:
    return len(tree.get(STACKED, {})) or 1


def _num_layers(tree: Tree) -> int:
    if STACKED not in tree:
        return 0
    some_leaf = next(iter(_flatten(tree[STACKED]).values()))
    return len(tree[STACKED]) * np.shape(some_leaf)[0]


def _map(fn: Callable[..., np.ndarray], trees: Sequence[Tree], per_layer: bool = False) -> dict:
    """Applies fn(*arrays_float64, layer=...) leafwise; with per_layer, once per layer slice of
    stacked leaves (layer = global index) and with layer=None for the others."""
    flats = [_flatten(t) for t in trees]
    period = _num_slots(trees[0])
    out = {}
    for path in flats[0]:
        dtype = np.asarray(flats[0][path]).dtype
        arrays = [np.asarray(f[path], np.float64) for f in flats]
        if per_layer and path[0] == STACKED:
            slot = int(path[1].rsplit("_", 1)[1])
            value = np.stack([fn(*(a[r] for a in arrays), layer=r * period + slot)
                              for r in range(arrays[0].shape[0])])
        else:
            value = fn(*arrays, layer=None)
        out[path] = np.asarray(value).astype(dtype)
    return _unflatten(out)


def _weights(values, count: int, what: str) -> np.ndarray:
    if values is None:
        return np.ones(count)
    values = np.atleast_1d(np.asarray(values, np.float64))
    if values.shape == (1,):
        values = np.repeat(values, count)
    if values.shape != (count,):
        raise ValueError(f"{what}: {values.size} values for {count} checkpoints")
    return values


# ---- merges ----------------------------------------------------------------------------------

def linear(trees: Sequence[Tree], weights: Optional[Sequence[float]] = None) -> dict:
    """θ = Σ w_k θ_k / Σ w_k (a uniform soup without weights)."""
    check_same_structure(trees)
    w = _weights(weights, len(trees), "linear weights")
    if w.sum() == 0:
        raise ValueError(f"linear weights={list(w)}: expected a non-zero sum")
    return _map(lambda *xs, layer: sum(wk * x for wk, x in zip(w, xs)) / w.sum(), trees)


def slerp_tensor(v0: np.ndarray, v1: np.ndarray, t: float, eps: float = 1e-8,
                 dot_threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation of two tensors treated as vectors; lerp when nearly parallel."""
    def unit(v):
        norm = np.linalg.norm(v)
        return v / norm if norm > eps else v

    dot = float(np.sum(unit(v0) * unit(v1)))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    sin_theta = np.sin(theta)
    return np.sin((1 - t) * theta) / sin_theta * v0 + np.sin(t * theta) / sin_theta * v1


def slerp(a: Tree, b: Tree, t: float, layer_t: Optional[Sequence[float]] = None) -> dict:
    """SLERP from `a` (t=0) to `b` (t=1), per tensor; `layer_t` (one value per layer) overrides
    t for the layer stack, t stays in force for embeddings, final norm and head."""
    check_same_structure([a, b])
    num_layers = _num_layers(a)
    values = [t] + list(layer_t if layer_t is not None else [])
    for i, value in enumerate(values):
        if not 0.0 <= value <= 1.0:
            where = "t" if i == 0 else f"layer_t[{i - 1}]"
            raise ValueError(f"slerp {where}={value}: expected 0 <= t <= 1")
    if layer_t is not None and len(layer_t) != num_layers:
        raise ValueError(f"slerp layer_t has {len(layer_t)} values: expected one per layer "
                         f"({num_layers})")

    def fn(v0, v1, layer):
        return slerp_tensor(v0, v1, t if layer is None or layer_t is None else layer_t[layer])

    return _map(fn, [a, b], per_layer=True)


def task_arithmetic(base: Tree, trees: Sequence[Tree],
                    scales: Optional[Sequence[float]] = None) -> dict:
    """θ = θ_base + Σ λ_k (θ_k − θ_base)."""
    check_same_structure([base, *trees], ["base"] + [f"model {i}" for i in range(len(trees))])
    lam = _weights(scales, len(trees), "task_arithmetic scales")
    return _map(lambda b, *xs, layer: b + sum(l * (x - b) for l, x in zip(lam, xs)),
                [base, *trees])


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    """Keeps the int(density · size) largest-magnitude entries of one tensor, zeroes the rest."""
    keep = int(density * delta.size)
    if keep >= delta.size:
        return delta
    flat = delta.reshape(-1)
    out = np.zeros_like(flat)
    if keep > 0:
        top = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
        out[top] = flat[top]
    return out.reshape(delta.shape)


def ties(base: Tree, trees: Sequence[Tree], density: float,
         weights: Optional[Sequence[float]] = None, scale: float = 1.0) -> dict:
    """TIES-merging (Yadav et al. 2023): per tensor, trim each task vector τ_k = θ_k − θ_base to
    its top `density` fraction by magnitude, elect a sign per entry as sign(Σ w_k τ̂_k), average
    (weighted by w_k) only the entries that agree with it; θ = θ_base + scale · merged."""
    check_same_structure([base, *trees], ["base"] + [f"model {i}" for i in range(len(trees))])
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density={density}: expected 0 < density <= 1")
    w = _weights(weights, len(trees), "ties weights")

    def fn(b, *xs, layer):
        deltas = np.stack([trim(x - b, density) for x in xs])
        wk = w.reshape((-1,) + (1,) * b.ndim)
        elected = np.sign(np.sum(wk * deltas, axis=0))
        agree = (np.sign(deltas) == elected) & (deltas != 0)
        total = np.sum(wk * agree, axis=0)
        merged = np.sum(wk * deltas * agree, axis=0) / np.where(total == 0, 1.0, total)
        return b + scale * merged

    return _map(fn, [base, *trees], per_layer=True)
