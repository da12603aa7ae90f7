"""Checks that turn sharding mistakes into one-line errors before anything compiles.

Left alone, a dimension that does not divide its mesh axis surfaces as a long XLA/pjit
traceback at the first jit call, naming neither the parameter nor the config field. These
checks name both.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec as P


class ShardingError(ValueError):
    """A mesh, rule or shape that cannot be sharded as asked (one line, names the culprit)."""


def path_str(path) -> str:
    """'params/blocks/slot_0/attention/q_proj/kernel' for a pytree key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(abstract_tree, shardings, mesh: Mesh) -> None:
    """Every dimension of every leaf divides the product of the mesh axes it is split over.

    `abstract_tree` may be boxed (nn.Partitioned, so the message can name the logical axis) or
    plain; `shardings` is the matching tree of NamedShardings."""
    logical = nn.get_partition_spec(abstract_tree)
    values = nn.unbox(abstract_tree)
    flat_values = jax.tree_util.tree_flatten_with_path(values)[0]
    flat_shardings = jax.tree.leaves(shardings)
    flat_logical = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    for (path, value), sharding, names in zip(flat_values, flat_shardings, flat_logical):
        names = tuple(names) + (None,) * (len(value.shape) - len(names))
        for dim, (size, entry) in enumerate(zip(value.shape, sharding.spec)):
            axes = _axes(entry)
            if not axes:
                continue
            split = 1
            for axis in axes:
                split *= mesh.shape[axis]
            if size % split:
                named = f" ({names[dim]})" if names[dim] else ""
                over = " × ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ShardingError(
                    f"{path_str(path)}: dim {dim}{named} of size {size} is not divisible by "
                    f"mesh axis {over}; expected parallel.{axes[0]} to divide {size}, or a "
                    f"parallel.rules override for '{names[dim] or dim}'")


def check_batch(batch_size: int, accum_steps: int, mesh: Mesh) -> None:
    """Each micro-batch splits evenly over the batch axes (data × expert)."""
    split = mesh.shape["data"] * mesh.shape["expert"]
    micro = batch_size // accum_steps
    if micro % split:
        raise ShardingError(
            f"data.batch_size={batch_size}: {micro} rows per micro-batch (÷ "
            f"train.grad_accum_steps={accum_steps}) is not a multiple of the mesh's "
            f"data × expert = {split} devices")


def check_processes(mesh: Mesh) -> None:
    """In a multi-process run every process owns whole rows of the batch: the mesh spans all
    devices and the tensor axis stays inside one process."""
    count = jax.process_count()
    if count == 1:
        return
    if mesh.devices.size != jax.device_count():
        raise ShardingError(
            f"mesh of {mesh.devices.size} devices: a {count}-process run must use all "
            f"{jax.device_count()} devices (set parallel.data=-1)")
    batch_groups = mesh.shape["data"] * mesh.shape["expert"]
    if batch_groups % count:
        raise ShardingError(
            f"parallel.data × parallel.expert = {batch_groups}: expected a multiple of the "
            f"{count} processes (keep parallel.tensor within one process's devices)")
