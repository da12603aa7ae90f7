"""LLaMA and Mistral (`LlamaForCausalLM`, `MistralForCausalLM`) <-> jaxlm family "llama" (SPEC §A).

HF's `attention_bias` puts a bias on q, k, v *and* o (our `qkv_bias` and `out_bias` together).
Mistral is LLaMA without biases plus a sliding attention window, which jaxlm does not implement:
an imported Mistral gets `max_seq_len = min(max_position_embeddings, sliding_window)`, the
longest sequence on which full causal attention and the window agree exactly. Export always
writes `LlamaForCausalLM` (a window-free Mistral is exactly that).
"""

from __future__ import annotations

from jaxlm.interop import tables
from jaxlm.interop.rope import read_rope_fields, rope_from_hf, rope_to_hf
from jaxlm.interop.tables import Family, hf_field, require
from jaxlm.models.config import ModelConfig

LAYER = "model.layers.{layer}"


def check_activation(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: expected 'silu' (SwiGLU)")


def check_plain_decoder(cfg: ModelConfig, architecture: str) -> None:
    """Export checks shared by the attention-only families without Granite's extras."""
    require(cfg, "layer_pattern", "A", architecture)
    require(cfg, "ffn", "mlp", architecture)
    require(cfg, "position_embedding", "rope", architecture)
    require(cfg, "embedding_multiplier", 1.0, architecture)
    require(cfg, "residual_multiplier", 1.0, architecture)
    require(cfg, "logits_divisor", 1.0, architecture)
    require(cfg, "attention_scale", (None, cfg.head_size ** -0.5), architecture)


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    heads = hf_field(hf, "num_attention_heads")
    width = hf_field(hf, "hidden_size")
    head_dim = hf_field(hf, "head_dim", width // heads)
    fraction = read_rope_fields(hf).get("partial_rotary_factor", 1.0)
    if fraction != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={fraction!r}: LLaMA rotates whole "
                         "heads; expected 1.0")
    rope, max_seq_len = rope_from_hf(hf, fraction=1.0)
    window = hf.get("sliding_window")
    if window is not None:
        max_seq_len = min(max_seq_len, int(window))
    bias = bool(hf.get("attention_bias", False))
    return dict(
        family="llama", vocab_size=hf_field(hf, "vocab_size"), embed_dim=width,
        num_layers=hf_field(hf, "num_hidden_layers"), layer_pattern="A", num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
        head_dim=None if head_dim == width // heads else head_dim,
        mlp_dim=hf_field(hf, "intermediate_size"), ffn="mlp", norm="rms",
        norm_eps=float(hf_field(hf, "rms_norm_eps", 1e-6)), position_embedding="rope", rope=rope,
        max_seq_len=max_seq_len, qkv_bias=bias, out_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = "LlamaForCausalLM"
    check_plain_decoder(cfg, arch)
    require(cfg, "norm", "rms", arch)
    require(cfg, "qk_norm", False, arch)
    require(cfg, "parallel_residual", False, arch)
    require(cfg, "rope.fraction", 1.0, arch)
    require(cfg, "out_bias", cfg.qkv_bias, arch)  # one attention_bias flag for q, k, v and o
    return dict(
        architectures=[arch], model_type="llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, hidden_act="silu",
        rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, attention_dropout=0.0,
        mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_embeddings,
        **rope_to_hf(cfg.rope, cfg.max_seq_len, partial=False))


def global_tensors(cfg: ModelConfig) -> list[tables.Tensor]:
    return tables.embeddings(cfg) + tables.norm("model.norm", ("final_norm",), cfg.embed_dim,
                                                bias=False)


def layer_tensors(cfg: ModelConfig, kind: str) -> list[tables.Tensor]:
    d = cfg.embed_dim
    return (tables.norm(f"{LAYER}.input_layernorm", ("mixer_norm",), d, bias=False)
            + tables.attention(cfg, f"{LAYER}.self_attn")
            + tables.norm(f"{LAYER}.post_attention_layernorm", ("ffn_norm",), d, bias=False)
            + tables.swiglu(cfg, f"{LAYER}.mlp"))


FAMILY = Family(
    name="llama", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    export_architecture="LlamaForCausalLM", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, global_tensors=global_tensors, layer_tensors=layer_tensors)
