"""Jitted train and eval steps.

A global batch {'inputs', 'targets', 'loss_mask' [, 'positions', 'segment_ids']} of shape
[batch, length] is split into `accum` micro-batches (row i goes to micro-batch i % accum, so
each data shard contributes equally to each micro-batch); gradients of the micro-batches are
summed inside one `lax.scan`. The objective is the token-mean cross-entropy over the *whole*
batch, so k micro-batches give the same update as one big batch.

With `guard=True` (the default) a step whose loss or gradient norm is not finite leaves params,
optimizer state and model state as they were and reports `nonfinite` = 1 (jaxlm/train/guard.py:
what advances and what does not); `state.step` always advances.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm.train import guard as guard_lib
from jaxlm.train.losses import cross_entropy_sums
from jaxlm.train.state import TrainState

MODEL_INPUTS = ("positions", "segment_ids")


def split_micro_batches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...], row i into micro-batch i % accum."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def apply_model(model, params, model_state, batch: dict, *, deterministic: bool, rng=None):
    """Forward pass -> (logits, aux, new_model_state)."""
    variables = {"params": params, **model_state}
    kwargs = {k + "_bt": batch[k] for k in MODEL_INPUTS if k in batch}
    rngs = {"router": rng} if rng is not None else {}
    if model_state and not deterministic:
        (logits, aux), new_state = model.apply(variables, batch["inputs"], **kwargs,
                                               deterministic=False, rngs=rngs,
                                               mutable=list(model_state))
        return logits, aux, dict(new_state)
    logits, aux = model.apply(variables, batch["inputs"], **kwargs,
                              deterministic=deterministic, rngs=rngs)
    return logits, aux, model_state


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable, *,
                    accum_steps: int = 1, z_loss: float = 0.0, seed: int = 0,
                    guard: bool = True):
    base_rng = jax.random.key(seed)

    def train_step(state: TrainState, batch: dict):
        micro = split_micro_batches(batch, accum_steps)
        total_weight = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        step_rng = jax.random.fold_in(base_rng, state.step)

        def micro_step(carry, xs):
            grads_acc, model_state, sums = carry
            index, mb = xs

            def objective(params):
                logits, aux, new_state = apply_model(
                    model, params, model_state, mb, deterministic=False,
                    rng=jax.random.fold_in(step_rng, index))
                ce, z, _ = cross_entropy_sums(logits, mb["targets"], mb["loss_mask"], z_loss)
                aux_loss = sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
                value = (ce + z_loss * z) / total_weight + aux_loss / accum_steps
                return value, (ce, z, aux, new_state)

            grads, (ce, z, aux, new_state) = jax.grad(objective, has_aux=True)(state.params)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            sums = {"ce": sums["ce"] + ce, "z": sums["z"] + z,
                    "aux": jax.tree.map(lambda a, b: a + b / accum_steps, sums["aux"], aux)}
            return (grads_acc, new_state, sums), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        aux_shape = jax.eval_shape(
            lambda: apply_model(model, state.params, state.model_state,
                                jax.tree.map(lambda x: x[0], micro), deterministic=True)[1])
        sums0 = {"ce": jnp.zeros(()), "z": jnp.zeros(()),
                 "aux": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)}
        (grads, model_state, sums), _ = jax.lax.scan(
            micro_step, (zeros, state.model_state, sums0), (jnp.arange(accum_steps), micro))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = sums["ce"] / total_weight, optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "tokens": total_weight,
            **{f"aux/{k}": v for k, v in sums["aux"]["losses"].items()},
            **{f"model/{k}": v for k, v in sums["aux"]["metrics"].items()},
        }
        if z_loss:
            metrics["z_loss"] = sums["z"] / total_weight
        updated = (params, opt_state, model_state)
        if guard:
            finite = guard_lib.is_finite(loss, grad_norm, metrics.get("z_loss", 0.0))
            updated = guard_lib.keep_if_finite(
                finite, updated, (state.params, state.opt_state, state.model_state))
            metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
        params, opt_state, model_state = updated
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    return train_step


def make_eval_step(model):
    """(params, model_state, batch) -> (Σ CE, Σ tokens), so evaluations add up exactly."""

    def eval_step(params, model_state, batch):
        logits, _, _ = apply_model(model, params, model_state, batch, deterministic=True)
        ce, _, weight = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
        return ce, weight

    return eval_step


def jit_train_step(train_step, state_shardings, batch_sharding, metrics_sharding=None) -> Any:
    """One jit with explicit shardings and a donated state (metrics replicated when
    `metrics_sharding` is given, so every process can read them)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
