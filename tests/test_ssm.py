"""Mamba-2: the three scans against a float64 NumPy loop, the mixer against a float64 NumPy
version of SPEC §C written here in Hugging Face's fused layout, decoding against full passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers.ssm import Mamba2, SSMConfig, init_ssm_cache, ssd
from jaxlm.schema import ConfigError, from_config_dict

METHODS = ("sequential", "associative", "chunked")
run_ssd = jax.jit(ssd, static_argnames=("method", "chunk_size"))  # eager dispatch is slow


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def np_recurrence(x, dt, A, B, C, D, state):
    """S_t = exp(dt·A)·S_{t−1} + (dt·x_t) ⊗ B_t;  y_t = S_t·C_t + D·x_t, one step at a time."""
    b, l, h, p = x.shape
    per_group = h // B.shape[2]
    S = np.array(state, np.float64)
    y = np.zeros((b, l, h, p))
    for t in range(l):
        for hh in range(h):
            g = hh // per_group
            S[:, hh] = (np.exp(dt[:, t, hh] * A[hh])[:, None, None] * S[:, hh]
                        + (dt[:, t, hh, None] * x[:, t, hh])[:, :, None] * B[:, t, g, None, :])
            y[:, t, hh] = np.einsum("bpn,bn->bp", S[:, hh], C[:, t, g]) + D[hh] * x[:, t, hh]
    return y, S


def random_inputs(seed, b=2, l=37, h=4, p=3, g=2, n=5, strong_decay=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, l, h, p))
    dt = np.log1p(np.exp(rng.normal(size=(b, l, h)) - 1.0))  # softplus: positive
    A = -np.exp(rng.uniform(-1, 1.5, size=h)) * (40.0 if strong_decay else 1.0)
    B = rng.normal(size=(b, l, g, n))
    C = rng.normal(size=(b, l, g, n))
    D = rng.normal(size=h)
    state = rng.normal(size=(b, h, p, n))
    return x, dt, A, B, C, D, state


@pytest.fixture(scope="module")
def case():
    inputs = random_inputs(0)
    return inputs, np_recurrence(*inputs)


@pytest.mark.parametrize("method,chunk", [("sequential", 8), ("associative", 8), ("chunked", 8),
                                          ("chunked", 37), ("chunked", 64)])
def test_scans_match_float64_loop(case, method, chunk):
    """G=2, L=37 (not a multiple of 8; shorter than 64), non-zero initial state, D skip."""
    (x, dt, A, B, C, D, state), (y_ref, s_ref) = case
    args = [jnp.asarray(v, jnp.float32) for v in (x, dt, A, B, C, D)]
    y, s = run_ssd(*args, method=method, chunk_size=chunk,
                   initial_state_bhpn=jnp.asarray(state, jnp.float32))
    assert y.dtype == jnp.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_zero_initial_state_and_no_skip():
    x, dt, A, B, C, D, _ = random_inputs(1, l=16, g=1)
    y_ref, s_ref = np_recurrence(x, dt, A, B, C, np.zeros_like(D), np.zeros((2, 4, 3, 5)))
    for method in METHODS:
        y, s = run_ssd(*(jnp.asarray(v, jnp.float32) for v in (x, dt, A, B, C)), method=method,
                       chunk_size=4)
        assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, method


def test_scans_agree_to_1e12_in_float64():
    """SPEC §D: written correctly, the algorithms agree to ~1e-15 in float64 (G=2, L=37, Q=8);
    so do their gradients, even under strong decay."""
    inputs = random_inputs(2)
    y_ref, s_ref = np_recurrence(*inputs)
    with jax.enable_x64(True):
        args = [jnp.asarray(v, jnp.float64) for v in inputs]
        for method in METHODS:
            y, s = run_ssd(*args[:6], method=method, chunk_size=8, initial_state_bhpn=args[6])
            assert y.dtype == jnp.float64 and s.dtype == jnp.float64
            assert rel_err(y, y_ref) < 1e-12, method
            assert rel_err(s, s_ref) < 1e-12, method
        grads = [_loss_grads(m, random_inputs(3, strong_decay=True), dtype=jnp.float64)
                 for m in ("sequential", "chunked")]
    for name, g_seq, g_chunk in zip(("x", "dt", "A", "B", "C", "state"), *grads):
        assert g_chunk.dtype == jnp.float64
        assert rel_err(g_chunk, g_seq) < 1e-12, name


def _weighted_loss(x, dt, A, B, C, D, state, wy, ws, method):
    y, s = ssd(x, dt, A, B, C, D, method=method, chunk_size=8, initial_state_bhpn=state)
    return jnp.sum(y * wy) + jnp.sum(s * ws)


# One compile per (method, dtype), shared by every test: grads w.r.t. x, dt, A, B, C, state.
_grad_fn = jax.jit(jax.grad(_weighted_loss, argnums=(0, 1, 2, 3, 4, 6)),
                   static_argnames="method")


def _loss_grads(method, inputs, dtype=jnp.float32):
    x, dt, A, B, C, D, state = [jnp.asarray(v, dtype) for v in inputs]
    rng = np.random.default_rng(7)
    wy = jnp.asarray(rng.normal(size=x.shape), dtype)
    ws = jnp.asarray(rng.normal(size=state.shape), dtype)
    return _grad_fn(x, dt, A, B, C, D, state, wy, ws, method=method)


@pytest.mark.parametrize("strong_decay", [False, True])
def test_gradients_of_associative_and_chunked_agree(strong_decay):
    """w.r.t. x, dt, A, B, C and the initial state. With strong decay (|dt·A| up to ~100 per
    step) an unmasked exp(Λ_l − Λ_s) above the diagonal would overflow and 0·inf would be NaN."""
    inputs = random_inputs(3, strong_decay=strong_decay)
    g_assoc = _loss_grads("associative", inputs)
    g_chunk = _loss_grads("chunked", inputs)
    g_seq = _loss_grads("sequential", inputs)
    for name, ga, gc, gs in zip(("x", "dt", "A", "B", "C", "state"), g_assoc, g_chunk, g_seq):
        assert np.all(np.isfinite(np.asarray(gc))), name
        assert rel_err(gc, ga) < 1e-5, name
        assert rel_err(gc, gs) < 1e-5, name


def test_padding_after_discretisation_keeps_final_state():
    """Chunked pads L=37 to 40; padded steps must neither decay nor update the final state."""
    inputs = random_inputs(4, l=37)
    args = [jnp.asarray(v, jnp.float32) for v in inputs]
    _, s_pad = run_ssd(*args[:6], method="chunked", chunk_size=8, initial_state_bhpn=args[6])
    _, s_exact = run_ssd(*[a[:, :32] for a in args[:2]], args[2], *[a[:, :32] for a in args[3:5]],
                     args[5], method="chunked", chunk_size=8, initial_state_bhpn=args[6])
    _, s_ref = np_recurrence(*inputs)
    assert rel_err(s_pad, s_ref) < 1e-5
    assert rel_err(s_exact, s_ref) > 1e-2  # the last 5 steps matter, so the check has teeth


# ---- the mixer ---------------------------------------------------------------------------------

CFG = SSMConfig(num_heads=4, head_dim=4, state_dim=6, num_groups=2, conv_width=4, chunk_size=4,
                proj_bias=True, dt_limit_min=0.01, dt_limit_max=2.0)
EMBED = 12


def fuse_to_hf(p):
    """Our parameters -> Hugging Face's fused tensors (float64 NumPy), per the Mamba2 docstring."""
    d = EMBED
    cols = lambda k: k.reshape(d, -1)  # noqa: E731  [D, ...] -> [D, features]
    in_w = np.concatenate([cols(p[f"in_proj_{n}"]["kernel"]) for n in "zxBC"]
                          + [p["in_proj_dt"]["kernel"]], axis=1).T
    in_b = np.concatenate([p[f"in_proj_{n}"]["bias"].reshape(-1) for n in ("z", "x", "B", "C",
                                                                             "dt")])
    k = CFG.conv_width
    conv_w = np.concatenate([p[f"conv_{n}"]["kernel"].reshape(k, -1) for n in "xBC"], 1).T
    conv_b = np.concatenate([p[f"conv_{n}"]["bias"].reshape(-1) for n in "xBC"])
    return dict(in_w=in_w, in_b=in_b, conv_w=conv_w[:, None, :], conv_b=conv_b,
                dt_bias=p["dt_bias"], A_log=p["A_log"], D=p["D"],
                norm_w=p["norm"]["scale"].reshape(-1),
                out_w=p["out_proj"]["kernel"].reshape(-1, d).T, out_b=p["out_proj"]["bias"])


