"""AdamW with a warmup + decay schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from jaxlm.train.config import TrainConfig

# Parameters named like this are not decayed: norm scales, biases, and Mamba's A_log, D,
# dt_bias (decaying them changes the dynamics, not just the scale), and the MoE selection bias.
NO_DECAY_NAMES = frozenset({"scale", "bias", "A_log", "D", "dt_bias", "selection_bias"})


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _last_name(path) -> str:
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
    return ""


def decay_mask(params):
    """True for parameters that take weight decay (works on boxed and unboxed trees)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_name(path) not in NO_DECAY_NAMES,
                                            params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
