"""Mixture-of-experts FFN: router, routed + shared SwiGLU experts, dropless and capacity dispatch."""

from __future__ import annotations

from typing import Optional

from jaxlm.schema import field, section


@section
class MoEConfig:
    num_experts: int = field(0, "routed experts per MoE layer (0: dense FFN)", min=0)
    top_k: int = field(2, "experts each token is routed to", min=1)
    mlp_dim: int = field(0, "hidden width of each routed expert", min=0)
    num_shared_experts: int = field(0, "always-on shared experts (DeepSeek / Granite)", min=0)
    shared_mlp_dim: int = field(0, "hidden width of each shared expert (0: mlp_dim)", min=0)
    router: str = field("softmax_topk", "routing rule: softmax then top-k (Mixtral), top-k of the "
                        "logits then softmax (Granite), sigmoid with a selection bias (DeepSeek-V3)",
                        choices=("softmax_topk", "topk_softmax", "sigmoid_bias"))
    renormalize: bool = field(True, "divide the top-k weights by their sum (softmax_topk/sigmoid)")
    routed_scaling: float = field(1.0, "multiplier on the routed output (DeepSeek-V3)", min=0.0)
    jitter: float = field(0.0, "multiplicative router-input noise in training", min=0.0)
    dispatch: str = field("dropless", "token dispatch: sort + grouped matmul, or GShard capacity",
                          choices=("dropless", "capacity"))
    capacity_factor: float = field(1.25, "capacity dispatch: slots per expert ÷ fair share",
                                   min=0.0, min_exclusive=True)
    aux_loss_coef: float = field(0.01, "Switch load-balancing loss coefficient", min=0.0)
    z_loss_coef: float = field(0.001, "router z-loss coefficient", min=0.0)
    bias_update_rate: float = field(0.001, "sigmoid_bias: γ of the aux-loss-free bias update",
                                    min=0.0)
