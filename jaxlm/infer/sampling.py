"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_token(logits_bv, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next token ids [b]; temperature 0 is greedy (argmax, ties to the lowest id)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
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
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)