def np_mamba2(hf, a, eps=1e-5):
    """SPEC §C steps 1–7 in float64 on fused HF-layout weights, with the recurrence as a loop."""
    h, P, g, n, k = CFG.num_heads, CFG.head_dim, CFG.num_groups, CFG.state_dim, CFG.conv_width
    d_in = h * P
    b, t, _ = a.shape
    proj = a @ hf["in_w"].T + hf["in_b"]
    z, xbc, dt_raw = proj[..., :d_in], proj[..., d_in:2 * d_in + 2 * g * n], proj[..., -h:]
    padded = np.concatenate([np.zeros((b, k - 1, xbc.shape[-1])), xbc], axis=1)
    conv = np.stack([sum(padded[:, i + j] * hf["conv_w"][:, 0, j] for j in range(k))
                     for i in range(t)], axis=1) + hf["conv_b"]
    xbc = conv / (1 + np.exp(-conv))
    x = xbc[..., :d_in].reshape(b, t, h, P)
    B = xbc[..., d_in:d_in + g * n].reshape(b, t, g, n)
    C = xbc[..., d_in + g * n:].reshape(b, t, g, n)
    dt = np.clip(np.log1p(np.exp(dt_raw + hf["dt_bias"])), CFG.dt_limit_min, CFG.dt_limit_max)
    A = -np.exp(hf["A_log"])
    y, state = np_recurrence(x, dt, A, B, C, hf["D"], np.zeros((b, h, P, n)))
    gated = y.reshape(b, t, d_in) * (z / (1 + np.exp(-z)))
    grouped = gated.reshape(b, t, g, -1)
    normed = grouped / np.sqrt(np.mean(grouped ** 2, -1, keepdims=True) + eps)
    out = (hf["norm_w"] * normed.reshape(b, t, d_in)) @ hf["out_w"].T + hf["out_b"]
    return out, state


