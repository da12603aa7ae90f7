"""Generation without a cache: each new token re-runs the whole (fixed-size) window.

O(n²) work, but one compiled function for every step and obviously correct, which makes it the
reference that cached decoding (`jaxlm.infer.decode`) is tested against. The window is the
prompt plus the new tokens rounded up to a multiple of 32 (the model is causal, so the zeros
after the current position are never read; MoE capacity dispatch is the exception), and the
compiled step is shared by every call with the same model, sampling settings and window.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.infer.sampling import sample_token


def generate_uncached(model, variables: dict, prompt_ids: Sequence[int], max_new_tokens: int, *,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
    """New token ids after `prompt_ids` (stops after a token in `stop_ids`, which is kept)."""
    prompt = np.asarray(prompt_ids, np.int32)
    total = len(prompt) + max_new_tokens
    if len(prompt) == 0:
        raise ValueError("generate: the prompt is empty; expected at least one token")
    if total > model.cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) "
                         f"= {total} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    if prompt.max() >= model.cfg.vocab_size:
        raise ValueError(f"generate: token id {int(prompt.max())} >= model.vocab_size="
                         f"{model.cfg.vocab_size}")

    window = min(-(-total // 32) * 32, model.cfg.max_seq_len)
    buffer = np.zeros((1, window), np.int32)
    buffer[0, :len(prompt)] = prompt
    rng = jax.random.key(seed)
    out = []
    for position in range(len(prompt), total):
        rng, step_rng = jax.random.split(rng)
        token = int(_next_token(model, float(temperature), int(top_k), float(top_p), variables,
                                jnp.asarray(buffer), position, step_rng))
        buffer[0, position] = token
        out.append(token)
        if token in stop_ids:
            break
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _next_token(model, temperature, top_k, top_p, variables, buffer_1t, position, rng):
    logits, _ = model.apply(variables, buffer_1t)
    return sample_token(logits[:, position - 1], rng, temperature, top_k, top_p)[0]
