"""The decoding cache of a whole model: preallocated, stacked like the parameters.

    cache = init_cache(cfg, batch=4, length=256)
    logits, aux = model.apply(variables, tokens, positions, segment_ids, cache=cache)
    cache = aux["cache"]

Layout (R = repeats of the layer pattern, the leading `layers` axis of every block param):

    index        []                 int32: columns written so far (the next write position)
    segment_ids  [b, S]             int32: 1 where a real token was written, 0 for padding or
                                    not-yet-written columns (attention masks those keys)
    blocks/slot_i (attention)  k [R, b, kv_heads, S, head_dim], v [R, b, kv_heads,
                               head_dim, S] in the compute dtype (each with the axis its
                               einsum contracts last, the layout XLA:CPU's matmul wants for
                               its right operand: no per-step transpose of the cache);
                               absent until the first write ({} from `init_cache`: a
                               prefill attends among its own tokens and allocates them)
    blocks/slot_i (mamba)      conv_x [R, b, K, Hm, P], conv_B / conv_C [R, b, K, G, N]
                               (compute dtype), ssm [R, b, Hm, P, N] float32

With per-repeat variables (`jaxlm.models.decoder.unstack_layers`) the cache mirrors them:
`blocks_0/slot_i`, `blocks_1/slot_i`, ... with the same leaves minus the leading R axis.

All rows share one write index: ragged prompts are left-padded (segment id 0) and carry their
own positions, so a step writes one column for the whole batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig

K_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")
V_AXES = ("layers", "batch", "kv_heads", "head_dim", "length")
SSM_AXES = {"conv_x": ("layers", "batch", "conv", "ssm_heads", "head_dim"),
            "conv_B": ("layers", "batch", "conv", None, "state"),
            "conv_C": ("layers", "batch", "conv", None, "state"),
            "ssm": ("layers", "batch", "ssm_heads", "head_dim", "state")}


def init_cache(cfg: ModelConfig, batch: int, length: int, *, allocate: bool = False,
               per_repeat: bool = False) -> dict:
    """An empty cache for `batch` rows of up to `length` positions. Attention slots stay {}
    (allocated by the first forward pass, so a prefill neither computes scores against zeros
    nor lets XLA constant-fold them) unless `allocate`; Mamba slots are zero states.
    `per_repeat`: the layout for per-repeat variables (`blocks_r` trees, no leading R)."""
    dtype = jnp.dtype(cfg.dtype)
    lead = () if per_repeat else (cfg.num_repeats,)
    slots = {}
    for slot, kind in enumerate(cfg.pattern):
        if kind == "attention":
            k_shape = lead + (batch, cfg.kv_heads, length, cfg.head_size)
            v_shape = lead + (batch, cfg.kv_heads, cfg.head_size, length)
            slots[f"slot_{slot}"] = ({"k": jnp.zeros(k_shape, dtype),
                                      "v": jnp.zeros(v_shape, dtype)} if allocate else {})
        else:
            from jaxlm.layers.ssm import init_ssm_cache
            one = init_ssm_cache(cfg.ssm, batch, dtype)
            slots[f"slot_{slot}"] = jax.tree.map(lambda x: jnp.broadcast_to(x, lead + x.shape),
                                                 one)
    cache = {"index": jnp.zeros((), jnp.int32),
             "segment_ids": jnp.zeros((batch, length), jnp.int32)}
    if per_repeat:
        cache.update({f"blocks_{r}": slots for r in range(cfg.num_repeats)})
    else:
        cache["blocks"] = slots
    return cache


def cache_logical_axes(cfg: ModelConfig, per_repeat: bool = False) -> dict:
    """Logical axis names of every cache leaf (the same tree as `init_cache` with allocated
    attention slots): batch over data, attention kv heads and Mamba heads over tensor, by
    the rules table."""
    drop = 1 if per_repeat else 0
    slots = {}
    for slot, kind in enumerate(cfg.pattern):
        axes = {"k": K_AXES, "v": V_AXES} if kind == "attention" else dict(SSM_AXES)
        slots[f"slot_{slot}"] = {key: names[drop:] for key, names in axes.items()}
    out = {"index": (), "segment_ids": ("batch", "length")}
    if per_repeat:
        out.update({f"blocks_{r}": slots for r in range(cfg.num_repeats)})
    else:
        out["blocks"] = slots
    return out


def constrain_cache(cache: dict, cfg: ModelConfig) -> dict:
    """Sharding constraints on the cache's arrays (no-ops outside a logical-axis-rules
    context); absent attention entries stay absent."""
    axes = cache_logical_axes(cfg, per_repeat="blocks" not in cache)

    def walk(node, names):
        if isinstance(node, dict):
            return {key: walk(value, names[key]) for key, value in node.items()}
        return nn.with_logical_constraint(node, names)

    return walk(cache, axes)


def cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    """Bytes of a full cache for `batch` rows of `length` positions."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length, allocate=True))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
