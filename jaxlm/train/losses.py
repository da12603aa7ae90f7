"""Token cross-entropy with an optional z-loss, as sums so micro-batches add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_btv, targets_bt, mask_bt, z_loss_coef: float = 0.0):
    """(Σ mask·CE, Σ mask·z², Σ mask) in float32.

    CE = logsumexp(logits) − logit[target]; the z-loss term is logsumexp(logits)² (PaLM), which
    keeps the softmax normaliser near 1.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    mask_bt = mask_bt.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum((lse_bt - target_logit_bt) * mask_bt)
    z_sum = jnp.sum(jnp.square(lse_bt) * mask_bt) if z_loss_coef else jnp.zeros((), jnp.float32)
    return ce_sum, z_sum, jnp.sum(mask_bt)
