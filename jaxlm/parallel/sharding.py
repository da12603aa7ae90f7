"""Shardings derived from logical axis names: parameters, optimizer state, batches.

Parameters come out of `init` boxed in `nn.LogicallyPartitioned`; optax builds its state from
the boxed tree, so the moments carry the same names. `state_shardings` turns the names of an
abstract (eval_shape) tree into `NamedSharding`s through the rules table.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.parallel.rules import Rules


def logical_specs(boxed_tree):
    """PartitionSpecs of logical names (unboxed leaves get P())."""
    return nn.get_partition_spec(boxed_tree)


def mesh_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for every leaf of a boxed (possibly abstract) tree."""
    return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over data (and expert); the sequence axis replicated."""
    return NamedSharding(mesh, P(("data", "expert")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Context for tracing model code: `nn.with_logical_constraint` resolves through `rules`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
