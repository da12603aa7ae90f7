"""Granite-4 hybrid interop against transformers (float32, eager): mixed Mamba-2 / attention
layer_types into a repeated layer_pattern, NoPE and RoPE attention with attention_multiplier as
the softmax scale, embedding / residual / logits multipliers, G > 1 Mamba groups, top-k ->
softmax routed experts plus the shared MLP (fused input_linear), the dense variant without
experts; export loads in transformers with the same logits; one-line errors."""

import dataclasses
import json
import math

import pytest

transformers = pytest.importorskip("transformers")
from test_interop_llama import ParityTests, one_line_error, parity_cases  # noqa: E402

from jaxlm.interop import hf as hf_interop  # noqa: E402
from jaxlm.interop.granite import shortest_pattern  # noqa: E402
from jaxlm.interop.hf import export_hf, import_hf  # noqa: E402

SEQ = 20  # 3 SSD chunks of 8


def granite_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=24, shared_intermediate_size=20,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                num_local_experts=4, num_experts_per_tok=2,
                layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=4,
                mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4,
                mamba_chunk_size=8, embedding_multiplier=3.0, residual_multiplier=0.4,
                attention_multiplier=0.09, logits_scaling=2.5, rms_norm_eps=1e-5,
                max_position_embeddings=128, attn_implementation="eager")
    base.update(kw)
    return transformers.GraniteMoeHybridConfig(**base)


CASES = {
    # H-Tiny in miniature: NoPE, two Mamba layers then attention, repeated (pattern "MMA"), 4
    # Mamba groups of 2 heads, top-3 of 6 routed experts plus the shared MLP, and all four
    # Granite multipliers away from 1.
    "nope_moe_groups4": lambda: granite_config(
        num_hidden_layers=6, layer_types=["mamba", "mamba", "attention"] * 2,
        num_local_experts=6, num_experts_per_tok=3, mamba_n_heads=8, mamba_d_head=8,
        mamba_n_groups=4),
    # an irregular stack (no shorter repeat: pattern "MMAM"), RoPE, attention bias on q/k/v/o,
    # no routed experts (the shared MLP is the FFN), 1 group, in/out projection bias, no conv
    # bias, a Δt clamp, tied embeddings.
    "rope_dense_irregular": lambda: granite_config(
        layer_types=["mamba", "mamba", "attention", "mamba"], position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, attention_bias=True,
        num_local_experts=0, mamba_n_groups=1, mamba_proj_bias=True, mamba_conv_bias=False,
        time_step_limit=(0.0, 0.5), tie_word_embeddings=True),
}
build, case = parity_cases(CASES, transformers.GraniteMoeHybridForCausalLM, seq=SEQ)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return build("nope_moe_groups4", tmp_path_factory)


class TestParity(ParityTests):
    """Import, export and a second import of every case."""


def test_config_fields(case):
    cfg = case["cfg"]
    expected = {
        "nope_moe_groups4": dict(pattern="MMA", pos="none", ffn="moe", groups=4, bias=False,
                                 tied=False),
        "rope_dense_irregular": dict(pattern="MMAM", pos="rope", ffn="mlp", groups=1, bias=True,
                                     tied=True),
    }[case["name"]]
    got = dict(pattern=cfg.layer_pattern, pos=cfg.position_embedding, ffn=cfg.ffn,
               groups=cfg.ssm.num_groups, bias=cfg.qkv_bias and cfg.out_bias,
               tied=cfg.tie_embeddings)
    assert got == expected
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_scale,
            cfg.logits_divisor) == pytest.approx((3.0, 0.4, 0.09, 2.5))
    if cfg.ffn == "moe":
        m = cfg.moe
        assert (m.router, m.num_shared_experts, m.shared_mlp_dim) == ("topk_softmax", 1, 20)
        assert m.aux_loss_coef == pytest.approx(0.001 * m.top_k)
    else:
        assert cfg.mlp_dim == 20


def test_layer_types_spellings_and_patterns():
    assert [shortest_pattern(s) for s in ("MMMMMAMMMM" * 4, "MAMA", "MMAM", "A")] == \
        ["MMMMMAMMMM", "MA", "MMAM", "A"]
    base = {"architectures": ["GraniteMoeHybridForCausalLM"], "vocab_size": 8, "hidden_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2, "mamba_n_heads": 2,
            "mamba_d_head": "auto", "mamba_d_state": 4, "num_local_experts": 2,
            "intermediate_size": 8, "shared_intermediate_size": 8,
            "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    old = hf_interop.config_from_hf({**base, "layer_types": ["mamba", "attention"] * 2})
    new = hf_interop.config_from_hf({**base, "layer_types": ["linear_attention",
                                                             "full_attention"] * 2})
    assert old == new and old.layer_pattern == "MA" and old.ssm.head_dim == 16
    assert old.ssm.dt_limit_max == math.inf
    with pytest.raises(ValueError, match=r"layer_types\[1\]='moe': expected one of"):
        hf_interop.config_from_hf({**base, "layer_types": ["mamba", "moe", "mamba", "mamba"]})
    with pytest.raises(ValueError, match="layer_types has 2 entries: expected "
                                         "num_hidden_layers=4"):
        hf_interop.config_from_hf({**base, "layer_types": ["mamba", "attention"]})


def test_exported_config_json(case, tmp_path):
    hf = hf_interop.hf_config(case["cfg"])
    kinds = {"nope_moe_groups4": ["mamba", "mamba", "attention"] * 2,
             "rope_dense_irregular": ["mamba", "mamba", "attention", "mamba"]}[case["name"]]
    assert hf["layer_types"] == kinds
    assert hf["position_embedding_type"] == ("rope" if case["cfg"].position_embedding == "rope"
                                             else None)
    json.dumps(hf)  # plain JSON (infinity as the Infinity literal)


def test_bad_input(hybrid, tmp_path):
    cfg = hybrid["cfg"]
    no_shared = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=0))
    one_line_error(lambda: hf_interop.hf_config(no_shared),
                   "model.moe.num_shared_experts=0: GraniteMoeHybridForCausalLM always has a "
                   "shared MLP")
    softmax_first = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe,
                                                                     router="softmax_topk"))
    one_line_error(lambda: export_hf(softmax_first, hybrid["params"], str(tmp_path / "out")),
                   "model.moe.router='softmax_topk': GraniteMoeHybridForCausalLM can only "
                   "express 'topk_softmax'")
    assert not (tmp_path / "out").exists()
    import shutil
    from test_interop_llama import rewrite
    shutil.copytree(hybrid["dir"], tmp_path / "hf")
    rewrite(tmp_path / "hf", lambda t: t.pop("model.layers.1.mamba.in_proj.weight"))
    one_line_error(lambda: import_hf(str(tmp_path / "hf")),
                   "missing tensor 'model.layers.1.mamba.in_proj.weight'")
