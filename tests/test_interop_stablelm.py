"""StableLM interop against transformers (float32, eager): LayerNorm + partial rotary, q/k/v bias,
per-head qk LayerNorm, parallel residual, tied embeddings; config.json in both the transformers
5 spelling (`rope_parameters`) and the 4.57 one (top-level rope_theta / partial_rotary_factor,
`rope_scaling`)."""

import json

import pytest

transformers = pytest.importorskip("transformers")
from test_interop_llama import (TOL, ParityTests, hf_logits, jax_logits, load_hf,  # noqa: E402
                                max_diff, parity_cases, tokens)

from jaxlm.interop.hf import export_hf, import_hf  # noqa: E402


def stablelm_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                attn_implementation="eager")
    base.update(kw)
    return transformers.StableLmConfig(**base)


CASES = {
    # Stable Code's shape in miniature: LayerNorm, 25% of each 16-dim head rotates, GQA, untied.
    "layernorm_partial_rotary": lambda: stablelm_config(),
    # every option at once: q/k/v bias, per-head qk LayerNorm, parallel residual (no
    # post_attention_layernorm), tied embeddings, 50% rotary with linear scaling, MHA.
    "bias_qknorm_parallel_tied": lambda: stablelm_config(
        num_key_value_heads=4, use_qkv_bias=True, qk_layernorm=True,
        use_parallel_residual=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                         "partial_rotary_factor": 0.5}),
}

_, case = parity_cases(CASES, transformers.StableLmForCausalLM)


class TestParity(ParityTests):
    """Import, export and a second import of every case."""


def test_imported_config_fields(case):
    cfg = case["cfg"]
    got = (cfg.family, cfg.norm, cfg.rope.fraction, cfg.rope.scaling, cfg.qkv_bias, cfg.out_bias,
           cfg.qk_norm, cfg.parallel_residual, cfg.tie_embeddings, cfg.kv_heads)
    assert got == {
        "layernorm_partial_rotary": ("stablelm", "layer", 0.25, "none", False, False, False,
                                     False, False, 2),
        "bias_qknorm_parallel_tied": ("stablelm", "layer", 0.5, "linear", True, False, True,
                                      True, True, 4),
    }[case["name"]]
    blocks = case["params"]["blocks"]["slot_0"]
    assert ("ffn_norm" in blocks) == (not cfg.parallel_residual)
    if cfg.qk_norm:  # per-head rows: HF q_layernorm.norms.{h}.weight -> q_norm/scale[layer, h]
        assert blocks["attention"]["q_norm"]["scale"].shape == (2, 4, 16)


def to_v4_config(config: dict) -> dict:
    """The transformers 4.57 spelling of a v5 config.json: RoPE fields at the top level."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    return config


def test_reads_transformers_457_config_json(case, tmp_path):
    src = json.loads(open(f"{case['dir']}/config.json").read())
    (tmp_path / "config.json").write_text(json.dumps(to_v4_config(src)))
    (tmp_path / "model.safetensors").symlink_to(f"{case['dir']}/model.safetensors")
    cfg, params = import_hf(str(tmp_path))
    assert cfg == case["cfg"]
    toks = tokens(cfg.vocab_size)
    assert max_diff(jax_logits(cfg, params, toks), case["ref"]) <= TOL


def test_exported_config_json_has_457_fields_that_load_alone(case, tmp_path):
    """Our config.json carries both spellings; with the v5 `rope_parameters` removed (what 4.57
    reads) transformers still builds the same model."""
    out = export_hf(case["cfg"], case["params"], str(tmp_path / "out"))
    config = json.loads(open(f"{out}/config.json").read())
    assert config["rope_theta"] == case["cfg"].rope.theta
    assert config["partial_rotary_factor"] == case["cfg"].rope.fraction
    assert (config["rope_scaling"] or {}).get("rope_type", "none") == case["cfg"].rope.scaling
    del config["rope_parameters"]
    with open(f"{out}/config.json", "w") as f:
        json.dump(config, f)
    toks = tokens(case["cfg"].vocab_size)
    assert max_diff(hf_logits(load_hf(out), toks), case["ref"]) <= TOL


def test_export_rejects_head_dim_stablelm_cannot_express(case, tmp_path):
    import dataclasses
    cfg = dataclasses.replace(case["cfg"], head_dim=8, mlp_bias=False)
    with pytest.raises(ValueError, match="model.head_dim=8: StableLmForCausalLM") as err:
        export_hf(cfg, case["params"], str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
