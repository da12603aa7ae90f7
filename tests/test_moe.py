"""MoE layer against a float64 NumPy reference that runs every expert densely and zeroes the
weights outside the top-k (written here, independently of jaxlm/layers/moe.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers import moe
from jaxlm.layers.moe import MoE, MoEConfig, grouped_matmul
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder
from jaxlm.schema import ConfigError, from_config_dict

B, S, D, E, K, I, SHARED_I = 2, 8, 16, 6, 2, 8, 5
ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# ---- NumPy float64 reference -----------------------------------------------------------------

def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_silu(z):
    return z / (1 + np.exp(-z))


def np_route(logits, cfg, bias):
    """-> gate matrix G [T, E] (zero outside the top-k), chosen experts [T, k], probs [T, E]."""
    k = cfg.top_k
    if cfg.router == "softmax_topk":
        probs = np_softmax(logits)
        chosen = np.argsort(-probs, -1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, chosen, -1)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdims=True)
    elif cfg.router == "topk_softmax":
        probs = np_softmax(logits)
        chosen = np.argsort(-logits, -1, kind="stable")[:, :k]
        w = np_softmax(np.take_along_axis(logits, chosen, -1))
    else:
        scores = 1 / (1 + np.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
        chosen = np.argsort(-(scores + bias), -1, kind="stable")[:, :k]
        w = np.take_along_axis(scores, chosen, -1)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdims=True)
    gates = np.zeros_like(logits)
    np.put_along_axis(gates, chosen, w * cfg.routed_scaling, -1)
    return gates, chosen, probs


def np_capacity_keep(chosen_bsk, num_experts, capacity):
    """Queue every (token, choice) in position order per sequence; slots past C are dropped."""
    keep = np.ones(chosen_bsk.shape, bool)
    for b in range(chosen_bsk.shape[0]):
        used = np.zeros(num_experts, int)
        for s in range(chosen_bsk.shape[1]):
            for j in range(chosen_bsk.shape[2]):
                e = chosen_bsk[b, s, j]
                keep[b, s, j] = used[e] < capacity
                used[e] += 1
    return keep


def np_moe(p, x_btd, cfg, bias=None, capacity=None):
    """Dense reference: every expert on every token, gated by G. Returns (y, aux dict)."""
    b, t, d = x_btd.shape
    x = x_btd.reshape(-1, d).astype(np.float64)
    logits = x @ p["router"]["kernel"]
    gates, chosen, probs = np_route(logits, cfg, np.zeros(cfg.num_experts) if bias is None
                                    else bias)
    dropped = 0.0
    if capacity is not None:
        keep = np_capacity_keep(chosen.reshape(b, t, -1), cfg.num_experts, capacity)
        dropped = 1 - keep.mean()
        rows = np.repeat(np.arange(b * t), cfg.top_k)
        gates[rows[~keep.reshape(-1)], chosen.reshape(-1)[~keep.reshape(-1)]] = 0.0
    y = np.zeros_like(x)
    for e in range(cfg.num_experts):
        h = np_silu(x @ p["wi_gate"][e]) * (x @ p["wi_up"][e])
        y += gates[:, e:e + 1] * (h @ p["wo"][e])
    if cfg.num_shared_experts:
        sp = p["shared"]
        y += (np_silu(x @ sp["gate_proj"]["kernel"]) * (x @ sp["up_proj"]["kernel"])) \
            @ sp["down_proj"]["kernel"]
    counts = np.bincount(chosen.reshape(-1), minlength=cfg.num_experts)
    f = counts / counts.sum()
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    aux = {"moe_aux": cfg.aux_loss_coef * cfg.num_experts * np.sum(f * probs.mean(0)),
           "moe_z": cfg.z_loss_coef * np.mean(lse ** 2),
           "expert_load": f, "dropped_fraction": dropped, "counts": counts}
    return y.reshape(b, t, d), aux


# ---- fixtures --------------------------------------------------------------------------------

def random_params(module, x, seed, dtype=np.float32):
    """Module-shaped params with O(1) routing logits (no near-ties) and unit-scale experts."""
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        fan_in = leaf.shape[-2]
        scale = 2.0 if "router" in jax.tree_util.keystr(path) else 1.0
        return (rng.normal(size=leaf.shape) * scale / np.sqrt(fan_in)).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def moe_cfg(router, shared, dispatch, **kw):
    base = dict(num_experts=E, top_k=K, mlp_dim=I, router=router, dispatch=dispatch,
                num_shared_experts=1 if shared else 0, shared_mlp_dim=SHARED_I if shared else 0,
                routed_scaling=1.5 if router == "sigmoid_bias" else 1.0,
                capacity_factor=float(E), block_size=4, aux_loss_coef=0.01, z_loss_coef=0.001)
    base.update(kw)
    return MoEConfig(**base)


X = np.random.default_rng(1).normal(size=(B, S, D)).astype(np.float32)
BIAS = np.random.default_rng(2).normal(size=E).astype(np.float32) * 0.3


@pytest.fixture(scope="module")
def run_moe():
    """(cfg) -> (params, outputs of a jitted deterministic apply); compiled once per cfg."""
    cache = {}

    def run(cfg, capacity=None):
        if cfg not in cache:
            module = MoE(cfg)
            params = random_params(module, jnp.asarray(X), seed=ROUTERS.index(cfg.router))
            variables = {"params": params}
            if cfg.router == "sigmoid_bias":
                variables["router_state"] = {"selection_bias": jnp.asarray(BIAS)}
            out = jax.jit(lambda v, x: module.apply(v, x))(variables, jnp.asarray(X))
            cache[cfg] = (jax.tree.map(lambda a: np.asarray(a, np.float64), params), out)
        return cache[cfg]

    return run


# ---- forward parity --------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("router", ROUTERS)
def test_matches_dense_reference(run_moe, router, shared, dispatch):
    cfg = moe_cfg(router, shared, dispatch)
    params, (y, aux) = run_moe(cfg)
    ref, ref_aux = np_moe(params, X, cfg, BIAS if router == "sigmoid_bias" else None)
    assert rel_err(y, ref) < 1e-5
    assert float(aux["metrics"]["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux["metrics"]["expert_load"], ref_aux["expert_load"], atol=1e-7)


def test_fine_grained_with_shared_expert_matches_reference():
    cfg = MoEConfig(num_experts=16, top_k=4, mlp_dim=4, num_shared_experts=2, shared_mlp_dim=6,
                    block_size=0)
    module = MoE(cfg)
    params = random_params(module, jnp.asarray(X), seed=5)
    y, aux = jax.jit(module.apply)({"params": params}, jnp.asarray(X))
    assert params["shared"]["gate_proj"]["kernel"].shape == (D, 12)
    ref, ref_aux = np_moe(jax.tree.map(lambda a: np.asarray(a, np.float64), params), X, cfg)
    assert rel_err(y, ref) < 1e-5
    np.testing.assert_allclose(aux["metrics"]["expert_load"], ref_aux["expert_load"], atol=1e-7)


@pytest.mark.parametrize("router", ROUTERS)
def test_aux_and_z_losses_equal_their_formulas(run_moe, router):
    cfg = moe_cfg(router, False, "dropless")
    params, (_, aux) = run_moe(cfg)
    _, ref = np_moe(params, X, cfg, BIAS if router == "sigmoid_bias" else None)
    assert abs(float(aux["losses"]["moe_aux"]) - ref["moe_aux"]) < 1e-6 * abs(ref["moe_aux"])
    assert abs(float(aux["losses"]["moe_z"]) - ref["moe_z"]) < 1e-6 * abs(ref["moe_z"])


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_small_capacity_drops_the_numpy_overflow(capacity_factor):
    cfg = moe_cfg("softmax_topk", True, "capacity", capacity_factor=capacity_factor)
    module = MoE(cfg)
    params = random_params(module, jnp.asarray(X), seed=7)
    y, aux = jax.jit(module.apply)({"params": params}, jnp.asarray(X))
    capacity = int(max(np.ceil(S * K / E) * capacity_factor, capacity_factor))
    ref, ref_aux = np_moe(jax.tree.map(lambda a: np.asarray(a, np.float64), params), X, cfg,
                          capacity=capacity)
    assert ref_aux["dropped_fraction"] > 0  # the case really overflows
    assert abs(float(aux["metrics"]["dropped_fraction"]) - ref_aux["dropped_fraction"]) < 1e-7
    assert rel_err(y, ref) < 1e-5


# ---- grouped matmul --------------------------------------------------------------------------

@pytest.mark.parametrize("block,wide_rows", [(1, 512), (3, 512), (8, 512), (2, 6)])
def test_cpu_grouped_matmul_equals_ragged_dot(block, wide_rows, monkeypatch):
    monkeypatch.setattr(moe, "WIDE_ROWS", wide_rows)  # (2, 6): 6-row chunks, then 2-row blocks
    rng = np.random.default_rng(3)
    group_sizes = jnp.asarray([7, 0, 12, 1, 9], jnp.int32)  # an empty group; 3 rows past the end
    lhs = jnp.asarray(rng.normal(size=(32, 10)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(5, 10, 6)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)

    @jax.jit
    def value_and_grads(lhs, rhs):
        outs = []
        for impl in ("blocked", "ragged"):
            out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, group_sizes, block=block,
                                                           impl=impl), lhs, rhs)
            outs.append((out,) + vjp(cot))
        return outs

    blocked, ragged = value_and_grads(lhs, rhs)
    for a, b in zip(blocked, ragged):
        assert rel_err(a, b) < 1e-6
    assert np.all(np.asarray(blocked[0])[29:] == 0.0)


# ---- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_match_finite_differences(dispatch):
    with jax.enable_x64(True):
        cfg = MoEConfig(num_experts=3, top_k=2, mlp_dim=3, num_shared_experts=1, shared_mlp_dim=2,
                        dispatch=dispatch, capacity_factor=1.0, block_size=2,
                        aux_loss_coef=0.1, z_loss_coef=0.1)
        module = MoE(cfg, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 5, 4)))
        params = random_params(module, x, seed=6, dtype=np.float64)
        probe = jnp.asarray(np.random.default_rng(5).normal(size=(1, 5, 4)))

        def loss(p):
            y, aux = module.apply({"params": p}, x)
            return jnp.sum(y * probe) + sum(aux["losses"].values())

        grads = jax.jit(jax.grad(loss))(params)
        loss = jax.jit(loss)
        rng = np.random.default_rng(8)
        for name in ("router", "wi_gate", "wi_up", "wo", "shared"):
            direction = jax.tree.map(jnp.zeros_like, params)
            direction[name] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                                           params[name])
            eps = 1e-6
            plus = jax.tree.map(lambda p, v: p + eps * v, params, direction)
            minus = jax.tree.map(lambda p, v: p - eps * v, params, direction)
            fd = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, v)) for g, v in
                           zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            assert abs(analytic) > 1e-3, name  # the gradient reaches this parameter
            assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic)), name


# ---- training-time router behaviour ----------------------------------------------------------

def test_selection_bias_moves_toward_underloaded_experts():
    cfg = moe_cfg("sigmoid_bias", False, "dropless", bias_update_rate=0.01)
    module = MoE(cfg)
    params = random_params(module, jnp.asarray(X), seed=9)
    params["router"]["kernel"][:, 0] += 3.0  # skew routing toward expert 0
    bias = jnp.zeros(E, jnp.float32)
    apply = jax.jit(module.apply, static_argnames=("deterministic", "mutable"))
    (_, aux), state = apply({"params": params, "router_state": {"selection_bias": bias}},
                            jnp.asarray(X), deterministic=False, mutable=("router_state",))
    counts = np.asarray(aux["metrics"]["expert_load"]) * B * S * K
    new_bias = np.asarray(state["router_state"]["selection_bias"])
    np.testing.assert_allclose(new_bias, 0.01 * np.sign(counts.mean() - counts), atol=1e-8)
    busiest, idlest = np.argmax(counts), np.argmin(counts)
    assert new_bias[busiest] < 0 < new_bias[idlest]
    # not in evaluation, and not when the collection is immutable
    (_, _), state = apply({"params": params, "router_state": {"selection_bias": bias}},
                          jnp.asarray(X), deterministic=True, mutable=("router_state",))
    assert float(jnp.max(jnp.abs(state["router_state"]["selection_bias"]))) == 0.0


def test_jitter_only_in_training(run_moe):
    cfg = moe_cfg("softmax_topk", False, "dropless", jitter=0.1)
    params, (y_eval, _) = run_moe(cfg)
    ref, _ = np_moe(params, X, cfg)
    assert rel_err(y_eval, ref) < 1e-5
    train_apply = jax.jit(lambda p, x, key: MoE(cfg).apply(
        {"params": p}, x, deterministic=False, rngs={"router": key}))
    y_train, _ = train_apply(params, jnp.asarray(X), jax.random.key(3))
    assert rel_err(y_train, ref) > 1e-4


# ---- config and decoder wiring ---------------------------------------------------------------

def test_top_k_above_num_experts_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        from_config_dict(ModelConfig, {"ffn": "moe", "moe": {"num_experts": 4, "top_k": 5,
                                                             "mlp_dim": 8}})
    assert "model.moe.top_k=5" in str(err.value) and "\n" not in str(err.value)


def test_decoder_reports_per_layer_moe_aux_and_updates_bias():
    cfg = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                      ffn="moe", max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, mlp_dim=8, router="sigmoid_bias",
                                    num_shared_experts=1))
    model = Decoder(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 8)), jnp.int32)

    @jax.jit
    def init_and_train_forward(tokens):  # one compile for both
        variables = model.init({"params": jax.random.key(0)}, tokens)
        return model.apply(variables, tokens, deterministic=False, mutable=["router_state"])

    (logits, aux), state = init_and_train_forward(tokens)
    load = np.asarray(aux["metrics"]["expert_load"])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
    bias = np.asarray(state["router_state"]["blocks"]["slot_0"]["moe"]["selection_bias"])
    np.testing.assert_allclose(np.abs(bias), cfg.moe.bias_update_rate * (load != 0.25),
                               atol=1e-9)
    assert np.isfinite(np.asarray(logits)).all()


def test_experts_sharded_over_expert_axis_match_single_device(devices):
    """Experts split over a data=2 × expert=4 mesh by the logical-axis rules (no module names a
    mesh axis): loss and gradients of the dropless layer equal the single-device ones. (The
    capacity path is plain einsums, which GSPMD partitions the same way.)"""
    dispatch = "dropless"
    from jaxlm.parallel import sharding
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.parallel.rules import DEFAULT_RULES

    cfg = moe_cfg("softmax_topk", True, dispatch, num_experts=8)
    module = MoE(cfg)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, 4, D)), jnp.float32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
    params = random_params(module, x, seed=11)

    def loss(p, x):
        y, aux = module.apply({"params": p}, x)
        return jnp.sum(y ** 2) + sum(aux["losses"].values())

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, x)
    mesh = make_mesh(data=2, expert=4)
    with sharding.activation_sharding(mesh, DEFAULT_RULES):
        sharded = jax.device_put(params, sharding.mesh_shardings(boxed, mesh, DEFAULT_RULES))
        assert sharded["wi_gate"].sharding.spec[0] == "expert"
        ep_loss, ep_grads = jax.jit(jax.value_and_grad(loss))(
            sharded, jax.device_put(x, sharding.batch_sharding(mesh)))
    assert abs(float(ep_loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(ep_grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) < 1e-5
