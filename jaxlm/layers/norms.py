"""RMSNorm and LayerNorm with Hugging Face's exact order of operations.

Flax's built-in norms differ from transformers in epsilon defaults and in where they cast, which
shows up at 1e-6 in parity tests, so we write our own. Statistics are always float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """y = scale · cast(x32 · rsqrt(mean(x32²) + eps)); eps inside the rsqrt, scale after the cast."""

    eps: float = 1e-5
    axes: tuple[str, ...] = ("embed",)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                           x.shape[-len(self.axes):], self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale * y.astype(x.dtype)).astype(x.dtype)


class LayerNorm(nn.Module):
    """Two-pass LayerNorm (biased variance) over the last axis, with optional bias."""

    eps: float = 1e-5
    use_bias: bool = True
    axes: tuple[str, ...] = ("embed",)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = x.shape[-len(self.axes):]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                           shape, self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                              shape, self.param_dtype)
            y = y + bias
        return y.astype(x.dtype)


def make_norm(kind: str, eps: float, name: str, param_dtype=jnp.float32) -> nn.Module:
    """The model's norm by config name: 'rms' or 'layer' (LayerNorm with bias)."""
    if kind == "rms":
        return RMSNorm(eps=eps, param_dtype=param_dtype, name=name)
    return LayerNorm(eps=eps, param_dtype=param_dtype, name=name)
