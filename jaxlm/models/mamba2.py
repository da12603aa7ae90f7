"""Pure Mamba-2 family (SPEC §C, §D): layer_pattern "M", no FFN (each layer is RMSNorm ->
Mamba-2 mixer -> residual add), no positional encoding (the recurrence is causal by
construction), tied embeddings as in state-spaces/mamba2-*. Field values follow
`jaxlm.interop.mamba2.config_from_hf` (an SSM has no position limit: max_seq_len 2^20).
"""

from __future__ import annotations

from jaxlm.layers.ssm import SSMConfig
from jaxlm.models.config import ModelConfig

MAX_SEQ_LEN = 1 << 20

FAMILY = dict(family="mamba2", layer_pattern="M", ffn="none", mlp_dim=0, norm="rms",
              position_embedding="none", tie_embeddings=True, max_seq_len=MAX_SEQ_LEN)

SIZES = {
    # D128, 4 layers, 8 heads × P32 (expand 2), N32: the byte-level training recipe
    # (experiments/configs/mamba2.py).
    "tiny": dict(vocab_size=384, embed_dim=128, num_layers=4,
                 ssm=SSMConfig(num_heads=8, head_dim=32, state_dim=32, num_groups=1,
                               conv_width=4, chunk_size=64)),
    # state-spaces/mamba2-130m: D768, 24 layers, 24 heads × 64, N128, G1, V50288.
    "130m": dict(vocab_size=50288, embed_dim=768, num_layers=24,
                 ssm=SSMConfig(num_heads=24, head_dim=64, state_dim=128, num_groups=1,
                               conv_width=4, chunk_size=256)),
    # state-spaces/mamba2-370m: D1024, 48 layers, 32 heads × 64, N128, G1, V50288.
    "370m": dict(vocab_size=50288, embed_dim=1024, num_layers=48,
                 ssm=SSMConfig(num_heads=32, head_dim=64, state_dim=128, num_groups=1,
                               conv_width=4, chunk_size=256)),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(**{**FAMILY, **SIZES[size]})
