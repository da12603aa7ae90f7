"""Mixtral (`MixtralForCausalLM`) <-> jaxlm family "mixtral" (SPEC §A attention, §E routing).

A LLaMA decoder (no biases) whose FFN is `block_sparse_moe`: a router `gate.weight` [E, D] and
E SwiGLU experts stored one tensor per expert and projection (`experts.{e}.w1` gate [I, D],
`w3` up [I, D], `w2` down [D, I]; transformers 5 fuses them in memory only and saves them
unfused). They fill rows e of our stacked `moe/wi_gate`, `wi_up` [E, D, I] and `wo` [E, I, D].

Routing is softmax over all experts in float32, top-k, weights divided by their sum: our
`router="softmax_topk"` with `renormalize=True`. HF's load-balancing loss sums over the k choice
slots, k × ours (see `jaxlm.layers.moe.load_balancing_loss`), so `router_aux_loss_coef` maps to
`aux_loss_coef = coef·k` and back; HF has no router z-loss (imported as 0). `router_jitter_noise`
is our `jitter`. As for Mistral, a `sliding_window` caps `max_seq_len` (jaxlm has no window).
"""

from __future__ import annotations

from jaxlm.interop import tables
from jaxlm.interop.llama import check_activation
from jaxlm.interop.rope import read_rope_fields, rope_from_hf, rope_to_hf
from jaxlm.interop.tables import Family, Tensor, hf_field, require
from jaxlm.models.config import ModelConfig

LAYER = "model.layers.{layer}"


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    heads = hf_field(hf, "num_attention_heads")
    width = hf_field(hf, "hidden_size")
    head_dim = hf_field(hf, "head_dim", width // heads)
    fraction = read_rope_fields(hf).get("partial_rotary_factor", 1.0)
    if fraction != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={fraction!r}: Mixtral rotates whole "
                         "heads; expected 1.0")
    rope, max_seq_len = rope_from_hf(hf, fraction=1.0)
    if hf.get("sliding_window") is not None:
        max_seq_len = min(max_seq_len, int(hf["sliding_window"]))
    top_k = hf_field(hf, "num_experts_per_tok", 2)
    moe = dict(num_experts=hf_field(hf, "num_local_experts", 8), top_k=top_k,
               mlp_dim=hf_field(hf, "intermediate_size"), router="softmax_topk",
               renormalize=True, jitter=float(hf.get("router_jitter_noise") or 0.0),
               aux_loss_coef=float(hf_field(hf, "router_aux_loss_coef", 0.001)) * top_k,
               z_loss_coef=0.0)
    return dict(
        family="mixtral", vocab_size=hf_field(hf, "vocab_size"), embed_dim=width,
        num_layers=hf_field(hf, "num_hidden_layers"), layer_pattern="A", num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
        head_dim=None if head_dim == width // heads else head_dim, mlp_dim=0, ffn="moe",
        moe=moe, norm="rms", norm_eps=float(hf_field(hf, "rms_norm_eps", 1e-5)),
        position_embedding="rope", rope=rope, max_seq_len=max_seq_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = "MixtralForCausalLM"
    for name, allowed in (("layer_pattern", "A"), ("ffn", "moe"), ("position_embedding", "rope"),
                          ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                          ("logits_divisor", 1.0),
                          ("attention_scale", (None, cfg.head_size ** -0.5)),
                          ("norm", "rms"), ("qk_norm", False), ("parallel_residual", False),
                          ("rope.fraction", 1.0), ("qkv_bias", False), ("out_bias", False),
                          ("moe.router", "softmax_topk"), ("moe.renormalize", True),
                          ("moe.num_shared_experts", 0), ("moe.routed_scaling", 1.0)):
        require(cfg, name, allowed, arch)
    m = cfg.moe
    return dict(
        architectures=[arch], model_type="mixtral", vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, intermediate_size=m.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, hidden_act="silu",
        rms_norm_eps=cfg.norm_eps, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_coef / m.top_k, router_jitter_noise=m.jitter,
        output_router_logits=False, sliding_window=None, attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        **rope_to_hf(cfg.rope, cfg.max_seq_len, partial=False))


def global_tensors(cfg: ModelConfig) -> list[Tensor]:
    return tables.embeddings(cfg) + tables.norm("model.norm", ("final_norm",), cfg.embed_dim,
                                                bias=False)


def layer_tensors(cfg: ModelConfig, kind: str) -> list[Tensor]:
    d, e, f = cfg.embed_dim, cfg.moe.num_experts, cfg.moe.mlp_dim
    moe = f"{LAYER}.block_sparse_moe"
    expert = moe + ".experts.{index}"
    return (tables.norm(f"{LAYER}.input_layernorm", ("mixer_norm",), d, bias=False)
            + tables.attention(cfg, f"{LAYER}.self_attn")
            + tables.norm(f"{LAYER}.post_attention_layernorm", ("ffn_norm",), d, bias=False)
            + [tables.linear(f"{moe}.gate.weight", ("moe", "router", "kernel"), e, d),
               Tensor(f"{expert}.w1.weight", ("moe", "wi_gate"), (f, d), (1, 0), count=e),
               Tensor(f"{expert}.w3.weight", ("moe", "wi_up"), (f, d), (1, 0), count=e),
               Tensor(f"{expert}.w2.weight", ("moe", "wo"), (d, f), (1, 0), count=e)])


FAMILY = Family(
    name="mixtral", architectures=("MixtralForCausalLM",), export_architecture="MixtralForCausalLM",
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, global_tensors=global_tensors,
    layer_tensors=layer_tensors)
