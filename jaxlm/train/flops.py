"""Model FLOPs per token for MFU, by the PaLM formula.

    training FLOPs / token = 6·N + 12·L_attn·H·d_head·S

N counts the parameters that take part in matmuls per token: every non-embedding parameter,
plus the unembedding (V·D, also when tied to the embedding, since the logits matmul runs
either way), with routed MoE experts weighted by top_k / num_experts (only the active experts
do work). The embedding lookup is free. The second term is attention's q·kᵀ and p·v over
sequence length S in L_attn attention layers (counted over the full square, as PaLM does).
Mamba layers contribute their projections through N; the SSD scan itself is not counted.
"""

from __future__ import annotations

import math

import jax

ROUTED_EXPERT_PARAMS = ("wi_gate", "wi_up", "wo")


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def active_matmul_params(cfg, params) -> float:
    """N of the docstring, from the (possibly abstract) parameter tree."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = _path_names(path)
        size = math.prod(leaf.shape)
        if names[:1] == ("embed",):
            if cfg.tie_embeddings:
                total += size  # the logits matmul reuses the table
            continue
        if "moe" in names and names[-1] in ROUTED_EXPERT_PARAMS:
            size *= cfg.moe.top_k / cfg.moe.num_experts
        total += size
    return total


def flops_per_token(cfg, params, seq_len: int) -> float:
    n_attention_layers = sum(kind == "attention" for kind in cfg.layer_kinds)
    attention = 12 * n_attention_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6 * active_matmul_params(cfg, params) + attention
