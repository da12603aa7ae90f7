"""Mamba-2 (`Mamba2ForCausalLM`) <-> jaxlm family "mamba2" (SPEC §C mixer, §D scan).

HF's model is `backbone.embeddings` -> layers of `norm` (RMSNorm) + `mixer` (Mamba-2) added to
the residual, no FFN -> `backbone.norm_f` -> `lm_head`: our layer_pattern "M" with ffn="none".
`mixer_rows` (shared with Granite-4 hybrids, whose mixer is `mamba`) splits the fused HF tensors
into our per-part kernels (see `jaxlm.layers.ssm.Mamba2` for the layout):

    in_proj.weight  [2·d_in + 2GN + Hm, D]  rows z | x | B | C | dt
    in_proj.bias    the same row ranges                              (use_bias)
    conv1d.weight   [d_in + 2GN, 1, K]      channels x | B | C       -> conv_{x,B,C} [K, ...]
    conv1d.bias     the same channels                                (use_conv_bias)
    dt_bias, A_log, D [Hm]; norm.weight [d_in]; out_proj.weight [D, d_in] (+ bias)

The gated RMSNorm normalises each of the G groups of d_in/G channels (transformers 5 and
mamba_ssm; 4.57 normalised all d_in at once, the same only for G = 1), as jaxlm's does.
`time_step_limit` clamps Δt after the softplus (our dt_limit_min / dt_limit_max);
time_step_min / max only initialise Δt (our dt_min / dt_max). `residual_in_fp32` changes
nothing in float32. An SSM has no position limit; the imported max_seq_len is 2^20.
"""

from __future__ import annotations

import math

from jaxlm.interop import tables
from jaxlm.interop.llama import check_activation
from jaxlm.interop.tables import Family, Tensor, hf_field, require
from jaxlm.models.config import ModelConfig

LAYER = "backbone.layers.{layer}"
MAX_SEQ_LEN = 1 << 20


def read_time_step_limit(hf: dict, key: str = "time_step_limit") -> tuple[float, float]:
    """(min, max) of a config.json limit; transformers 5 writes infinity as {"__float__": ...}."""
    value = hf.get(key)
    if value is None:
        return 0.0, math.inf

    def number(x):
        if isinstance(x, dict) and "__float__" in x:
            x = x["__float__"]
        try:
            return float(x)
        except (TypeError, ValueError):
            raise ValueError(f"config.json {key}={value!r}: expected two numbers") from None

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"config.json {key}={value!r}: expected [min, max]")
    return number(value[0]), number(value[1])


def ssm_fields(hf: dict, width: int, *, heads: str, head_dim: str, state: str, groups: str,
               conv: str, expand: str, chunk: str, conv_bias: str, proj_bias: str,
               defaults: dict) -> dict:
    """SSMConfig fields from a config.json, given the family's key names."""
    n_heads = hf_field(hf, heads, defaults.get(heads))
    expansion = hf_field(hf, expand, defaults.get(expand, 2))
    p = hf.get(head_dim, defaults.get(head_dim, "auto"))
    if p in (None, "auto"):
        p = expansion * width // n_heads
    if n_heads * p != expansion * width:
        raise ValueError(f"config.json {heads}={n_heads}, {head_dim}={p}: {heads}·{head_dim} must "
                         f"equal {expand}·hidden_size = {expansion * width}")
    limit_min, limit_max = read_time_step_limit(hf)
    return dict(num_heads=n_heads, head_dim=p, state_dim=hf_field(hf, state, defaults.get(state)),
                num_groups=hf_field(hf, groups, defaults.get(groups, 1)),
                conv_width=hf_field(hf, conv, defaults.get(conv, 4)),
                chunk_size=hf_field(hf, chunk, 256),
                conv_bias=bool(hf.get(conv_bias, True)), proj_bias=bool(hf.get(proj_bias, False)),
                dt_limit_min=limit_min, dt_limit_max=limit_max)


def expand_of(cfg: ModelConfig, architecture: str) -> int:
    """HF's `expand`: d_in = Hm·P must be a whole multiple of the width."""
    d_in = cfg.ssm.num_heads * cfg.ssm.head_dim
    if d_in % cfg.embed_dim:
        raise ValueError(f"model.ssm.num_heads·head_dim={d_in}: {architecture} needs a multiple "
                         f"of model.embed_dim={cfg.embed_dim} (d_in = expand·hidden_size)")
    return d_in // cfg.embed_dim