@pytest.fixture(scope="module")
def mixer():
    """Random (not init-valued) parameters and jitted apply functions, shared by the tests."""
    module = Mamba2(CFG, norm_eps=1e-5, init_std=0.3, out_init_std=0.3)
    x = jnp.zeros((2, 11, EMBED))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x)["params"])
    initial = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda v: jnp.asarray(v + 0.3 * rng.normal(size=v.shape), jnp.float32),
                          params)

    def make(scan):
        m = Mamba2(CFG.__class__(**{**CFG.__dict__, "scan": scan}), norm_eps=1e-5)
        full = jax.jit(lambda x, seg=None: m.apply({"params": params}, x, seg))
        cached = jax.jit(lambda x, cache, seg=None: m.apply({"params": params}, x, seg, cache))
        return full, cached

    np_params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    return {"params": np_params, "initial": initial, "make": make, "chunked": make("chunked")}


def test_init_follows_mamba2(mixer):
    """softplus(dt_bias) log-uniform in [dt_min, dt_max]; A = −exp(A_log) in [−16, −1]; D = 1;
    norm scale 1; conv weights within PyTorch's ±1/√K."""
    p = mixer["initial"]
    dt = np.log1p(np.exp(p["dt_bias"]))
    assert np.all(dt >= CFG.dt_min * (1 - 1e-5)) and np.all(dt <= CFG.dt_max * (1 + 1e-5))
    assert np.all(p["A_log"] >= 0) and np.all(p["A_log"] <= np.log(16) + 1e-6)
    assert np.all(p["D"] == 1) and np.all(p["norm"]["scale"] == 1)
    for name in ("conv_x", "conv_B", "conv_C"):
        assert np.max(np.abs(p[name]["kernel"])) <= 0.5 + 1e-7  # 1/√4


@pytest.mark.parametrize("scan", METHODS)
def test_mamba2_matches_numpy_float64(mixer, scan):
    a = np.random.default_rng(5).normal(size=(2, 11, EMBED))
    full, _ = mixer["chunked"] if scan == "chunked" else mixer["make"](scan)
    out = full(jnp.asarray(a, jnp.float32))
    ref, _ = np_mamba2(fuse_to_hf(mixer["params"]), a)
    assert out.shape == (2, 11, EMBED)
    assert rel_err(out, ref) < 1e-5


def test_token_by_token_decoding_reproduces_full_sequence(mixer):
    a = jnp.asarray(np.random.default_rng(6).normal(size=(2, 9, EMBED)), jnp.float32)
    full, cached = mixer["chunked"]
    y_full = full(a)
    _, state_ref = np_mamba2(fuse_to_hf(mixer["params"]), np.asarray(a, np.float64))
    cache = init_ssm_cache(CFG, 2)
    ys = []
    for i in range(9):
        y, cache = cached(a[:, i:i + 1], cache)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, 1), y_full) < 1e-5
    assert rel_err(cache["ssm"], state_ref) < 1e-5
    _, cache_full = cached(a, init_ssm_cache(CFG, 2))  # prefill of the whole sequence
    for name in cache:
        assert rel_err(cache_full[name], cache[name]) < 1e-5, name


