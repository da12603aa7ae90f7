"""Expert parallelism (jaxlm/parallel/expert.py): experts split over the `expert` mesh axis,
tokens over data × expert, dispatched by all-to-all inside a shard_map.

References: the same MoE layer on one device (its own dropless path, itself tested against a
float64 dense reference in test_moe.py), and the compiled HLO's collectives.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers.moe import MoE, MoEConfig
from jaxlm.parallel import sharding
from jaxlm.parallel.hlo import collective_ops
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.rules import DEFAULT_RULES

D, I, SHARED_I = 16, 8, 12
FAST = {"xla_backend_optimization_level": 0}  # tiny shapes: compile time dominates
X = np.random.default_rng(0).normal(size=(8, 6, D)).astype(np.float32)


def random_params(module, x, seed):
    """O(1) routing logits (no near-ties between experts) and unit-scale experts."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = 2.0 if "router" in jax.tree_util.keystr(path) else 1.0
        return (rng.normal(size=leaf.shape) * scale / np.sqrt(leaf.shape[-2])).astype(np.float32)

    return shapes, jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def make_loss(module):
    def loss(params, x):
        y, aux = module.apply({"params": params}, x)
        return jnp.sum(y ** 2) + sum(aux["losses"].values())
    return jax.value_and_grad(loss, argnums=(0, 1))  # d x too: in a model x depends on params


def run_sharded(module, boxed, params, x, **mesh_axes):
    """(loss, grads, compiled HLO text) under a mesh with the default rules."""
    mesh = make_mesh(**mesh_axes)
    fn = make_loss(module)
    with sharding.activation_sharding(mesh, DEFAULT_RULES):
        shardings = sharding.mesh_shardings(boxed["params"], mesh, DEFAULT_RULES)
        p = jax.device_put(params, shardings)
        xs = jax.device_put(x, sharding.batch_sharding(mesh))
        compiled = jax.jit(fn, compiler_options=FAST).lower(p, xs).compile()
        loss, grads = compiled(p, xs)
    return float(loss), grads, compiled.as_text(), p


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CASES = {
    # Mixtral-like: 8 experts top-2 over expert=4 (2 per device), batch over data=2 × expert=4.
    "8x2": (MoEConfig(num_experts=8, top_k=2, mlp_dim=I, block_size=4), dict(data=2, expert=4)),
    # Fine-grained + shared expert, Granite's router, and the expert MLP split over tensor=2.
    "16x4_shared_tp": (MoEConfig(num_experts=16, top_k=4, mlp_dim=I, num_shared_experts=1,
                                 shared_mlp_dim=SHARED_I, router="topk_softmax", block_size=2),
                       dict(data=1, expert=4, tensor=2)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, devices):
    cfg, mesh_axes = CASES[request.param]
    module = MoE(cfg)
    x = jnp.asarray(X)
    boxed, params = random_params(module, x, seed=3)
    ref_loss, ref_grads = jax.jit(make_loss(module), compiler_options=FAST)(params, x)
    loss, grads, hlo, sharded = run_sharded(module, boxed, params, x, **mesh_axes)
    return dict(name=request.param, cfg=cfg, mesh=mesh_axes, ref=(float(ref_loss), ref_grads),
                ep=(loss, grads), hlo=hlo, sharded=sharded)


def test_expert_parallel_equals_single_device(case):
    ref_loss, ref_grads = case["ref"]
    loss, grads = case["ep"]
    assert case["sharded"]["wi_gate"].sharding.spec[0] == "expert"
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    for (path, g_ref), g in zip(flat_ref, jax.tree.leaves(grads)):
        assert rel_err(g, g_ref) <= 1e-5, jax.tree_util.keystr(path)


def test_hlo_moves_tokens_by_all_to_all_and_never_gathers_expert_weights(case):
    cfg = case["cfg"]
    ops = collective_ops(case["hlo"])
    kinds = [kind for kind, _ in ops]
    # forward: tokens and their expert ids out, outputs back; backward: output gradients out,
    # token gradients back
    assert kinds.count("all-to-all") == 5
    # The only all-gather is the router's [tokens, experts] probabilities for the balancing
    # loss's mean over the batch (GSPMD, outside the shard_map); nothing of rank 3 (expert
    # weights [E(_local), D, I]) is ever gathered.
    gathers = [line for kind, line in ops if kind == "all-gather"]
    shapes = [re.search(r"=\s*\(?\w+\[([\d,]*)\]", line).group(1) for line in gathers]
    assert shapes == [f"{X.shape[0] * X.shape[1]},{cfg.num_experts}"], gathers


def test_mixtral_decoder_with_expert_parallelism_equals_single_device(devices):
    """The whole tiny Mixtral-family decoder (scanned layers, each MoE dispatching by
    all-to-all) on data=2 × expert=4: the LM loss and every gradient equal one device's."""
    import dataclasses

    from jaxlm.models import presets
    from jaxlm.models.decoder import Decoder

    cfg = dataclasses.replace(presets.get("mixtral", "tiny"), embed_dim=32, num_layers=2,
                              vocab_size=64, moe=dataclasses.replace(
                                  presets.get("mixtral", "tiny").moe, mlp_dim=16, block_size=4))
    model = Decoder(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(8, 12)), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), tokens)))()["params"]

    def loss(p, tokens):
        logits, aux = model.apply({"params": p}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return ce + sum(aux["losses"].values())

    fn = jax.value_and_grad(loss)
    ref_loss, ref_grads = jax.jit(fn, compiler_options=FAST)(params, tokens)
    mesh = make_mesh(data=2, expert=4)
    with sharding.activation_sharding(mesh, DEFAULT_RULES):
        p = jax.device_put(params, sharding.mesh_shardings(boxed["params"], mesh, DEFAULT_RULES))
        compiled = jax.jit(fn, compiler_options=FAST).lower(
            p, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        compiled = compiled.compile()
        ep_loss, ep_grads = compiled(p, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    assert sum(k == "all-to-all" for k, _ in collective_ops(compiled.as_text())) >= 5
    assert abs(float(ep_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (path, g_ref), g in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0],
                                jax.tree.leaves(ep_grads)):
        assert rel_err(g, g_ref) <= 1e-5, jax.tree_util.keystr(path)
