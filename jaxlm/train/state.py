"""The training state and its creation with shardings derived from logical axis names."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm.parallel import sharding, validate
from jaxlm.parallel.rules import Rules


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections the forward pass updates (e.g. router_state)


def _init_variables(model: nn.Module, rng: jax.Array, seq_len: int) -> dict:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init({"params": rng, "router": rng}, tokens)


def boxed_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                seq_len: int) -> TrainState:
    """A state whose leaves are still boxed with logical names (use under eval_shape)."""
    variables = dict(_init_variables(model, rng, seq_len))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=variables)


def abstract_state(model, tx, rng, seq_len) -> TrainState:
    return jax.eval_shape(lambda r: boxed_state(model, tx, r, seq_len), rng)


def state_shardings(model, tx, mesh: Mesh, rules: Rules, seq_len: int,
                    transform: Callable | None = None):
    """NamedShardings of every TrainState leaf. `transform(abstract_boxed_state, shardings,
    mesh)` may rewrite them (the ZeRO stages do: `jaxlm.parallel.zero.transform`). Every leaf
    is checked to divide its mesh axes here, before anything compiles."""
    abstract = abstract_state(model, tx, jax.random.key(0), seq_len)
    shardings = sharding.mesh_shardings(abstract, mesh, rules)
    if transform is not None:
        shardings = transform(abstract, shardings, mesh)
    validate.check_divisible(abstract, shardings, mesh)
    return shardings


def create_state(model, tx, rng: jax.Array, seq_len: int, shardings) -> TrainState:
    """Initialises parameters and optimizer state directly in their shardings."""
    return jax.jit(lambda r: nn.unbox(boxed_state(model, tx, r, seq_len)),
                   out_shardings=shardings)(rng)
