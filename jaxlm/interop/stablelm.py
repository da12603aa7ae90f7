"""StableLM / Stable Code (`StableLmForCausalLM`) <-> jaxlm family "stablelm" (SPEC §B).

LayerNorm with weight and bias everywhere, partial rotary (`partial_rotary_factor`, 0.25 when a
4.57 file omits it), optional q/k/v bias (o_proj never has one), optional per-head qk LayerNorm
without bias stored as one tensor per head (`q_layernorm.norms.{h}.weight`, our `q_norm/scale`
row h), optional parallel residual (then there is no `post_attention_layernorm`). HF derives
head_dim = hidden_size / num_attention_heads, so an explicit other head_dim cannot be exported.
"""

from __future__ import annotations

from jaxlm.interop import tables
from jaxlm.interop.llama import check_activation, check_plain_decoder
from jaxlm.interop.rope import read_rope_fields, rope_from_hf, rope_to_hf
from jaxlm.interop.tables import Family, hf_field, require
from jaxlm.models.config import ModelConfig

LAYER = "model.layers.{layer}"
DEFAULT_FRACTION = 0.25


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    heads = hf_field(hf, "num_attention_heads")
    fraction = float(read_rope_fields(hf).get("partial_rotary_factor", DEFAULT_FRACTION))
    rope, max_seq_len = rope_from_hf(hf, fraction=fraction)
    return dict(
        family="stablelm", vocab_size=hf_field(hf, "vocab_size"),
        embed_dim=hf_field(hf, "hidden_size"), num_layers=hf_field(hf, "num_hidden_layers"),
        layer_pattern="A", num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
        mlp_dim=hf_field(hf, "intermediate_size"), ffn="mlp", norm="layer",
        norm_eps=float(hf_field(hf, "layer_norm_eps", 1e-5)), position_embedding="rope",
        rope=rope, max_seq_len=max_seq_len, qkv_bias=bool(hf.get("use_qkv_bias", False)),
        out_bias=False, mlp_bias=False, qk_norm=bool(hf.get("qk_layernorm", False)),
        parallel_residual=bool(hf.get("use_parallel_residual", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = "StableLmForCausalLM"
    check_plain_decoder(cfg, arch)
    require(cfg, "norm", "layer", arch)
    require(cfg, "out_bias", False, arch)
    require(cfg, "mlp_bias", False, arch)
    require(cfg, "head_dim", (None, cfg.embed_dim // cfg.num_heads), arch)
    return dict(
        architectures=[arch], model_type="stablelm", vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, hidden_act="silu", layer_norm_eps=cfg.norm_eps,
        use_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm,
        use_parallel_residual=cfg.parallel_residual, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        **rope_to_hf(cfg.rope, cfg.max_seq_len, partial=True))


def global_tensors(cfg: ModelConfig) -> list[tables.Tensor]:
    return tables.embeddings(cfg) + tables.norm("model.norm", ("final_norm",), cfg.embed_dim,
                                                bias=True)


def layer_tensors(cfg: ModelConfig, kind: str) -> list[tables.Tensor]:
    d, k = cfg.embed_dim, cfg.head_size
    rows = (tables.norm(f"{LAYER}.input_layernorm", ("mixer_norm",), d, bias=True)
            + tables.attention(cfg, f"{LAYER}.self_attn"))
    if cfg.qk_norm:
        rows += [
            tables.vector(f"{LAYER}.self_attn.q_layernorm.norms.{{index}}.weight",
                          ("attention", "q_norm", "scale"), k, count=cfg.num_heads),
            tables.vector(f"{LAYER}.self_attn.k_layernorm.norms.{{index}}.weight",
                          ("attention", "k_norm", "scale"), k, count=cfg.kv_heads)]
    if not cfg.parallel_residual:
        rows += tables.norm(f"{LAYER}.post_attention_layernorm", ("ffn_norm",), d, bias=True)
    return rows + tables.swiglu(cfg, f"{LAYER}.mlp")


FAMILY = Family(
    name="stablelm", architectures=("StableLmForCausalLM",),
    export_architecture="StableLmForCausalLM", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, global_tensors=global_tensors, layer_tensors=layer_tensors)
