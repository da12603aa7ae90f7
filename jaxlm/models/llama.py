"""LLaMA family: RMSNorm pre-norm, SwiGLU, RoPE, GQA (SPEC §A)."""

from __future__ import annotations

from jaxlm.layers.rotary import RopeConfig
from jaxlm.models.config import ModelConfig


def swiglu_hidden(embed_dim: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4·d (same parameters as a 4·d GELU MLP), rounded up."""
    hidden = int(2 * 4 * embed_dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


SIZES = {
    # ~6M parameters: the quickstart's byte-level code model.
    "tiny": dict(vocab_size=384, embed_dim=256, num_layers=8, num_heads=4, num_kv_heads=2,
                 mlp_dim=swiglu_hidden(256, 128), max_seq_len=2048),
    # the throughput benchmark's model (V32000 D512 L8 H8 KV4 F1536).
    "bench-small": dict(vocab_size=32000, embed_dim=512, num_layers=8, num_heads=8,
                        num_kv_heads=4, mlp_dim=1536, max_seq_len=2048),
    # Llama-3.2-1B.
    "1b": dict(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               mlp_dim=8192, tie_embeddings=True, max_seq_len=131072,
               rope=RopeConfig(theta=500000.0, scaling="llama3", factor=32.0,
                               low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position=8192)),
    # Llama-2-7B.
    "7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               mlp_dim=11008, max_seq_len=4096),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(family="llama", **SIZES[size])