@pytest.mark.parametrize("prefill", [2, 6])  # shorter and longer than the conv width K=4
def test_prefill_then_steps_equals_full_sequence(mixer, prefill):
    a = jnp.asarray(np.random.default_rng(7).normal(size=(2, 9, EMBED)), jnp.float32)
    full, cached = mixer["chunked"]
    y_full = full(a)
    y0, cache = cached(a[:, :prefill], init_ssm_cache(CFG, 2))
    ys = [y0]
    for i in range(prefill, 8):
        y, cache = cached(a[:, i:i + 1], cache)
        ys.append(y)
    y_last, cache = cached(a[:, 8:], cache)
    ys.append(y_last)
    assert rel_err(jnp.concatenate(ys, 1), y_full) < 1e-5
    # Two prefills back to back (T > 1 from a non-zero cache) also hand over exactly.
    y1, c1 = cached(a[:, :prefill], init_ssm_cache(CFG, 2))
    y2, c2 = cached(a[:, prefill:], c1)
    _, c_full = cached(a, init_ssm_cache(CFG, 2))
    assert rel_err(jnp.concatenate([y1, y2], 1), y_full) < 1e-5
    assert rel_err(c2["ssm"], c_full["ssm"]) < 1e-5


def test_left_padding_leaves_outputs_and_state_unchanged(mixer):
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.normal(size=(2, 7, EMBED)), jnp.float32)
    junk = jnp.asarray(rng.normal(size=(2, 4, EMBED)) * 5, jnp.float32)  # not zeros
    padded = jnp.concatenate([junk, a], axis=1)
    seg = jnp.concatenate([jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 7), jnp.int32)], axis=1)
    _, cached = mixer["chunked"]
    y_pad, c_pad = cached(padded, init_ssm_cache(CFG, 2), seg)
    y, c = cached(a, init_ssm_cache(CFG, 2))
    assert rel_err(y_pad[:, 4:], y) < 1e-5
    for name in c:
        assert rel_err(c_pad[name], c[name]) < 1e-5, name
    # With the junk marked as real tokens the result does change: the check has teeth.
    y_junk, c_junk = cached(padded, init_ssm_cache(CFG, 2), jnp.ones_like(seg))
    assert rel_err(y_junk[:, 4:], y) > 1e-2 and rel_err(c_junk["ssm"], c["ssm"]) > 1e-2


@pytest.mark.parametrize("values,field", [({"num_heads": 6, "num_groups": 4}, "num_groups=4"),
                                          ({"chunk_size": 0}, "chunk_size=0"),
                                          ({"chunk_size": -8}, "chunk_size=-8"),
                                          ({"scan": "parallel"}, "scan='parallel'")])
def test_bad_config_is_a_one_line_error(values, field):
    with pytest.raises(ConfigError) as err:
        from_config_dict(SSMConfig, values)
    message = str(err.value)
    assert field in message and "expected" in message and "\n" not in message


def test_heads_shard_over_tensor_axis_with_same_result(mixer, devices):
    """data=2 × tensor=4 mesh through the rules table: Mamba heads (and so the conv, D, A, dt
    and norm per head) split four ways; the output equals the single-device one."""
    from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib, sharding

    module = Mamba2(CFG, norm_eps=1e-5)
    a = jnp.asarray(np.random.default_rng(9).normal(size=(2, 11, EMBED)), jnp.float32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), a)["params"]
    mesh = mesh_lib.make_mesh(data=2, tensor=4, devices=devices)
    rules = rules_lib.make_rules()
    shardings = sharding.mesh_shardings(boxed, mesh, rules)
    assert tuple(shardings["in_proj_x"]["kernel"].spec) == (None, "tensor", None)
    assert tuple(shardings["conv_x"]["kernel"].spec) == (None, "tensor", None)
    params = jax.tree.map(lambda v, s: jax.device_put(jnp.asarray(v, jnp.float32), s),
                          mixer["params"], shardings)
    with sharding.activation_sharding(mesh, rules):
        out = jax.jit(lambda p, x: module.apply({"params": p}, x))(
            params, jax.device_put(a, sharding.batch_sharding(mesh)))
    assert len(out.sharding.device_set) == 8
    assert rel_err(out, mixer["chunked"][0](a)) < 1e-5
