"""Causal multi-head attention with GQA/MQA, RoPE (full, partial or none), optional qk-norm.

Shapes use suffixes: b batch, t query length, s key length, d embed, h query heads, g kv heads,
r = h/g queries per kv head, k head dim. Query head h is served by kv head h // r (the order
`jnp.repeat` would give), which is what reshaping q to [b, t, g, r, k] does without copying k/v.

Masking: a query attends to key s when s ≤ its index (causal) and, if `segment_ids` are given,
when both carry the same non-zero segment id (packed documents; 0 marks padding). Masked scores
are filled with finfo(float32).min before a float32 softmax, as transformers does.

Decoding (`cache=...`): the layer reads the keys/values of earlier steps from a preallocated
cache and returns the *new* entries only; the decoder writes them for all layers at once
(`jaxlm/models/decoder.py`, after this layer's reads, so XLA updates the cache in place).
Scores against the cache and against the new tokens are two einsums whose results are joined
before one softmax, so no step copies the cache.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.layers.mlp import matmul_transposed, transposed_kernel
from jaxlm.layers.norms import LayerNorm
from jaxlm.layers.rotary import RopeConfig, apply_rotary, rope_cos_sin, rotary_dim


def attention_mask(q_index_t, k_index_s, segment_ids_q=None, segment_ids_k=None):
    """Boolean mask [b or 1, 1, 1, t, s]: causal by index, same non-zero segment if given."""
    mask = (k_index_s[None, :] <= q_index_t[:, None])[None, None, None]
    if segment_ids_q is not None:
        same = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
        same &= (segment_ids_k != 0)[:, None, :]
        mask = mask & same[:, None, None]
    return mask


def dot_product_attention(q_bthk, k_bsgk, v_bsgk, mask, scale: float, dtype):
    """softmax(q·kᵀ·scale + mask)·v with grouped kv heads; scores and softmax in float32."""
    b, t, h, k = q_bthk.shape
    g = k_bsgk.shape[2]
    q_btgrk = (q_bthk * jnp.asarray(scale, q_bthk.dtype)).reshape(b, t, g, h // g, k)
    scores_bgrts = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk,
                              preferred_element_type=jnp.float32)
    scores_bgrts = jnp.where(mask, scores_bgrts, jnp.finfo(jnp.float32).min)
    probs_bgrts = jax.nn.softmax(scores_bgrts, axis=-1).astype(dtype)
    out_btgrk = jnp.einsum("bgrts,bsgk->btgrk", probs_bgrts, v_bsgk)
    return out_btgrk.reshape(b, t, h, k)


def cached_attention(q_bthk, k_btgk, v_btgk, cache: dict, segment_ids_bt, scale: float, dtype):
    """Attention of t new queries over the cache and the t new keys.

    cache: k [b, g, S, k] and v [b, g, k, S] (entries of earlier steps; each contracted
    along its last axis, so neither is transposed per step), segment_ids [b, S] (0:
    padding or not yet written), index [] (columns written so far). Without 'k'/'v' nothing
    is cached yet (a prefill from an empty cache) and only the new keys are attended. A row is one sequence: a
    non-zero segment id only marks a real token. New key u is seen by new query i when u ≤ i
    and it is real.
    """
    b, t, h, k = q_bthk.shape
    g = k_btgk.shape[2]
    low = jnp.finfo(jnp.float32).min
    q_btgrk = (q_bthk * jnp.asarray(scale, q_bthk.dtype)).reshape(b, t, g, h // g, k)
    new_bgrtu = jnp.einsum("btgrk,bugk->bgrtu", q_btgrk, k_btgk,
                           preferred_element_type=jnp.float32)
    new_valid_btu = jnp.tril(jnp.ones((t, t), bool))[None]
    if segment_ids_bt is not None:
        new_valid_btu = new_valid_btu & (segment_ids_bt != 0)[:, None, :]
    new_bgrtu = jnp.where(new_valid_btu[:, None, None], new_bgrtu, low)
    if "k" not in cache:
        probs_bgrtu = jax.nn.softmax(new_bgrtu, axis=-1).astype(dtype)
        out_btgrk = jnp.einsum("bgrtu,bugk->btgrk", probs_bgrtu, v_btgk)
        return out_btgrk.reshape(b, t, h, k)
    cache_k_bgsk, cache_v_bgks = cache["k"].astype(dtype), cache["v"].astype(dtype)
    s = cache_k_bgsk.shape[2]
    old_bgrts = jnp.einsum("btgrk,bgsk->bgrts", q_btgrk, cache_k_bgsk,
                           preferred_element_type=jnp.float32)
    old_valid_bs = (cache["segment_ids"] != 0) & (jnp.arange(s) < cache["index"])[None]
    old_bgrts = jnp.where(old_valid_bs[:, None, None, None, :], old_bgrts, low)
    probs = jax.nn.softmax(jnp.concatenate([old_bgrts, new_bgrtu], axis=-1), axis=-1).astype(dtype)
    out_btgrk = (jnp.einsum("bgrts,bgks->btgrk", probs[..., :s], cache_v_bgks)
                 + jnp.einsum("bgrtu,bugk->btgrk", probs[..., s:], v_btgk))
    return out_btgrk.reshape(b, t, h, k)


class HeadProjection(nn.Module):
    """x [b, t, d] -> [b, t, heads, head_dim]; kernel [d, heads, head_dim] (or kernel_t
    [heads, head_dim, d], see `transposed_kernel`) (+ bias [heads, head_dim])."""

    heads: int
    head_dim: int
    heads_axis: str = "heads"
    use_bias: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        axes = ("embed", self.heads_axis, "head_dim")
        kernel_t = transposed_kernel(self)
        if kernel_t is not None:
            b, t, d = x_btd.shape
            kernel_t = kernel_t.reshape(self.heads * self.head_dim, d).astype(self.dtype)
            y_bthk = matmul_transposed(x_btd.reshape(b * t, d), kernel_t)
            y_bthk = y_bthk.reshape(b, t, self.heads, self.head_dim)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), axes),
                (x_btd.shape[-1], self.heads, self.head_dim), self.param_dtype)
            y_bthk = jnp.einsum("btd,dhk->bthk", x_btd, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                              (self.heads, self.head_dim), self.param_dtype)
            y_bthk = y_bthk + bias.astype(self.dtype)
        return y_bthk


class OutProjection(nn.Module):
    """[b, t, heads, head_dim] -> [b, t, features]; kernel [heads, head_dim, features] (or
    kernel_t [features, heads, head_dim], see `transposed_kernel`)."""

    features: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bthk):
        _, _, h, k = x_bthk.shape
        kernel_t = transposed_kernel(self)
        if kernel_t is not None:
            b, t = x_bthk.shape[:2]
            kernel_t = kernel_t.reshape(self.features, h * k).astype(self.dtype)
            y_btd = matmul_transposed(x_bthk.reshape(b * t, h * k), kernel_t)
            y_btd = y_btd.reshape(b, t, self.features)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), ("heads", "head_dim", "embed")),
                (h, k, self.features), self.param_dtype)
            y_btd = jnp.einsum("bthk,hkd->btd", x_bthk, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   ("embed",)),
                              (self.features,), self.param_dtype)
            y_btd = y_btd + bias.astype(self.dtype)
        return y_btd


class Attention(nn.Module):
    """Causal self-attention; returns [b, t, d]. Parameters: q_proj, k_proj, v_proj, o_proj
    (and q_norm, k_norm with qk_norm).

    With `cache` (see `cached_attention`; positions are then the tokens' absolute positions)
    it returns `(y [b, t, d], {'k', 'v': [b, t, g, k]})`: the output and the entries the
    decoder writes at the cache index.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Optional[RopeConfig] = None  # None: no positional encoding (NoPE)
    scale: Optional[float] = None  # None: head_dim ** -0.5
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache: Optional[dict] = None):
        h, g, k = self.num_heads, self.num_kv_heads, self.head_dim
        x_btd = x_btd.astype(self.dtype)

        def proj(name, heads, axis):
            return HeadProjection(heads, k, axis, self.qkv_bias, self.init_std, self.dtype,
                                  self.param_dtype, name=name)(x_btd)

        q_bthk = proj("q_proj", h, "heads")
        k_btgk = proj("k_proj", g, "kv_heads")
        v_btgk = proj("v_proj", g, "kv_heads")
        if self.qk_norm:
            q_bthk = LayerNorm(self.norm_eps, use_bias=False, axes=("heads", "head_dim"),
                               param_dtype=self.param_dtype, name="q_norm")(q_bthk)
            k_btgk = LayerNorm(self.norm_eps, use_bias=False, axes=("kv_heads", "head_dim"),
                               param_dtype=self.param_dtype, name="k_norm")(k_btgk)
        if self.rope is not None:
            cos, sin = rope_cos_sin(positions_bt, self.rope, rotary_dim(k, self.rope.fraction),
                                    self.dtype)
            q_bthk = apply_rotary(q_bthk, cos, sin)
            k_btgk = apply_rotary(k_btgk, cos, sin)
        q_bthk = nn.with_logical_constraint(q_bthk, ("batch", "length", "heads", "head_dim"))
        k_btgk = nn.with_logical_constraint(k_btgk, ("batch", "length", "kv_heads", "head_dim"))
        v_btgk = nn.with_logical_constraint(v_btgk, ("batch", "length", "kv_heads", "head_dim"))

        scale = self.scale if self.scale is not None else k ** -0.5
        if cache is None:
            index_t = jnp.arange(x_btd.shape[1])
            mask = attention_mask(index_t, index_t, segment_ids_bt, segment_ids_bt)
            out_bthk = dot_product_attention(q_bthk, k_btgk, v_btgk, mask, scale, self.dtype)
        else:
            out_bthk = cached_attention(q_bthk, k_btgk, v_btgk, cache, segment_ids_bt, scale,
                                        self.dtype)
        out_bthk = nn.with_logical_constraint(out_bthk, ("batch", "length", "heads", "head_dim"))
        y_btd = OutProjection(x_btd.shape[-1], self.out_bias, self.out_init_std, self.dtype,
                              self.param_dtype, name="o_proj")(out_bthk)
        if cache is None:
            return y_btd
        return y_btd, {"k": k_btgk, "v": v_btgk}
