"""Mamba-2 interop against transformers (float32): the fused in_proj (z | x | B | C | dt) and
conv1d (x | B | C) split into jaxlm's per-part kernels, G > 1 groups (per-group gated RMSNorm),
projection and conv biases, a finite Δt limit, tied embeddings, several SSD chunks; export loads
in transformers with the same logits; bad checkpoints fail in one line."""

import dataclasses
import json
import math

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from test_interop_llama import (TOL, ParityTests, jax_logits, max_diff,  # noqa: E402
                                one_line_error, parity_cases, rewrite, tokens)

from jaxlm.interop import hf as hf_interop  # noqa: E402
from jaxlm.interop.hf import export_hf, import_hf  # noqa: E402

SEQ = 20  # 3 SSD chunks of 8 on both sides


def mamba2_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                state_size=8, n_groups=2, expand=2, conv_kernel=4, chunk_size=8,
                layer_norm_epsilon=1e-5)
    base.update(kw)
    return transformers.Mamba2Config(**base)


CASES = {
    # 2 groups of 2 heads (head h reads group h // 2, the gated norm normalises per group).
    "groups2_untied": lambda: mamba2_config(),
    # 1 group of 8 heads, in/out projection biases, conv width 3, tied embeddings, and a Δt
    # clamp that the random dt_bias actually hits.
    "bias_tied_dtlimit": lambda: mamba2_config(
        num_heads=8, head_dim=8, n_groups=1, use_bias=True, conv_kernel=3,
        tie_word_embeddings=True, time_step_limit=(0.05, 0.6), num_hidden_layers=3),
}
build, case = parity_cases(CASES, transformers.Mamba2ForCausalLM, seq=SEQ)


@pytest.fixture(scope="module")
def clamped(tmp_path_factory):
    return build("bias_tied_dtlimit", tmp_path_factory)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    return build("groups2_untied", tmp_path_factory)


class TestParity(ParityTests):
    """Import, export and a second import of every case."""


def test_config_and_fused_tensor_split(case):
    cfg, params = case["cfg"], case["params"]
    s = cfg.ssm
    assert (cfg.layer_pattern, cfg.ffn, cfg.position_embedding) == ("M", "none", "none")
    expected = {"groups2_untied": (4, 16, 2, 4, False, False, (0.0, math.inf)),
                "bias_tied_dtlimit": (8, 8, 1, 3, True, True, (0.05, 0.6))}[case["name"]]
    assert (s.num_heads, s.head_dim, s.num_groups, s.conv_width, s.proj_bias, cfg.tie_embeddings,
            (s.dt_limit_min, s.dt_limit_max)) == expected
    # in_proj rows [z | x | B | C | dt] of layer 1 against our kernels, read back from the file.
    from safetensors import safe_open
    with safe_open(f"{case['dir']}/model.safetensors", "numpy") as f:
        w = f.get_tensor("backbone.layers.1.mixer.in_proj.weight")
        conv = f.get_tensor("backbone.layers.1.mixer.conv1d.weight")
    mamba = params["blocks"]["slot_0"]["mamba"]
    d_in, gn = s.num_heads * s.head_dim, s.num_groups * s.state_dim
    assert np.array_equal(mamba["in_proj_x"]["kernel"][1].reshape(cfg.embed_dim, d_in),
                          w[d_in:2 * d_in].T)
    assert np.array_equal(mamba["in_proj_C"]["kernel"][1].reshape(cfg.embed_dim, gn),
                          w[2 * d_in + gn:2 * d_in + 2 * gn].T)
    assert np.array_equal(mamba["conv_B"]["kernel"][1].reshape(s.conv_width, gn),
                          conv[d_in:d_in + gn, 0, :].T)


def test_dt_limit_is_exercised(clamped):
    """Dropping the clamp moves the logits: the parity above covers time_step_limit."""
    cfg = clamped["cfg"]
    free = dataclasses.replace(cfg, ssm=dataclasses.replace(cfg.ssm, dt_limit_min=0.0,
                                                            dt_limit_max=math.inf))
    toks = tokens(cfg.vocab_size, SEQ)
    assert max_diff(jax_logits(free, clamped["params"], toks), clamped["ref"]) > 100 * TOL


def test_time_step_limit_spellings():
    base = {"architectures": ["Mamba2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "num_hidden_layers": 1, "num_heads": 2, "head_dim": 8, "state_size": 4,
            "n_groups": 1, "expand": 2}
    for limit in ([0.0, {"__float__": "Infinity"}], [0.0, math.inf], None):
        cfg = hf_interop.config_from_hf({**base, "time_step_limit": limit})
        assert (cfg.ssm.dt_limit_min, cfg.ssm.dt_limit_max) == (0.0, math.inf)
    with pytest.raises(ValueError, match=r"num_heads·head_dim must equal expand·hidden_size"):
        hf_interop.config_from_hf({**base, "head_dim": 4})


@pytest.fixture
def small_dir(grouped, tmp_path):
    import shutil
    shutil.copytree(grouped["dir"], tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_fused_tensor(small_dir):
    rewrite(small_dir, lambda t: t.pop("backbone.layers.1.mixer.conv1d.weight"))
    one_line_error(lambda: import_hf(str(small_dir)),
                   "missing tensor 'backbone.layers.1.mixer.conv1d.weight'")


def test_fused_tensor_shape_mismatch(small_dir):
    def edit(t):
        t["backbone.layers.0.mixer.in_proj.weight"] = np.zeros((99, 32), np.float32)
    rewrite(small_dir, edit)
    one_line_error(lambda: import_hf(str(small_dir)),
                   r"'backbone.layers.0.mixer.in_proj.weight' has shape \[99, 32\], expected "
                   r"\[164, 32\]")


def test_bad_config_fields(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (small_dir / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: import_hf(str(small_dir)), "hidden_act='gelu'")


def test_export_needs_d_inner_a_multiple_of_width(grouped, tmp_path):
    cfg = grouped["cfg"]
    odd = dataclasses.replace(cfg, embed_dim=48)
    one_line_error(lambda: hf_interop.hf_config(odd),
                   r"model.ssm.num_heads·head_dim=64: Mamba2ForCausalLM needs a multiple of "
                   r"model.embed_dim=48")
    attention = dataclasses.replace(cfg, layer_pattern="A")
    one_line_error(lambda: export_hf(attention, grouped["params"], str(tmp_path / "out")),
                   "model.layer_pattern='A': Mamba2ForCausalLM can only express 'M'")
    assert not (tmp_path / "out").exists()
