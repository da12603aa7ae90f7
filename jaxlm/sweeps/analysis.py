"""Per-layer views of a trained decoder for the reproductions.

    hs = residual_stream(cfg, params, tokens)      # [L+1, b, t, d]: the input of every layer
    cos = layer_io_cosine(cfg, params, tokens)     # [L]: mean cos(input_l, output_l) per layer

Yi-9B chose which layers to duplicate by this number: a layer whose output is nearly its input
(cosine close to 1) changes the residual stream little, so a copy of it barely moves the
model's function. The stream is computed layer by layer with the decoder's own `DecoderLayer`
on layer l's slice of the stacked parameters (layer l = slot l % P of repeat l // P), so it is
exactly the stream inside `Decoder.apply` (tests/test_sweep.py checks the logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.layers.embed import Embedding
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLayer, dtype_of


def layer_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    period = len(cfg.layer_pattern)
    stacked = params["blocks"][f"slot_{layer % period}"]
    return jax.tree.map(lambda x: x[layer // period], stacked)


def residual_stream(cfg: ModelConfig, params: dict, tokens_bt) -> np.ndarray:
    """The residual stream before layer 0, ..., after layer L-1: [L+1, b, t, d] float32."""
    tokens_bt = jnp.asarray(tokens_bt)
    dtype = dtype_of(cfg.dtype)
    embed = Embedding(cfg.vocab_size, cfg.embed_dim, cfg.init_std, dtype, dtype_of(
        cfg.param_dtype))
    x_btd = embed.apply({"params": params["embed"]}, tokens_bt)
    if cfg.embedding_multiplier != 1.0:
        x_btd = x_btd * jnp.asarray(cfg.embedding_multiplier, dtype)
    positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    stream = [x_btd]
    for layer, kind in enumerate(cfg.layer_kinds):
        module = DecoderLayer(cfg, kind)
        x_btd, _ = jax.jit(module.apply, static_argnums=(4,))(
            {"params": layer_params(params, cfg, layer)}, x_btd, positions_bt, None, True)
        stream.append(x_btd)
    return np.stack([np.asarray(h, np.float32) for h in stream])


def layer_io_cosine(cfg: ModelConfig, params: dict, tokens_bt) -> np.ndarray:
    """Per layer, the mean over tokens of cos(layer input, layer output)."""
    hs = residual_stream(cfg, params, tokens_bt).astype(np.float64)
    x, y = hs[:-1], hs[1:]
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    return cos.reshape(cos.shape[0], -1).mean(-1)
