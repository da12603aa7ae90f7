"""Granite-4 hybrid family (SPEC §C): Mamba-2 mixers interleaved with NoPE GQA attention by
`layer_pattern`, every layer followed by fine-grained routed experts plus an always-on shared
expert (router: top-k of the float32 logits, then softmax over those k), and Granite's four
multipliers — embeddings ×embedding_multiplier, every branch ×residual_multiplier before it is
added, attention softmax scale `attention_multiplier` (our `attention_scale`), logits
÷logits_scaling (our `logits_divisor`).

Field values follow `jaxlm.interop.granite.config_from_hf` (HF router_aux_loss_coef 0.001 ×
top_k, no z-loss) for the released shape; the tiny size keeps the library's default balancing
(0.01) and z-loss (0.001) coefficients, which is what training here wants.
"""

from __future__ import annotations

from jaxlm.layers.moe import MoEConfig
from jaxlm.layers.ssm import SSMConfig
from jaxlm.models.config import ModelConfig

FAMILY = dict(family="granite_hybrid", ffn="moe", mlp_dim=0, norm="rms",
              position_embedding="none", qkv_bias=False, out_bias=False)

SIZES = {
    # 4 layers "MMMA" (3 Mamba-2, 1 attention), D128, 16 experts top-4 of I64 + shared S128:
    # the byte-level training recipe (experiments/configs/granite_hybrid.py); head_dim 32, so
    # attention_scale 1/32 is Granite's 1/head_dim convention.
    "tiny": dict(vocab_size=384, embed_dim=128, num_layers=4, layer_pattern="MMMA",
                 num_heads=4, num_kv_heads=2, attention_scale=1 / 32, embedding_multiplier=12.0,
                 residual_multiplier=0.22, logits_divisor=6.0,
                 tie_embeddings=True, norm_eps=1e-5, max_seq_len=4096,
                 moe=MoEConfig(num_experts=16, top_k=4, mlp_dim=64, num_shared_experts=1,
                               shared_mlp_dim=128, router="topk_softmax"),
                 ssm=SSMConfig(num_heads=8, head_dim=32, state_dim=32, num_groups=1,
                               conv_width=4, chunk_size=64)),
    # ibm-granite/granite-4.0-h-tiny's shape: 40 layers with one attention layer in ten, D1536,
    # 12 heads / 4 kv heads of 128, 64 experts top-6 of I512 + shared S1024, Mamba heads 48 × P64,
    # N128, G1, K4, NoPE, V100352, tied. Abstract only on this machine.
    "h-tiny": dict(vocab_size=100352, embed_dim=1536, num_layers=40, layer_pattern="MMMMMMMMMA",
                   num_heads=12, num_kv_heads=4, attention_scale=1 / 128,
                   embedding_multiplier=12.0, residual_multiplier=0.22, logits_divisor=6.0,
                   tie_embeddings=True, norm_eps=1e-5, max_seq_len=131072,
                   moe=MoEConfig(num_experts=64, top_k=6, mlp_dim=512, num_shared_experts=1,
                                 shared_mlp_dim=1024, router="topk_softmax",
                                 aux_loss_coef=0.006, z_loss_coef=0.0),
                   ssm=SSMConfig(num_heads=48, head_dim=64, state_dim=128, num_groups=1,
                                 conv_width=4, chunk_size=256)),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(**{**FAMILY, **SIZES[size]})
