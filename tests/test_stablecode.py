"""Stable Code family: the 3B shape's parameter count, partial rotary against a float64
reference, and logits parity with transformers' StableLM (sequential and parallel residual,
qkv bias, per-head qk LayerNorm, GQA)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers.rotary import RopeConfig, apply_rotary, rope_cos_sin, rotary_dim
from jaxlm.models import presets
from jaxlm.models.decoder import Decoder
from jaxlm.schema import replace


def test_stablecode_3b_shape_and_parameter_count():
    cfg = presets.get("stablelm", "stablecode-3b")
    assert (cfg.norm, cfg.norm_eps, cfg.rope.theta, cfg.rope.fraction, cfg.max_seq_len) == (
        "layer", 1e-5, 1e6, 0.25, 16384)
    assert cfg.head_size == 80 and rotary_dim(cfg.head_size, cfg.rope.fraction) == 20
    assert not (cfg.qkv_bias or cfg.tie_embeddings or cfg.parallel_residual)
    abstract = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                        jnp.zeros((1, 8), jnp.int32)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    assert count == 2_795_443_200
    tiny = presets.get("stablelm", "tiny")
    assert tiny.family == "stablelm" and tiny.norm == "layer" and tiny.rope.fraction == 0.25
    assert "stablelm" in presets.names() and presets.sizes("stablelm") == ["stablecode-3b", "tiny"]


def rotary_reference(x, positions, theta, rot):
    """float64 rotate-half RoPE on the first `rot` dims; the rest copied."""
    x = x.astype(np.float64)
    inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    ang = positions[..., None].astype(np.float64) * inv  # [b, t, rot/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :rot // 2], x[..., rot // 2:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def test_partial_rotary_quarter_matches_float64_and_leaves_the_rest_untouched():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3, 80)).astype(np.float32)
    # positions < 64 keep the float32 angle error (pos · ulp) below 1e-5
    positions = rng.integers(0, 64, (2, 9))
    cfg = RopeConfig(theta=1e6, fraction=0.25)
    rot = rotary_dim(80, cfg.fraction)
    cos, sin = rope_cos_sin(jnp.asarray(positions), cfg, rot, jnp.float32)
    y = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
    assert rot == 20 and cos.shape == (2, 9, 20)
    np.testing.assert_array_equal(y[..., 20:], x[..., 20:])  # bit-identical pass-through
    ref = rotary_reference(x, positions, 1e6, 20)
    np.testing.assert_allclose(y[..., :20], ref[..., :20], rtol=1e-5, atol=1e-5)
    assert np.abs(y[..., :20] - x[..., :20]).max() > 0.1  # the first 20 dims did rotate


def hf_to_jaxlm(sd, cfg):
    """transformers StableLM state dict -> jaxlm params (layers stacked on axis 0)."""
    g = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    h, kv, d, e = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.embed_dim
    layers = range(cfg.num_layers)

    def stack(fn):
        return np.stack([fn(i) for i in layers])

    def pre(i):
        return f"model.layers.{i}."

    attn = {
        "q_proj": {"kernel": stack(lambda i: g[pre(i) + "self_attn.q_proj.weight"].T.reshape(e, h, d))},
        "k_proj": {"kernel": stack(lambda i: g[pre(i) + "self_attn.k_proj.weight"].T.reshape(e, kv, d))},
        "v_proj": {"kernel": stack(lambda i: g[pre(i) + "self_attn.v_proj.weight"].T.reshape(e, kv, d))},
        "o_proj": {"kernel": stack(lambda i: g[pre(i) + "self_attn.o_proj.weight"].T.reshape(h, d, e))},
    }
    if cfg.qkv_bias:
        for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            attn[name]["bias"] = stack(lambda i: g[pre(i) + f"self_attn.{name}.bias"].reshape(heads, d))
    if cfg.qk_norm:
        for ours, theirs, heads in (("q_norm", "q_layernorm", h), ("k_norm", "k_layernorm", kv)):
            attn[ours] = {"scale": stack(lambda i: np.stack(
                [g[pre(i) + f"self_attn.{theirs}.norms.{j}.weight"] for j in range(heads)]))}
    slot = {
        "attention": attn,
        "mixer_norm": {"scale": stack(lambda i: g[pre(i) + "input_layernorm.weight"]),
                       "bias": stack(lambda i: g[pre(i) + "input_layernorm.bias"])},
        "mlp": {name: {"kernel": stack(lambda i: g[pre(i) + f"mlp.{name}.weight"].T)}
                for name in ("gate_proj", "up_proj", "down_proj")},
    }
    if not cfg.parallel_residual:
        slot["ffn_norm"] = {"scale": stack(lambda i: g[pre(i) + "post_attention_layernorm.weight"]),
                            "bias": stack(lambda i: g[pre(i) + "post_attention_layernorm.bias"])}
    return {"embed": {"embedding": g["model.embed_tokens.weight"]},
            "blocks": {"slot_0": slot},
            "final_norm": {"scale": g["model.norm.weight"], "bias": g["model.norm.bias"]},
            "lm_head": {"kernel": g["lm_head.weight"].T}}


@pytest.mark.parametrize("variant", [
    dict(),  # stable-code-3b's choices: sequential residual, no qkv bias, no qk norm
    dict(parallel_residual=True, qkv_bias=True, qk_norm=True, num_kv_heads=2),
])
def test_logits_match_transformers_stablelm(variant):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = replace(presets.get("stablelm", "tiny"), vocab_size=101, embed_dim=64, num_layers=2,
                  num_heads=4, mlp_dim=96, max_seq_len=64, **variant)
    hf_cfg = transformers.StableLmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        layer_norm_eps=cfg.norm_eps, use_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm,
        use_parallel_residual=cfg.parallel_residual, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope.theta,
                         "partial_rotary_factor": cfg.rope.fraction},
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms and biases too, so every parameter matters
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") or
                    ".norms." in name or "layernorm.weight" in name else 0.1 * torch.randn_like(p))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    params = hf_to_jaxlm(model.state_dict(), cfg)
    init = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)
    got, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    got = np.asarray(got)
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
