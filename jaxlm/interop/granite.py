"""Granite-4 hybrids (`GraniteMoeHybridForCausalLM`) <-> jaxlm family "granite_hybrid" (SPEC §C).

Each layer is `input_layernorm` -> a Mamba-2 mixer (`mamba`, rows shared with Mamba-2, see
`mamba2.mixer_rows`) or GQA attention (`self_attn`, softmax scale `attention_multiplier`, RoPE
only when `position_embedding_type == "rope"`, else NoPE) -> `post_attention_layernorm` -> the
routed experts (`block_sparse_moe`) plus an always-on `shared_mlp`, each branch × the residual
multiplier. Embeddings are × `embedding_multiplier` and logits ÷ `logits_scaling`.

`layer_types` ("mamba"/"attention" in 4.57, "linear_attention"/"full_attention" in 5.x) becomes
the shortest `layer_pattern` whose repeats give the list (period 10 for H-Tiny's one attention
layer in ten; the whole list if nothing shorter repeats). Export writes the 4.57 names, which
5.x maps to its own.

Fused tensors: `input_linear` [E, 2I, D] is gate ‖ up along axis 1 (our wi_gate, wi_up
[E, D, I]), `output_linear` [E, D, I] is wo [E, I, D], `router.layer` [E, D] is router [D, E];
the shared MLP's `input_linear` [2S, D] splits into gate / up [D, S]. Routing is top-k of the
float32 logits, then softmax over those k: our `router="topk_softmax"`. The load-balancing
coefficient maps as for Mixtral (×k). With `num_local_experts == 0` the FFN is the shared MLP
alone: our dense `ffn="mlp"` of width S.
"""

from __future__ import annotations

from jaxlm.interop import tables
from jaxlm.interop.llama import check_activation
from jaxlm.interop.mamba2 import expand_of, mixer_rows, ssm_fields
from jaxlm.interop.rope import read_rope_fields, rope_from_hf, rope_to_hf
from jaxlm.interop.tables import Family, Tensor, hf_field, require
from jaxlm.models.config import ModelConfig

LAYER = "model.layers.{layer}"
KINDS = {"mamba": "M", "linear_attention": "M", "attention": "A", "full_attention": "A"}
HF_KIND = {"M": "mamba", "A": "attention"}


