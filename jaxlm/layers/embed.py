"""Token embedding, also used to unembed when embeddings are tied."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Embedding(nn.Module):
    """Table [vocab, embed]; `__call__` looks tokens up, `attend` computes x · tableᵀ."""

    vocab_size: int
    features: int
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                      ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, tokens_bt):
        return jnp.take(self.embedding, tokens_bt, axis=0).astype(self.dtype)

    def attend(self, x_btd):
        return jnp.einsum("btd,vd->btv", x_btd, self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)
