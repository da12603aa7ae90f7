"""Small shared helpers for tests (tiny configs, NumPy views of params)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from jaxlm.config import default_config
from jaxlm.schema import to_config_dict
from jaxlm.models.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=272, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                mlp_dim=64, max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_experiment(tmp_data=None, **model_overrides):
    """A ConfigDict for a seconds-long training run on the embedded corpus."""
    config = default_config()
    config.model = to_config_dict(tiny_model_config(**model_overrides))
    config.data.seq_len = 32
    config.data.batch_size = 4
    config.train.steps = 6
    config.train.warmup_steps = 2
    config.train.learning_rate = 1e-2
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.eval_batches = 1
    config.train.checkpoint_every = 3
    config.train.progress_bar = False
    config.train.async_checkpoint = False
    config.parallel.data = 1
    return config


def numpy_params(boxed_params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(boxed_params))
