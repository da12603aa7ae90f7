"""Layers against float64 NumPy references written here, independently of the modules."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers.attention import Attention
from jaxlm.layers.mlp import SwiGLU
from jaxlm.layers.norms import LayerNorm, RMSNorm
from jaxlm.layers.rotary import RopeConfig, apply_rotary, inverse_frequencies, rope_cos_sin
from jaxlm.models.decoder import transpose_for_decoding

RNG = np.random.default_rng(0)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def init_apply(module, *args):
    variables = module.init(jax.random.key(1), *args)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                          nn.unbox(variables["params"]))
    out = module.apply({"params": params}, *args)
    return out, jax.tree.map(lambda x: np.asarray(x, np.float64), params)


# ---- norms -----------------------------------------------------------------------------------

def test_rmsnorm_matches_float64():
    x = RNG.normal(size=(2, 5, 16)).astype(np.float32) * 3
    out, p = init_apply(RMSNorm(eps=1e-5), jnp.asarray(x))
    x64 = x.astype(np.float64)
    ref = p["scale"] * x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-5)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_float64(use_bias):
    x = (RNG.normal(size=(3, 4, 24)) * 2 + 5).astype(np.float32)
    out, p = init_apply(LayerNorm(eps=1e-5, use_bias=use_bias), jnp.asarray(x))
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"]
    if use_bias:
        ref = ref + p["bias"]
    assert rel_err(out, ref) < 1e-6


# ---- rotary ----------------------------------------------------------------------------------

def np_rope(x, positions, inv_freq, scaling=1.0):
    """HF rotate-half RoPE on the first 2·len(inv_freq) dims, float64."""
    rot = 2 * len(inv_freq)
    ang = positions[..., None].astype(np.float64) * inv_freq
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None] * scaling
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None] * scaling
    xr, xp = x[..., :rot].astype(np.float64), x[..., rot:].astype(np.float64)
    half = rot // 2
    rotated = xr * cos + np.concatenate([-xr[..., half:], xr[..., :half]], -1) * sin
    return np.concatenate([rotated, xp], -1)


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_rotary_matches_float64_and_leaves_tail_untouched(fraction):
    head_dim = 32
    cfg = RopeConfig(theta=10000.0, fraction=fraction)
    rot = int(head_dim * fraction)
    x = RNG.normal(size=(2, 7, 3, head_dim)).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(7) + 100])
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg, rot, jnp.float32)
    out = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
    inv = 1.0 / 10000.0 ** (np.arange(0, rot, 2) / rot)
    assert rel_err(out, np_rope(x, pos, inv)) < 2e-6
    np.testing.assert_array_equal(out[..., rot:], x[..., rot:])  # untouched, bit for bit


def test_rope_pairs_dim_j_with_j_plus_half():
    # A vector with only dim 0 set rotates into dim rot/2 (not dim 1 as in Meta's layout).
    cfg = RopeConfig()
    x = np.zeros((1, 2, 1, 8), np.float32)
    x[..., 0] = 1
    cos, sin = rope_cos_sin(jnp.asarray([[0, 1]]), cfg, 8, jnp.float32)
    out = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))[0, 1, 0]
    np.testing.assert_allclose(out[[0, 4]], [math.cos(1), math.sin(1)], rtol=1e-6)
    assert np.all(out[[1, 2, 3, 5, 6, 7]] == 0)


def base_inv(d, theta):
    return 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)


def test_linear_scaling_formula():
    cfg = RopeConfig(theta=500.0, scaling="linear", factor=4.0)
    inv, scale = inverse_frequencies(cfg, 16)
    assert scale == 1.0
    assert rel_err(inv, base_inv(16, 500.0) / 4.0) < 1e-6


def test_llama3_scaling_formula():
    cfg = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position=8192)
    d = 128
    inv = base_inv(d, 500000.0)
    lo, hi = 8192 / 1.0, 8192 / 4.0
    expected = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < hi:
            expected.append(f)
        elif wavelen > lo:
            expected.append(f / 8.0)
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - s) * f / 8.0 + s * f)
    got, scale = inverse_frequencies(cfg, d)
    assert scale == 1.0
    assert rel_err(got, expected) < 1e-6
    # all three regimes occur for this configuration
    wl = 2 * math.pi / inv
    assert (wl < hi).any() and (wl > lo).any() and ((wl >= hi) & (wl <= lo)).any()


@pytest.mark.parametrize("attention_factor", [None, 0.8])
def test_yarn_scaling_formula(attention_factor):
    d, theta, factor, orig = 64, 10000.0, 4.0, 512
    cfg = RopeConfig(theta=theta, scaling="yarn", factor=factor, original_max_position=orig,
                     beta_fast=32.0, beta_slow=1.0, attention_factor=attention_factor)

    def dim_of(r):
        return d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(32.0)), 0)
    high = min(math.ceil(dim_of(1.0)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    inv = base_inv(d, theta)
    expected = (inv / factor) * ramp + inv * (1 - ramp)
    got, scale = inverse_frequencies(cfg, d)
    assert rel_err(got, expected) < 1e-6
    want_scale = attention_factor if attention_factor else 0.1 * math.log(factor) + 1
    assert scale == pytest.approx(want_scale)
    cos, _ = rope_cos_sin(jnp.zeros((1, 1), jnp.int32), cfg, d, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), want_scale, rtol=1e-6)  # cos(0)·factor


@pytest.mark.parametrize("length", [64, 300])
def test_dynamic_ntk_scaling_formula(length):
    d, theta, factor, orig = 32, 10000.0, 2.0, 128
    cfg = RopeConfig(theta=theta, scaling="dynamic", factor=factor, original_max_position=orig)
    pos = np.arange(length)[None]
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg, d, jnp.float32)
    seq = max(length, orig)
    base = theta * (factor * seq / orig - (factor - 1)) ** (d / (d - 2))
    ang = pos[..., None] * base_inv(d, base)
    ang = np.concatenate([ang, ang], -1)
    np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=2e-4)
    np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=2e-4)


# ---- attention -------------------------------------------------------------------------------

def np_attention(x, p, n_heads, n_kv, head_dim, positions, rope_inv=None, segment_ids=None,
                 scale=None):
    """Reference attention in float64 with explicit jnp.repeat-style kv head expansion."""
    q = np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
    k = np.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"])
    v = np.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
    if "bias" in p["q_proj"]:
        q, k, v = q + p["q_proj"]["bias"], k + p["k_proj"]["bias"], v + p["v_proj"]["bias"]
    if rope_inv is not None:
        q, k = np_rope(q, positions, rope_inv), np_rope(k, positions, rope_inv)
    r = n_heads // n_kv
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    scale = head_dim ** -0.5 if scale is None else scale
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    t = x.shape[1]
    mask = np.tril(np.ones((t, t), bool))[None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & (same & (segment_ids[:, None, :] != 0))[:, None]
    s = np.where(mask, s, -1e300)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", w, v)
    return np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("n_heads,n_kv,bias,fraction", [(4, 4, False, 1.0), (4, 2, True, 1.0),
                                                        (4, 1, False, 0.25)])
def test_attention_matches_float64(n_heads, n_kv, bias, fraction):
    d, head_dim, t = 32, 16, 9
    rope = RopeConfig(theta=10000.0, fraction=fraction)
    module = Attention(n_heads, n_kv, head_dim, rope=rope, qkv_bias=bias)
    x = RNG.normal(size=(2, t, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (2, t))
    out, p = init_apply(module, jnp.asarray(x), jnp.asarray(pos))
    rot = int(head_dim * fraction)
    ref = np_attention(x.astype(np.float64), p, n_heads, n_kv, head_dim, pos,
                       rope_inv=base_inv(rot, 10000.0))
    assert rel_err(out, ref) < 1e-5


def test_attention_segments_and_nope_and_scale():
    d, head_dim, t = 32, 8, 10
    module = Attention(4, 2, head_dim, rope=None, scale=0.3)
    x = RNG.normal(size=(2, t, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (2, t))
    seg = np.array([[1] * 4 + [2] * 6, [0] * 3 + [1] * 7])  # packed docs; left padding
    out, p = init_apply(module, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
    ref = np_attention(x.astype(np.float64), p, 4, 2, head_dim, pos, segment_ids=seg, scale=0.3)
    valid = seg != 0
    assert rel_err(np.asarray(out)[valid], ref[valid]) < 1e-5


def test_swiglu_matches_float64():
    x = RNG.normal(size=(2, 5, 16)).astype(np.float32)
    out, p = init_apply(SwiGLU(48), jnp.asarray(x))
    x64 = x.astype(np.float64)
    g = x64 @ p["gate_proj"]["kernel"]
    u = x64 @ p["up_proj"]["kernel"]
    ref = (g / (1 + np.exp(-g)) * u) @ p["down_proj"]["kernel"]
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("module, args", [
    (Attention(4, 2, 8, rope=RopeConfig(), qkv_bias=True, out_bias=True), ("x", "pos")),
    (SwiGLU(48, use_bias=True), ("x",)),
])
def test_decoding_layout_kernels_match_float64_reference(module, args):
    """The [out, in] `kernel_t` that `transpose_for_decoding` stores computes what the trained
    [in, out] `kernel` computes (against the float64 references above)."""
    x = RNG.normal(size=(2, 6, 32)).astype(np.float32)
    inputs = {"x": jnp.asarray(x), "pos": jnp.broadcast_to(jnp.arange(6), (2, 6))}
    out, p = init_apply(module, *(inputs[a] for a in args))
    decoding = transpose_for_decoding({"params": p})
    assert "kernel" not in str(jax.tree_util.tree_structure(decoding)).replace("kernel_t", "")
    out_t = module.apply(decoding, *(inputs[a] for a in args))
    x64 = x.astype(np.float64)
    if isinstance(module, Attention):
        ref = np_attention(x64, p, 4, 2, 8, np.asarray(inputs["pos"]),
                           rope_inv=base_inv(8, 10000.0)) + p["o_proj"]["bias"]
    else:
        g = x64 @ p["gate_proj"]["kernel"] + p["gate_proj"]["bias"]
        u = x64 @ p["up_proj"]["kernel"] + p["up_proj"]["bias"]
        ref = (g / (1 + np.exp(-g)) * u) @ p["down_proj"]["kernel"] + p["down_proj"]["bias"]
    assert rel_err(out_t, ref) < 1e-5
    assert rel_err(out_t, out) < 1e-6
