"""Stable Code / StableLM family (SPEC §B): a LLaMA-like decoder with full LayerNorm (weight and
bias), partial rotary (the first 25% of each head's dims rotate, the rest pass through),
rope_theta 1e6 and a 16k context; options for qkv bias, parallel residual
(h + attn(LN(h)) + mlp(LN(h))) and per-head qk LayerNorm. Its tokenizer carries the FIM
sentinels (`jaxlm/data/fim.py`)."""

from __future__ import annotations

from jaxlm.layers.rotary import RopeConfig
from jaxlm.models.config import ModelConfig

# Shared by every size: what makes a model "Stable Code" rather than LLaMA.
FAMILY = dict(family="stablelm", norm="layer", norm_eps=1e-5,
              rope=RopeConfig(theta=1_000_000.0, fraction=0.25), max_seq_len=16384,
              qkv_bias=False, qk_norm=False, parallel_residual=False, tie_embeddings=False)

SIZES = {
    # ~4.3M parameters (at vocab 2048): the FIM recipe's code model (experiments/configs/
    # stablecode_fim.py). head_dim 64 -> 16 rotary dims.
    "tiny": dict(vocab_size=2048, embed_dim=256, num_layers=4, num_heads=4, mlp_dim=704,
                 max_seq_len=2048),
    # stabilityai/stable-code-3b: 2,795,443,200 parameters; head_dim 80 -> 20 rotary dims.
    # Abstract only on this machine (jax.eval_shape).
    "stablecode-3b": dict(vocab_size=50304, embed_dim=2560, num_layers=32, num_heads=32,
                          num_kv_heads=32, mlp_dim=6912),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(**{**FAMILY, **SIZES[size]})
