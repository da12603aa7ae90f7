"""Mixtral family (SPEC §A attention, §E routing): a LLaMA decoder (RMSNorm, RoPE, GQA, no
biases) whose FFN is routed SwiGLU experts — softmax over the experts in float32, top-k, the k
weights renormalised to sum to 1, no shared expert.

The same family holds the fine-grained MoE shapes (sizes `fine-grained-*`): many narrow experts,
top-8 of 64 plus one always-on shared expert, DeepSeekMoE / OLMoE style. `ModelConfig.family`
stays 'mixtral' for them (the family names an architecture, the FFN fields say how it routes);
their HF export is refused by `jaxlm.interop.mixtral` because Mixtral has no shared expert.

Routing fields match what `jaxlm.interop.mixtral.config_from_hf` produces for the released
checkpoints (aux_loss_coef = HF router_aux_loss_coef 0.001 × top_k, no z-loss). The tiny sizes
train here and use the library's default balancing (0.01) and z-loss (0.001) coefficients.
"""

from __future__ import annotations

from jaxlm.layers.moe import MoEConfig
from jaxlm.layers.rotary import RopeConfig
from jaxlm.models.config import ModelConfig

FAMILY = dict(family="mixtral", layer_pattern="A", ffn="moe", mlp_dim=0, norm="rms",
              position_embedding="rope", tie_embeddings=False)

SIZES = {
    # 3.4M parameters (~1.1M active) at vocab 384: the byte-level training recipe
    # (experiments/configs/mixtral.py).
    "tiny": dict(vocab_size=384, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 max_seq_len=2048,
                 moe=MoEConfig(num_experts=8, top_k=2, mlp_dim=256, router="softmax_topk",
                               renormalize=True)),
    # mistralai/Mixtral-8x7B-v0.1: 46,702,792,704 parameters (12.9B active). Abstract only.
    "8x7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 max_seq_len=32768, rope=RopeConfig(theta=1_000_000.0),
                 moe=MoEConfig(num_experts=8, top_k=2, mlp_dim=14336, router="softmax_topk",
                               renormalize=True, aux_loss_coef=0.002, z_loss_coef=0.0)),
    # Fine-grained: 64 experts of width 64, top-8, + 1 shared expert of width 64 (active FFN
    # width 9 × 64 = 576 = 4.5·d); 6.7M parameters.
    "fine-grained-tiny": dict(vocab_size=384, embed_dim=128, num_layers=4, num_heads=4,
                              num_kv_heads=2, max_seq_len=2048,
                              moe=MoEConfig(num_experts=64, top_k=8, mlp_dim=64,
                                            num_shared_experts=1, shared_mlp_dim=64,
                                            router="softmax_topk", renormalize=True)),
    # OLMoE-1B-7B's shape (V50304 D2048 L16 H16, 64 experts of I1024, top-8) plus one shared
    # expert of the same width: 7,019,759,616 parameters (~1.4B active). Abstract only.
    "fine-grained-7b": dict(vocab_size=50304, embed_dim=2048, num_layers=16, num_heads=16,
                            max_seq_len=4096, rope=RopeConfig(theta=10_000.0),
                            moe=MoEConfig(num_experts=64, top_k=8, mlp_dim=1024,
                                          num_shared_experts=1, shared_mlp_dim=1024,
                                          router="softmax_topk", renormalize=True)),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(**{**FAMILY, **SIZES[size]})
