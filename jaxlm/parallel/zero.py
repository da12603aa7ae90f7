"""ZeRO stages as a rewrite of the train state's shardings.

The rules table gives every parameter its tensor/expert sharding; the ZeRO stage then decides
what is *also* split over `data`:

    zero=0  nothing: parameters and optimizer state are replicated over data
    zero=1  optimizer state (Adam's mu and nu): each leaf adds `data` on its largest remaining
            dimension divisible by the data size, so a device keeps 1/data of the moments.
            Parameters and gradients stay replicated over data; XLA reduces the gradients,
            updates each moment shard, and all-gathers the new parameters.
    zero=3  parameters too (FSDP): XLA all-gathers each layer's weights where they are used.

"Remaining" means a dimension the rules left unsharded. Among those, the `layers` axis of a
scanned stack is taken only when nothing else divides: splitting the stack by layer would make
the scan gather every layer's weights at once, which is what FSDP exists to avoid. A leaf with
no divisible dimension (a scalar count, a tiny bias) stays replicated.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
STAGES = (0, 1, 3)


def _used_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def add_data_axis(shape: tuple[int, ...], spec: P, logical: P | None, data_size: int) -> P:
    """`spec` with `data` added on the best free dimension of `shape`, or `spec` unchanged."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if data_size == 1 or any(DATA in _used_axes(e) for e in entries):
        return P(*entries)
    names = list(logical or ()) + [None] * (len(shape) - len(logical or ()))
    candidates = [d for d, (entry, size) in enumerate(zip(entries, shape))
                  if entry is None and size % data_size == 0]
    if not candidates:
        return P(*entries)
    best = min(candidates, key=lambda d: (names[d] == "layers", -shape[d], d))
    entries[best] = DATA
    return P(*entries)


def _shard_tree(abstract_tree, shardings_tree, mesh: Mesh):
    data_size = mesh.shape[DATA]
    logical = nn.get_partition_spec(abstract_tree)
    values = nn.unbox(abstract_tree)

    def one(value, sharding, names):
        spec = add_data_axis(tuple(value.shape), sharding.spec, names, data_size)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, values, shardings_tree, logical)


def zero_shardings(abstract_state, shardings, mesh: Mesh, stage: int):
    """Rewrites the NamedShardings of a TrainState for ZeRO `stage` (0, 1 or 3).

    `abstract_state` is the boxed eval_shape of the state (logical names on its leaves),
    `shardings` the rules' NamedShardings of the same tree."""
    if stage not in STAGES:
        raise ValueError(f"parallel.zero={stage}: expected one of {list(STAGES)}")
    if stage == 0:
        return shardings
    opt_state = _shard_tree(abstract_state.opt_state, shardings.opt_state, mesh)
    params = shardings.params
    if stage == 3:
        params = _shard_tree(abstract_state.params, shardings.params, mesh)
    return shardings.replace(params=params, opt_state=opt_state)


def transform(stage: int):
    """The `transform(abstract, shardings, mesh)` hook that `train.state.state_shardings`
    applies; None for stage 0."""
    if stage == 0:
        return None
    return functools.partial(zero_shardings, stage=stage)