def mixer_rows(cfg: ModelConfig, prefix: str) -> list[Tensor]:
    """Rows of one Mamba-2 mixer stored under `prefix` (e.g. 'model.layers.{layer}.mamba')."""
    s, d = cfg.ssm, cfg.embed_dim
    d_in, gn, h = s.num_heads * s.head_dim, s.num_groups * s.state_dim, s.num_heads
    conv_dim = d_in + 2 * gn
    proj = d_in + conv_dim + h
    in_parts = (("in_proj_z", 0, d_in), ("in_proj_x", d_in, 2 * d_in),
                ("in_proj_B", 2 * d_in, 2 * d_in + gn),
                ("in_proj_C", 2 * d_in + gn, 2 * d_in + 2 * gn),
                ("in_proj_dt", 2 * d_in + 2 * gn, proj))
    conv_parts = (("conv_x", 0, d_in), ("conv_B", d_in, d_in + gn),
                  ("conv_C", d_in + gn, conv_dim))
    rows = [Tensor(f"{prefix}.in_proj.weight", ("mamba", name, "kernel"), (proj, d), (1, 0),
                   part=(0, start, stop)) for name, start, stop in in_parts]
    rows += [Tensor(f"{prefix}.conv1d.weight", ("mamba", name, "kernel"),
                    (conv_dim, 1, s.conv_width), (2, 1, 0), part=(0, start, stop))
             for name, start, stop in conv_parts]
    if s.proj_bias:
        rows += [Tensor(f"{prefix}.in_proj.bias", ("mamba", name, "bias"), (proj,),
                        part=(0, start, stop)) for name, start, stop in in_parts]
    if s.conv_bias:
        rows += [Tensor(f"{prefix}.conv1d.bias", ("mamba", name, "bias"), (conv_dim,),
                        part=(0, start, stop)) for name, start, stop in conv_parts]
    rows += [tables.vector(f"{prefix}.{name}", ("mamba", name), h)
             for name in ("dt_bias", "A_log", "D")]
    rows += [tables.vector(f"{prefix}.norm.weight", ("mamba", "norm", "scale"), d_in),
             tables.linear(f"{prefix}.out_proj.weight", ("mamba", "out_proj", "kernel"), d, d_in)]
    if s.proj_bias:
        rows.append(tables.vector(f"{prefix}.out_proj.bias", ("mamba", "out_proj", "bias"), d))
    return rows


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    width = hf_field(hf, "hidden_size")
    ssm = ssm_fields(hf, width, heads="num_heads", head_dim="head_dim", state="state_size",
                     groups="n_groups", conv="conv_kernel", expand="expand", chunk="chunk_size",
                     conv_bias="use_conv_bias", proj_bias="use_bias",
                     defaults={"n_groups": 8, "state_size": 128, "num_heads": 128,
                               "head_dim": 64})
    ssm.update(dt_min=float(hf.get("time_step_min", 0.001)),
               dt_max=float(hf.get("time_step_max", 0.1)))
    return dict(
        family="mamba2", vocab_size=hf_field(hf, "vocab_size"), embed_dim=width,
        num_layers=hf_field(hf, "num_hidden_layers"), layer_pattern="M", mlp_dim=0, ffn="none",
        norm="rms", norm_eps=float(hf_field(hf, "layer_norm_epsilon", 1e-5)),
        position_embedding="none", max_seq_len=MAX_SEQ_LEN, ssm=ssm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = "Mamba2ForCausalLM"
    for name, allowed in (("layer_pattern", "M"), ("ffn", "none"), ("norm", "rms"),
                          ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                          ("logits_divisor", 1.0)):
        require(cfg, name, allowed, arch)
    s = cfg.ssm
    return dict(
        architectures=[arch], model_type="mamba2", vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        expand=expand_of(cfg, arch), num_heads=s.num_heads, head_dim=s.head_dim,
        state_size=s.state_dim, n_groups=s.num_groups, conv_kernel=s.conv_width,
        chunk_size=s.chunk_size, use_bias=s.proj_bias, use_conv_bias=s.conv_bias,
        hidden_act="silu", layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=True,
        time_step_min=s.dt_min, time_step_max=s.dt_max,
        time_step_limit=[s.dt_limit_min, s.dt_limit_max],
        tie_word_embeddings=cfg.tie_embeddings)


def global_tensors(cfg: ModelConfig) -> list[Tensor]:
    return (tables.embeddings(cfg, embed="backbone.embeddings.weight")
            + tables.norm("backbone.norm_f", ("final_norm",), cfg.embed_dim, bias=False))


def layer_tensors(cfg: ModelConfig, kind: str) -> list[Tensor]:
    return (tables.norm(f"{LAYER}.norm", ("mixer_norm",), cfg.embed_dim, bias=False)
            + mixer_rows(cfg, f"{LAYER}.mixer"))


FAMILY = Family(
    name="mamba2", architectures=("Mamba2ForCausalLM",), export_architecture="Mamba2ForCausalLM",
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, global_tensors=global_tensors,
    layer_tensors=layer_tensors)
