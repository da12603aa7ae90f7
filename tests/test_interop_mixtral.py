"""Mixtral interop against transformers (float32, eager): per-expert w1/w3/w2 tensors into the
stacked expert kernels, softmax -> top-k -> renormalise routing, GQA, tied embeddings, explicit
head_dim, a sliding window, YaRN; export loads in transformers with the same logits."""

import dataclasses

import pytest

transformers = pytest.importorskip("transformers")
from test_interop_llama import (TOL, ParityTests, jax_logits, max_diff,  # noqa: E402
                                one_line_error, parity_cases, tokens)

from jaxlm.interop.hf import export_hf  # noqa: E402


def mixtral_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                attn_implementation="eager")
    base.update(kw)
    return transformers.MixtralConfig(**base)


CASES = {
    # GQA 4:2, untied, top-2 of 4 experts.
    "gqa_top2": lambda: mixtral_config(),
    # top-3 of 5 (renormalisation over 3 weights), tied, head_dim 16 != 32/4, a window longer
    # than the test sequence, YaRN.
    "tied_top3_window_yarn": lambda: mixtral_config(
        num_local_experts=5, num_experts_per_tok=3, tie_word_embeddings=True, head_dim=16,
        sliding_window=64, router_aux_loss_coef=0.02, num_hidden_layers=3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}),
}
build, case = parity_cases(CASES, transformers.MixtralForCausalLM, seq=16)


@pytest.fixture(scope="module")
def top3(tmp_path_factory):
    return build("tied_top3_window_yarn", tmp_path_factory)


class TestParity(ParityTests):
    """Import, export and a second import of every case."""


def test_config_maps_routing_and_window(case):
    cfg = case["cfg"]
    m = cfg.moe
    assert (cfg.ffn, m.router, m.renormalize, m.num_shared_experts) == ("moe", "softmax_topk",
                                                                         True, 0)
    expected = {"gqa_top2": dict(experts=4, k=2, aux=0.001 * 2, max_seq_len=128, head_size=8,
                                 tied=False),
                "tied_top3_window_yarn": dict(experts=5, k=3, aux=0.02 * 3, max_seq_len=64,
                                              head_size=16, tied=True)}[case["name"]]
    got = dict(experts=m.num_experts, k=m.top_k, aux=m.aux_loss_coef, max_seq_len=cfg.max_seq_len,
               head_size=cfg.head_size, tied=cfg.tie_embeddings)
    assert got == pytest.approx(expected)
    assert case["params"]["blocks"]["slot_0"]["moe"]["wi_gate"].shape == (
        cfg.num_layers, m.num_experts, cfg.embed_dim, m.mlp_dim)


def test_renormalisation_is_what_matches(top3):
    """Without dividing the top-k weights by their sum the logits move well past the
    tolerance: the parity above really exercises Mixtral's renormalised routing. (Softmax over
    all experts, top-k, renormalise equals Granite's softmax over the top-k logits in exact
    arithmetic; both spellings are kept for what they are in HF.)"""
    cfg = top3["cfg"]
    plain = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, renormalize=False))
    toks = tokens(cfg.vocab_size, 16)
    assert max_diff(jax_logits(plain, top3["params"], toks), top3["ref"]) > 100 * TOL


def test_export_rejects_what_mixtral_cannot_express(top3, tmp_path):
    cfg = top3["cfg"]
    granite_like = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe,
                                                                    router="sigmoid_bias"))
    one_line_error(lambda: export_hf(granite_like, top3["params"], str(tmp_path / "a")),
                   "model.moe.router='sigmoid_bias': MixtralForCausalLM can only express "
                   "'softmax_topk'")
    scaled = dataclasses.replace(cfg, residual_multiplier=0.5)
    one_line_error(lambda: export_hf(scaled, top3["params"], str(tmp_path / "b")),
                   "model.residual_multiplier=0.5")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