def shortest_pattern(letters: str) -> str:
    """The shortest p with p · (len / len(p)) == letters."""
    n = len(letters)
    for period in range(1, n + 1):
        if n % period == 0 and letters[:period] * (n // period) == letters:
            return letters[:period]
    return letters


def layer_pattern(hf: dict, num_layers: int) -> str:
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * num_layers
    if len(types) != num_layers:
        raise ValueError(f"config.json layer_types has {len(types)} entries: expected "
                         f"num_hidden_layers={num_layers}")
    for i, kind in enumerate(types):
        if kind not in KINDS:
            raise ValueError(f"config.json layer_types[{i}]={kind!r}: expected one of "
                             f"{sorted(KINDS)}")
    return shortest_pattern("".join(KINDS[k] for k in types))


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    width = hf_field(hf, "hidden_size")
    heads = hf_field(hf, "num_attention_heads")
    head_dim = hf_field(hf, "head_dim", width // heads)
    num_layers = hf_field(hf, "num_hidden_layers")
    nope = hf.get("position_embedding_type") != "rope"
    fraction = read_rope_fields(hf).get("partial_rotary_factor", 1.0)
    if not nope and fraction != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={fraction!r}: Granite rotates whole "
                         "heads; expected 1.0")
    rope, max_seq_len = rope_from_hf(hf, fraction=1.0)
    experts = int(hf.get("num_local_experts", 8) or 0)
    shared = int(hf_field(hf, "shared_intermediate_size", 1024))
    top_k = int(hf_field(hf, "num_experts_per_tok", 2))
    ffn: dict = dict(ffn="mlp", mlp_dim=shared, mlp_bias=False)
    if experts:
        ffn = dict(ffn="moe", mlp_dim=0, moe=dict(
            num_experts=experts, top_k=top_k, mlp_dim=hf_field(hf, "intermediate_size"),
            num_shared_experts=1 if shared else 0, shared_mlp_dim=shared, router="topk_softmax",
            aux_loss_coef=float(hf_field(hf, "router_aux_loss_coef", 0.001)) * top_k,
            z_loss_coef=0.0))
    ssm = ssm_fields(hf, width, heads="mamba_n_heads", head_dim="mamba_d_head",
                     state="mamba_d_state", groups="mamba_n_groups", conv="mamba_d_conv",
                     expand="mamba_expand", chunk="mamba_chunk_size", conv_bias="mamba_conv_bias",
                     proj_bias="mamba_proj_bias",
                     defaults={"mamba_n_heads": 128, "mamba_d_state": 256})
    bias = bool(hf.get("attention_bias", False))
    scale = hf_field(hf, "attention_multiplier", 1.0)
    return dict(
        family="granite_hybrid", vocab_size=hf_field(hf, "vocab_size"), embed_dim=width,
        num_layers=num_layers, layer_pattern=layer_pattern(hf, num_layers), num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
        head_dim=None if head_dim == width // heads else head_dim, **ffn, ssm=ssm, norm="rms",
        norm_eps=float(hf_field(hf, "rms_norm_eps", 1e-6)),
        position_embedding="none" if nope else "rope", rope=rope, max_seq_len=max_seq_len,
        qkv_bias=bias, out_bias=bias, attention_scale=float(scale),
        embedding_multiplier=float(hf_field(hf, "embedding_multiplier", 1.0)),
        residual_multiplier=float(hf_field(hf, "residual_multiplier", 1.0)),
        logits_divisor=float(hf_field(hf, "logits_scaling", 1.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = "GraniteMoeHybridForCausalLM"
    for name, allowed in (("ffn", ("moe", "mlp")), ("norm", "rms"), ("qk_norm", False),
                          ("parallel_residual", False), ("out_bias", cfg.qkv_bias),
                          ("head_dim", (None, cfg.embed_dim // cfg.num_heads))):
        require(cfg, name, allowed, arch)
    if cfg.position_embedding == "rope":
        require(cfg, "rope.fraction", 1.0, arch)
    m = cfg.moe
    if cfg.ffn == "moe":
        for name, allowed in (("moe.router", "topk_softmax"), ("moe.routed_scaling", 1.0)):
            require(cfg, name, allowed, arch)
        if m.num_shared_experts < 1:
            raise ValueError(f"model.moe.num_shared_experts={m.num_shared_experts}: {arch} always "
                             "has a shared MLP; expected >= 1")
        moe = dict(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   intermediate_size=m.mlp_dim,
                   shared_intermediate_size=m.num_shared_experts * (m.shared_mlp_dim or m.mlp_dim),
                   router_aux_loss_coef=m.aux_loss_coef / m.top_k)
    else:
        require(cfg, "mlp_bias", False, arch)
        moe = dict(num_local_experts=0, num_experts_per_tok=max(m.top_k, 1),
                   intermediate_size=cfg.mlp_dim, shared_intermediate_size=cfg.mlp_dim,
                   router_aux_loss_coef=0.001)
    s = cfg.ssm
    hf = dict(
        architectures=[arch], model_type="granitemoehybrid", vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias,
        attention_dropout=0.0, attention_multiplier=(cfg.attention_scale
                                                     if cfg.attention_scale is not None
                                                     else cfg.head_size ** -0.5),
        embedding_multiplier=cfg.embedding_multiplier,
        residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_divisor,
        layer_types=[HF_KIND[cfg.layer_pattern[i % len(cfg.layer_pattern)]]
                     for i in range(cfg.num_layers)],
        position_embedding_type="rope" if cfg.position_embedding == "rope" else None,
        output_router_logits=False, tie_word_embeddings=cfg.tie_embeddings, **moe,
        mamba_n_heads=s.num_heads, mamba_d_head=s.head_dim, mamba_d_state=s.state_dim,
        mamba_n_groups=s.num_groups, mamba_d_conv=s.conv_width,
        mamba_expand=expand_of(cfg, arch) if "mamba" in cfg.pattern else 2,
        mamba_chunk_size=s.chunk_size, mamba_conv_bias=s.conv_bias,
        mamba_proj_bias=s.proj_bias, time_step_limit=[s.dt_limit_min, s.dt_limit_max])
    hf.update(rope_to_hf(cfg.rope, cfg.max_seq_len, partial=False))
    return hf


def global_tensors(cfg: ModelConfig) -> list[Tensor]:
    return tables.embeddings(cfg) + tables.norm("model.norm", ("final_norm",), cfg.embed_dim,
                                                bias=False)


def ffn_rows(cfg: ModelConfig) -> list[Tensor]:
    d = cfg.embed_dim
    shared = f"{LAYER}.shared_mlp"
    if cfg.ffn == "mlp":
        return _shared_rows(shared, ("mlp",), cfg.mlp_dim, d)
    m = cfg.moe
    e, f = m.num_experts, m.mlp_dim
    moe = f"{LAYER}.block_sparse_moe"
    rows = [tables.linear(f"{moe}.router.layer.weight", ("moe", "router", "kernel"), e, d),
            Tensor(f"{moe}.input_linear.weight", ("moe", "wi_gate"), (e, 2 * f, d), (0, 2, 1),
                   part=(1, 0, f)),
            Tensor(f"{moe}.input_linear.weight", ("moe", "wi_up"), (e, 2 * f, d), (0, 2, 1),
                   part=(1, f, 2 * f)),
            Tensor(f"{moe}.output_linear.weight", ("moe", "wo"), (e, d, f), (0, 2, 1))]
    if m.num_shared_experts:
        width = m.num_shared_experts * (m.shared_mlp_dim or m.mlp_dim)
        rows += _shared_rows(shared, ("moe", "shared"), width, d)
    return rows


def _shared_rows(prefix: str, path: tuple[str, ...], width: int, d: int) -> list[Tensor]:
    fused = f"{prefix}.input_linear.weight"
    return [Tensor(fused, path + ("gate_proj", "kernel"), (2 * width, d), (1, 0),
                   part=(0, 0, width)),
            Tensor(fused, path + ("up_proj", "kernel"), (2 * width, d), (1, 0),
                   part=(0, width, 2 * width)),
            tables.linear(f"{prefix}.output_linear.weight", path + ("down_proj", "kernel"), d,
                          width)]


def layer_tensors(cfg: ModelConfig, kind: str) -> list[Tensor]:
    d = cfg.embed_dim
    mixer = (mixer_rows(cfg, f"{LAYER}.mamba") if kind == "mamba"
             else tables.attention(cfg, f"{LAYER}.self_attn"))
    return (tables.norm(f"{LAYER}.input_layernorm", ("mixer_norm",), d, bias=False) + mixer
            + tables.norm(f"{LAYER}.post_attention_layernorm", ("ffn_norm",), d, bias=False)
            + ffn_rows(cfg))


FAMILY = Family(
    name="granite_hybrid", architectures=("GraniteMoeHybridForCausalLM",),
    export_architecture="GraniteMoeHybridForCausalLM", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, global_tensors=global_tensors, layer_tensors=layer_tensors)
