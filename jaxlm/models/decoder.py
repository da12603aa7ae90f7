"""The decoder stack shared by every family.

    tokens -> embed (× embedding_multiplier) -> blocks -> final norm -> logits (÷ logits_divisor)

`layer_pattern` (e.g. "A", or "MMMA") is one *block*: a run of layers, each a mixer (attention
or Mamba-2) followed by an FFN (dense SwiGLU, MoE, or none). The block repeats
`num_layers / len(pattern)` times through `nn.scan`, so every block parameter carries a leading
`layers` axis of that length and compile time does not grow with depth. Layer l of the model is
slot `l % len(pattern)` of repeat `l // len(pattern)`:

    params['blocks']['slot_0']['attention']['q_proj']['kernel']   # [repeats, embed, heads, head_dim]

`apply` returns `(logits, aux)`: aux['losses'] holds auxiliary loss terms (already multiplied by
their coefficients, averaged over layers) that training adds to the loss, aux['metrics'] holds
per-layer values to log (e.g. expert load). Non-parameter state that the forward pass updates
in training (the MoE selection bias of aux-loss-free balancing) lives in the `router_state`
collection: apply with `mutable=['router_state']` to get it back.

Decoding: `apply(params, tokens, positions, segment_ids, cache=cache)` (cache from
`jaxlm.infer.cache.init_cache`) runs the new tokens from the cached state and returns aux
with 'cache' too: attention layers hand back their new keys/values, written here into the
stacked cache (keys [repeats, b, g, S, k], values [repeats, b, g, k, S]) with one
dynamic_update_slice per slot, ordered after the layers' reads (in place inside a
jitted loop), Mamba layers their new conv/SSM state. An attention slot without 'k'/'v' (what
`init_cache` gives) holds nothing yet: its layers attend among the new tokens only and its
arrays are allocated at the first write. With variables from `unstack_layers` (one tree per
repeat, `blocks_0`, `blocks_1`, ...) the cached path runs the repeats one after another
instead of scanning, and the cache holds one tree per repeat too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.layers.attention import Attention
from jaxlm.layers.embed import Embedding
from jaxlm.layers.mlp import Dense, SwiGLU
from jaxlm.layers.norms import make_norm
from jaxlm.models.config import ModelConfig

REMAT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,
}


def remat_policy(name: str):
    if name == "offload":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return REMAT_POLICIES[name]


def dtype_of(name: str):
    return jnp.dtype(name)


def out_init_std(cfg: ModelConfig) -> float:
    """GPT-2 style: projections that write into the residual stream start smaller with depth."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class DecoderLayer(nn.Module):
    """One layer: mixer and FFN, each pre-normed and added to the residual stream."""

    cfg: ModelConfig
    kind: str  # 'attention' | 'mamba'

    def mixer(self, x_btd, positions_bt, segment_ids_bt, cache=None):
        """Mixer output, and with a cache also its new cache entries."""
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        if self.kind == "attention":
            return Attention(
                num_heads=cfg.num_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size,
                rope=cfg.rope if cfg.position_embedding == "rope" else None,
                scale=cfg.attention_scale, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, init_std=cfg.init_std,
                out_init_std=out_init_std(cfg), dtype=dtype, param_dtype=param_dtype,
                name="attention")(x_btd, positions_bt, segment_ids_bt, cache=cache)
        from jaxlm.layers.ssm import Mamba2  # the SSM room is optional for attention-only models
        return Mamba2(cfg.ssm, norm_eps=cfg.norm_eps, init_std=cfg.init_std,
                      out_init_std=out_init_std(cfg), dtype=dtype, param_dtype=param_dtype,
                      name="mamba")(x_btd, segment_ids_bt, cache=cache)

    def ffn(self, x_btd, deterministic):
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        if cfg.ffn == "mlp":
            return SwiGLU(cfg.mlp_dim, cfg.mlp_bias, cfg.init_std, out_init_std(cfg), dtype,
                          param_dtype, name="mlp")(x_btd), {}
        from jaxlm.layers.moe import MoE
        return MoE(cfg.moe, init_std=cfg.init_std, out_init_std=out_init_std(cfg), dtype=dtype,
                   param_dtype=param_dtype, name="moe")(x_btd, deterministic=deterministic)

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, deterministic, cache=None):
        cfg = self.cfg
        residual = cfg.residual_multiplier
        h_btd = make_norm(cfg.norm, cfg.norm_eps, "mixer_norm")(x_btd)
        mixed_btd = self.mixer(h_btd, positions_bt, segment_ids_bt, cache)
        if cache is not None:
            mixed_btd, new_cache = mixed_btd
        aux = {}
        if cfg.ffn == "none":
            x_btd = x_btd + residual * mixed_btd
        elif cfg.parallel_residual:
            ffn_btd, aux = self.ffn(h_btd, deterministic)
            x_btd = x_btd + residual * (mixed_btd + ffn_btd)
        else:
            x_btd = x_btd + residual * mixed_btd
            m_btd = make_norm(cfg.norm, cfg.norm_eps, "ffn_norm")(x_btd)
            ffn_btd, aux = self.ffn(m_btd, deterministic)
            x_btd = x_btd + residual * ffn_btd
        x_btd = nn.with_logical_constraint(x_btd.astype(dtype_of(cfg.dtype)),
                                           ("batch", "length", "embed"))
        if cache is not None:
            return x_btd, aux, new_cache
        return x_btd, aux


