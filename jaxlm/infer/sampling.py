"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_max_index(x_bv):
    """`jnp.argmax(x, -1)` (first maximum; first NaN if any) as two plain reductions. XLA:CPU
    runs argmax's (value, index) reduction unvectorised: 143 µs over a 32000-entry row, 3% of
    a bench-small decode step, against 13 µs (in isolation) for a max then a min over matching
    indices."""
    best = jnp.max(x_bv, axis=-1, keepdims=True)
    hit = (x_bv == best) | jnp.isnan(x_bv)
    vocab = x_bv.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def sample_token(logits_bv, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next token ids [b]; temperature 0 is greedy (argmax, ties to the lowest id)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        return first_max_index(logits_bv)
    logits_bv = logits_bv / temperature
    if top_k:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cumulative - jax.nn.softmax(sorted_desc, axis=-1) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
    # jax.random.categorical's Gumbel-max draw (same noise, same token), with the faster argmax
    return first_max_index(logits_bv + jax.random.gumbel(rng, logits_bv.shape, logits_bv.dtype))