class Block(nn.Module):
    """One repeat of the layer pattern; the unit that `nn.scan` stacks."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, deterministic, cache=None,
                 context=None):
        """`cache`: this repeat's per-slot caches; `context`: the cache's index and
        segment_ids (shared by all layers). With a cache the scanned output is (auxes, new
        per-slot entries)."""
        auxes, new_caches = [], {}
        for slot, kind in enumerate(self.cfg.pattern):
            name = f"slot_{slot}"
            layer = DecoderLayer(self.cfg, kind, name=name)
            if cache is None:
                x_btd, aux = layer(x_btd, positions_bt, segment_ids_bt, deterministic)
            else:
                layer_cache = dict(cache[name], **context) if kind == "attention" else cache[name]
                x_btd, aux, new_caches[name] = layer(x_btd, positions_bt, segment_ids_bt,
                                                     deterministic, layer_cache)
            auxes.append(aux)
        if cache is None:
            return x_btd, auxes
        return x_btd, (auxes, new_caches)


def _gather_over_layers(stacked_auxes: list[dict]) -> dict:
    """Per-slot aux dicts (leaves stacked over repeats) -> losses averaged over the layers that
    report them; metrics kept per layer, shape [layers reporting it, ...] in slot-major order."""
    out: dict[str, Any] = {"losses": {}, "metrics": {}}
    for section in out:
        keys = sorted({k for aux in stacked_auxes for k in aux.get(section, {})})
        for k in keys:
            values = jnp.concatenate([aux[section][k] for aux in stacked_auxes
                                      if k in aux.get(section, {})])
            out[section][k] = jnp.mean(values, axis=0) if section == "losses" else values
    return out


class Decoder(nn.Module):
    """The language model. `apply(params, tokens [b, t])` -> (logits [b, t, vocab] f32, aux)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
                 deterministic: bool = True, cache: Optional[dict] = None):
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        if positions_bt is None:
            start = 0 if cache is None else cache["index"]
            positions_bt = jnp.broadcast_to(start + jnp.arange(tokens_bt.shape[1]),
                                            tokens_bt.shape)
        embed = Embedding(cfg.vocab_size, cfg.embed_dim, cfg.init_std, dtype, param_dtype,
                          name="embed")
        x_btd = embed(tokens_bt)
        if cfg.embedding_multiplier != 1.0:
            x_btd = x_btd * jnp.asarray(cfg.embedding_multiplier, dtype)
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))

        if cache is not None:
            x_btd, new_cache, stacked_auxes = self._cached_blocks(
                x_btd, positions_bt, segment_ids_bt, deterministic, cache)
            return self._logits(embed, x_btd), dict(_gather_over_layers(stacked_auxes),
                                                    cache=new_cache)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=remat_policy(cfg.remat), prevent_cse=False,
                             static_argnums=(4,))
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "router_state": 0},
            split_rngs={"params": True, "router": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_repeats,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        x_btd, stacked_auxes = blocks(x_btd, positions_bt, segment_ids_bt, deterministic)
        return self._logits(embed, x_btd), _gather_over_layers(stacked_auxes)

    def _cached_blocks(self, x_btd, positions_bt, segment_ids_bt, deterministic, cache):
        cfg = self.cfg
        b, t = x_btd.shape[:2]
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        index = cache["index"]
        context = {"index": index, "segment_ids": cache["segment_ids"]}
        length = cache["segment_ids"].shape[1]
        new_cache = {"index": index + t}
        if self.has_variable("params", "blocks_0"):  # per-repeat layout (`unstack_layers`)
            per_repeat_auxes = []
            for r in range(cfg.num_repeats):
                name = f"blocks_{r}"
                x_btd, (auxes, entries) = Block(cfg, name=name)(
                    x_btd, positions_bt, segment_ids_bt, deterministic, cache[name], context)
                new_cache[name] = _write_entries(cfg, cache[name], entries, index, length,
                                                 stacked=False, x_btd=x_btd)
                per_repeat_auxes.append(auxes)
            stacked_auxes = jax.tree.map(lambda *xs: jnp.stack(xs), *per_repeat_auxes)
            new_cache["segment_ids"] = _write_segment_ids(x_btd, cache, segment_ids_bt)
            return x_btd, new_cache, stacked_auxes
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "router_state": 0},
            split_rngs={"params": True, "router": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=cfg.num_repeats,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        x_btd, (stacked_auxes, entries) = blocks(x_btd, positions_bt, segment_ids_bt,
                                                 deterministic, cache["blocks"], context)
        new_cache["blocks"] = _write_entries(cfg, cache["blocks"], entries, index, length,
                                             stacked=True, x_btd=x_btd)
        new_cache["segment_ids"] = _write_segment_ids(x_btd, cache, segment_ids_bt)
        return x_btd, new_cache, stacked_auxes

    def _logits(self, embed, x_btd):
        cfg = self.cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        x_btd = make_norm(cfg.norm, cfg.norm_eps, "final_norm", param_dtype)(x_btd)
        if cfg.tie_embeddings:
            logits_btv = embed.attend(x_btd)
        else:
            logits_btv = Dense(cfg.vocab_size, ("embed", "vocab"), init_std=cfg.init_std,
                               dtype=dtype, param_dtype=param_dtype, name="lm_head")(x_btd)
        logits_btv = logits_btv.astype(jnp.float32)
        if cfg.logits_divisor != 1.0:
            logits_btv = logits_btv / cfg.logits_divisor
        return nn.with_logical_constraint(logits_btv, ("batch", "length", "vocab"))


def _after_reads(x_btd, value, batch_axis: int = 0):
    """`value` plus a zero computed from x_btd per row: the same numbers, but writing them
    into the cache now comes after every read of the old cache that x_btd depends on.

    Without that order XLA cannot update the cache in place: nothing ties an attention
    layer's read of the old cache before the write of its new entries (those depend on the
    layer's input only), so XLA copies every cache array on every decoding step (twice on
    XLA:CPU; `optimization_barrier` does not help). The zero is per row, so a non-finite row
    cannot spill into another row's cache."""
    zero_b = (x_btd[:, 0, 0] * 0).astype(value.dtype)
    shape = [1] * value.ndim
    shape[batch_axis] = -1
    return value + zero_b.reshape(shape)


def _write_segment_ids(x_btd, cache: dict, segment_ids_bt):
    """The cache's segment ids with the new tokens' written at the index, after every layer
    has read the old ones (see `_after_reads`)."""
    stored = cache["segment_ids"]
    new_bt = _after_reads(x_btd, segment_ids_bt.astype(stored.dtype))
    return jax.lax.dynamic_update_slice(stored, new_bt, (0, cache["index"]))


def _write_entries(cfg: ModelConfig, cache: dict, entries: dict, index, length: int,
                   stacked: bool, x_btd) -> dict:
    """The slots' new cache: attention entries [(repeats,) b, t, g, k] written at columns
    index .. index+t of keys [(repeats,) b, g, S, k] and values [(repeats,) b, g, k, S]
    (allocated if absent), after the reads x_btd depends on (`_after_reads`); Mamba slots
    take their new state."""
    lead = 1 if stacked else 0
    out = {}
    for slot, kind in enumerate(cfg.pattern):
        name = f"slot_{slot}"
        if kind != "attention":
            out[name] = {key: value.astype(cache[name][key].dtype)
                         for key, value in entries[name].items()}
            continue
        out[name] = {}
        for key in ("k", "v"):
            entry = jnp.swapaxes(entries[name][key], lead + 1, lead + 2)  # [.., b, g, t, k]
            position_axis = entry.ndim - 2
            if key == "v":  # [.., b, g, k, t]
                entry, position_axis = jnp.swapaxes(entry, -1, -2), entry.ndim - 1
            stored = cache[name].get(key)
            if stored is None:  # nothing cached yet: allocate the slot's columns
                shape = list(entry.shape)
                shape[position_axis] = length
                stored = jnp.zeros(shape, entry.dtype)
            start = [0] * entry.ndim
            start[position_axis] = index
            entry = _after_reads(x_btd, entry.astype(stored.dtype), batch_axis=lead)
            out[name][key] = jax.lax.dynamic_update_slice(stored, entry, start)
    return out


def unstack_layers(variables: dict, cfg: ModelConfig) -> dict:
    """Stacked block variables (`blocks`, leading `layers` axis) -> one tree per repeat
    (`blocks_0`, `blocks_1`, ...), in every collection.

    Only decoding uses this layout: a scanned layer stack slices each layer's weights out of
    the stacked arrays on every step, which XLA:CPU does with a copy (measured: those copies
    took twice as long as the matmuls of a one-token step). With per-repeat weights the
    step's layers read their own arrays directly; compile time then grows with depth.
    """
    out = {}
    for collection, tree in variables.items():
        tree = dict(tree)
        blocks = tree.pop("blocks", None)
        if blocks is not None:
            for r in range(cfg.num_repeats):
                tree[f"blocks_{r}"] = jax.tree.map(lambda x, r=r: x[r], blocks)
        out[collection] = tree
    return out


# The projections a one-token step reads as matrix-vector products (attention, dense SwiGLU, MoE
# shared experts), by module name, with the number of leading input axes of each kernel.
DECODE_KERNEL_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
                            "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def transpose_for_decoding(tree, permute=None):
    """Every `kernel` of the modules in DECODE_KERNEL_INPUT_AXES -> `kernel_t`, its input axes
    moved last (q_proj [d, h, k] -> [h, k, d], o_proj [h, k, d] -> [d, h, k]); the modules
    contract `kernel_t` directly (`jaxlm.layers.mlp.transposed_kernel`).

    For decoding only, on per-repeat variables (`unstack_layers`: no leading `layers` axis):
    XLA:CPU streams an [out, in] matrix through a matrix-vector product faster than an
    [in, out] one (bench-small decode +10%, benchmarks/decode.py). `permute(leaf, axes)`
    transposes one leaf (default: arrays; pass one for PartitionSpecs)."""
    permute = permute or (lambda x, axes: jnp.transpose(x, axes))

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {}
        for name, child in node.items():
            n_in = DECODE_KERNEL_INPUT_AXES.get(name)
            if n_in and isinstance(child, dict) and "kernel" in child:
                child = dict(child)
                kernel = child.pop("kernel")
                rank = len(getattr(kernel, "shape", kernel))
                child["kernel_t"] = permute(kernel, tuple(range(n_in, rank)) + tuple(range(n_in)))
                out[name] = child
            else:
                out[name] = walk(child)
        return out

    return walk(tree)


def build_model(cfg: ModelConfig) -> Decoder:
    return Decoder(cfg)


def init_params(model: Decoder, rng: jax.Array, batch: int = 1, length: Optional[int] = None):
    """Boxed (logically partitioned) params for a [batch, length] token input."""
    length = length or min(model.cfg.max_seq_len, 8)
    tokens = jnp.zeros((batch, length), jnp.int32)
    return model.init({"params": rng}, tokens)["params"]
