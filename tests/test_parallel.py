"""Parallelism on 8 host devices: every mesh and ZeRO stage trains like one device; shardings
follow the rules table; tensor parallelism inserts one all-reduce per attention and MLP block;
checkpoints move between mesh shapes; remat and mixed precision; one-line bad-input errors."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxlm_testing import tiny_model_config

from jaxlm.models.decoder import Decoder
from jaxlm.parallel import distributed, hlo, sharding, validate, zero
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.rules import make_rules
from jaxlm.parallel.validate import ShardingError
from jaxlm.schema import replace
from jaxlm.train import optimizer, state as state_lib, step as step_lib
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.config import TrainConfig

SEQ, BATCH, STEPS = 16, 8, 3
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# 8 query and 8 kv heads so that tensor=8 divides them; every other dim divides 8 too.
CFG = tiny_model_config(num_heads=8, num_kv_heads=8, embed_dim=32, mlp_dim=64)
TCFG = TrainConfig(steps=10, warmup_steps=1, learning_rate=1e-3)
# LLVM optimisation off: compiles 2-3x faster; SPMD partitioning (what is tested) is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def batches(cfg=CFG, n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                    "loss_mask": (rng.random((BATCH, SEQ)) > 0.1).astype(np.float32)})
    return out


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


@pytest.fixture(scope="module")
def setup():
    model = Decoder(CFG)
    tx, schedule = optimizer.make_optimizer(TCFG), optimizer.learning_rate_schedule(TCFG)
    init = jax.jit(lambda r: nn.unbox(state_lib.boxed_state(model, tx, r, SEQ)),
                   compiler_options=FAST_COMPILE)(jax.random.key(0))
    return model, tx, schedule, to_numpy(init), batches()


def train_on(setup, mesh, stage, steps=STEPS):
    """Runs `steps` train steps on `mesh` with ZeRO `stage`; (losses, final state, HLO)."""
    model, tx, schedule, init, data = setup
    rules = make_rules()
    shardings = state_lib.state_shardings(model, tx, mesh, rules, SEQ, zero.transform(stage))
    state = jax.device_put(init, shardings)
    with sharding.activation_sharding(mesh, rules):
        step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, schedule),
                                       shardings, sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh))
        global_batches = [distributed.global_batch(b, sharding.batch_sharding(mesh))
                          for b in data[:steps]]
        step = step.lower(state, global_batches[0]).compile(compiler_options=FAST_COMPILE)
        losses = []
        for batch in global_batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, state, step.as_text()


@pytest.fixture(scope="module")
def reference(setup):
    losses, state, _ = train_on(setup, make_mesh(data=1), 0)
    return losses, to_numpy(state)


@pytest.fixture(scope="module")
def trained(setup):
    """(mesh shape, zero) -> (losses, state) for the whole matrix, compiled once each."""
    return {(d, t, z): train_on(setup, make_mesh(data=d, tensor=t), z)
            for d, t in MESHES for z in zero.STAGES}


@pytest.mark.parametrize("stage", zero.STAGES)
@pytest.mark.parametrize("data,tensor", MESHES)
def test_every_mesh_and_zero_stage_trains_like_one_device(reference, trained, data, tensor,
                                                          stage):
    ref_losses, ref_state = reference
    losses, state, _ = trained[(data, tensor, stage)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] != losses[0]  # the parameters did move
    flat = jax.tree_util.tree_flatten_with_path(to_numpy(state))[0]
    assert len(flat) == len(jax.tree.leaves(ref_state))
    for (path, got), want in zip(flat, jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                   err_msg=validate.path_str(path))


def test_expert_axis_carries_batch_rows_too(setup, reference):
    """A dense model on data=2 × expert=2 × tensor=2: rows split 4 ways over (data, expert),
    ZeRO-1 moments over data only; same training as one device."""
    mesh = make_mesh(data=2, tensor=2, expert=2)
    losses, state, _ = train_on(setup, mesh, 1)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(reference[1])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    mu = state.opt_state[1][0].mu["blocks"]["slot_0"]["mlp"]["gate_proj"]["kernel"]
    assert mu.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", "tensor")), 3)
    assert sharding.batch_sharding(mesh).shard_shape((BATCH, SEQ)) == (BATCH // 4, SEQ)


# Logical axes of every parameter of the tiny model, written out from the layer code (an
# independent statement of what the rules table must produce).
LOGICAL = {
    "blocks/slot_0/attention/q_proj/kernel": ("layers", "embed", "heads", "head_dim"),
    "blocks/slot_0/attention/k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/slot_0/attention/v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/slot_0/attention/o_proj/kernel": ("layers", "heads", "head_dim", "embed"),
    "blocks/slot_0/mixer_norm/scale": ("layers", "embed"),
    "blocks/slot_0/ffn_norm/scale": ("layers", "embed"),
    "blocks/slot_0/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
    "blocks/slot_0/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
    "blocks/slot_0/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    "embed/embedding": ("vocab", "embed"),
    "final_norm/scale": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
}
# Megatron layout on the (2 data × 4 tensor) mesh, and where ZeRO adds `data` (the largest
# free dim divisible by 2 that is not the layer-stack axis: here always `embed`).
TENSOR_AXES = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def expected_spec(logical, with_data):
    spec = [TENSOR_AXES.get(name) for name in logical]
    if with_data:
        spec[logical.index("embed")] = "data"
    return P(*spec)


@pytest.mark.parametrize("stage", zero.STAGES)
def test_partition_specs_of_params_and_optimizer_state_follow_the_rules(trained, stage):
    _, state, _ = trained[(2, 4, stage)]
    mesh = make_mesh(data=2, tensor=4)
    params = {validate.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        state.params)[0]}
    assert sorted(params) == sorted(LOGICAL)
    adam = state.opt_state[1][0]
    moments = {f"{name}/{validate.path_str(p)}": x for name in ("mu", "nu")
               for p, x in jax.tree_util.tree_flatten_with_path(getattr(adam, name))[0]}
    assert len(moments) == 2 * len(LOGICAL)
    for path, array in params.items():
        want = NamedSharding(mesh, expected_spec(LOGICAL[path], stage == 3))
        assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding.spec)
    for path, array in moments.items():
        want = NamedSharding(mesh, expected_spec(LOGICAL[path.split("/", 1)[1]], stage >= 1))
        assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding.spec)
    for count in (adam.count, state.opt_state[1][2].count, state.step):
        assert count.sharding.is_fully_replicated
    # Per-device optimizer bytes: 1/2 of the tensor-sharded figure under ZeRO-1/3.
    per_device = sum(x.addressable_shards[0].data.nbytes for x in moments.values())
    replicated_over_data = sum(x.nbytes // mesh.shape["tensor"] if any(
        s == "tensor" for s in x.sharding.spec) else x.nbytes for x in moments.values())
    assert per_device * (2 if stage else 1) == replicated_over_data


def test_zero_stages_show_in_the_compiled_step(trained):
    """ZeRO-0: gradients all-reduced, nothing gathered. ZeRO-1: the sharded update is followed
    by all-gathers of the new parameters, outside the layer loop. ZeRO-3: weights are gathered
    layer by layer inside the loop (forward and backward), never all at once before it."""
    counts = {z: (hlo.collective_counts(trained[(8, 1, z)][2]),
                  hlo.collective_counts(trained[(8, 1, z)][2], loop_body=True))
              for z in zero.STAGES}
    assert counts[0][0]["all-gather"] == 0 and counts[0][0]["all-reduce"] >= 1
    assert counts[1][1]["all-gather"] == 0 and counts[1][0]["all-gather"] >= len(LOGICAL)
    block_weights = sum(path.startswith("blocks/") for path in LOGICAL)  # 9
    assert counts[3][1]["all-gather"] == 2 * block_weights  # forward + backward, per layer
    assert counts[3][0]["all-gather"] - counts[3][1]["all-gather"] < block_weights


def test_zero_picks_the_largest_free_divisible_dim_and_replicates_when_none():
    add = zero.add_data_axis
    assert add((4, 512, 8, 64), P(None, None, "tensor", None),
               P("layers", "embed", "heads", "head_dim"), 8) == P(None, "data", "tensor", None)
    # only the layer axis divides: it is used as the last resort
    assert add((8, 12), P(None, None), P("layers", "embed"), 8) == P("data", None)
    assert add((6, 12), P(None, None), P("layers", "embed"), 8) == P(None, None)
    assert add((), P(), P(), 8) == P()
    assert add((16, 64), P("tensor", None), P("vocab", "embed"), 1) == P("tensor", None)
    assert add((16, 64), P("data", None), P("vocab", "embed"), 4) == P("data", None)


@pytest.fixture(scope="module")
def tp_forward_hlo(setup):
    model = setup[0]
    mesh, rules = make_mesh(data=4, tensor=2), make_rules()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32)))
    shardings = sharding.mesh_shardings(boxed, mesh, rules)
    abstract = nn.unbox(boxed)
    with sharding.activation_sharding(mesh, rules):
        forward = jax.jit(lambda v, t: model.apply(v, t)[0],
                          in_shardings=(shardings, sharding.batch_sharding(mesh)))
        compiled = forward.lower(abstract, jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)).compile(
            compiler_options=FAST_COMPILE)
    return compiled.as_text()


def test_tensor_parallel_forward_has_one_all_reduce_per_attention_and_mlp_block(tp_forward_hlo):
    per_layer = hlo.collective_counts(tp_forward_hlo, loop_body=True)
    # The scanned stack is one while loop whose body is one layer (pattern "A").
    assert per_layer == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0,
                         "all-to-all": 0, "collective-permute": 0}
    ops = [line for _, line in hlo.collective_ops(tp_forward_hlo, loop_body=True)]
    assert any("o_proj" in line for line in ops) and any("down_proj" in line for line in ops)
    # each reduces an activation [batch / data, seq, embed] within a tensor pair, not a weight
    # (Dense layers flatten the tokens, so the reduced activation may be [batch/data·seq, embed])
    local = (f"f32[{BATCH // 4},{SEQ},{CFG.embed_dim}]", f"f32[{BATCH // 4 * SEQ},{CFG.embed_dim}]")
    assert all(any(shape in line for shape in local)
               and "replica_groups={{0,1},{2,3},{4,5},{6,7}}" in line for line in ops), ops
    whole = hlo.collective_counts(tp_forward_hlo)
    assert whole["all-gather"] == 0  # no weight is ever gathered whole
    assert whole["all-reduce"] == 3  # + the vocab-sharded embedding lookup


def test_checkpoint_saved_on_data8_restores_onto_data2_tensor4(setup, trained, tmp_path):
    model, tx, _, _, _ = setup
    _, state, _ = trained[(8, 1, 1)]
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(STEPS, state, {"position": 3}, {"note": "data=8"}, force=True)
    mesh = make_mesh(data=2, tensor=4)
    shardings = state_lib.state_shardings(model, tx, mesh, make_rules(), SEQ, zero.transform(3))
    abstract = abstract_with_shardings(nn.unbox(state_lib.abstract_state(
        model, tx, jax.random.key(0), SEQ)), shardings)
    restored, data_state, meta = checkpointer.restore(STEPS, abstract)
    checkpointer.close()
    assert data_state == {"position": 3} and meta == {"note": "data=8"}
    for saved, got, want in zip(jax.tree.leaves(state), jax.tree.leaves(restored),
                                jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved))
    q = restored.params["blocks"]["slot_0"]["attention"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 4)  # embed / 2, heads / 4


@pytest.fixture(scope="module")
def remat_grads():
    tokens = jnp.asarray(batches(n=1)[0]["inputs"])
    results = {}
    params = None
    for policy in ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "offload"):
        model = Decoder(replace(CFG, remat=policy))
        if params is None:
            params = nn.unbox(model.init(jax.random.key(1), tokens))

        def loss(p, model=model):
            logits, _ = model.apply(p, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        results[policy] = jax.jit(jax.value_and_grad(loss),
                                  compiler_options=FAST_COMPILE)(params)
        if policy == "offload":
            results["offload_jaxpr"] = str(jax.make_jaxpr(jax.grad(loss))(params))
    return results


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                                    "offload"])
def test_remat_policies_give_the_same_loss_and_grads(remat_grads, policy):
    ref_loss, ref_grads = remat_grads["none"]
    loss, grads = remat_grads[policy]
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_offload_policy_moves_saved_activations_to_host_memory(remat_grads):
    # On the CPU backend host and device memory are the same RAM: the residuals are placed in
    # the pinned_host memory space in the program, and XLA lowers the copy to nothing.
    assert remat_grads["offload_jaxpr"].count("<host>") >= 6


def test_bfloat16_computes_in_bf16_with_f32_params_and_optimizer_state(setup):
    _, _, _, init, data = setup
    batch = data[0]
    bf16 = Decoder(replace(CFG, dtype="bfloat16"))
    tx, schedule = optimizer.make_optimizer(TCFG), optimizer.learning_rate_schedule(TCFG)
    step = jax.jit(step_lib.make_train_step(bf16, tx, schedule), compiler_options=FAST_COMPILE)
    new_state, metrics = step(jax.tree.map(jnp.asarray, init), batch)
    arrays = jax.tree.leaves((new_state.params, new_state.opt_state))
    assert {x.dtype for x in arrays if x.ndim} == {jnp.dtype(jnp.float32)}

    def forward(params):
        return bf16.apply({"params": params}, batch["inputs"])[0]

    assert jax.eval_shape(forward, init.params).dtype == jnp.float32  # logits
    jaxpr = str(jax.make_jaxpr(forward)(init.params))
    out_types = [line.split("=")[0].split(":")[1].strip() for line in jaxpr.splitlines()
                 if "= dot_general[" in line]
    # q/k/v/o, gate/up/down, probs·v and lm_head in bf16; only the attention scores
    # (preferred_element_type=float32, ahead of the f32 softmax) come out f32.
    assert len(out_types) == 10
    assert sum(t.startswith("bf16") for t in out_types) == 9
    f32_ce, bf16_ce = (float(jax.jit(step_lib.make_eval_step(m), compiler_options=FAST_COMPILE)(
        init.params, {}, batch)[0]) for m in (Decoder(CFG), bf16))
    assert bf16_ce == pytest.approx(f32_ce, rel=1e-2) and bf16_ce != f32_ce
    assert float(metrics["loss"]) == pytest.approx(bf16_ce / batch["loss_mask"].sum(), rel=1e-3)


# ---- bad input: one line naming the thing ------------------------------------------------

def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ShardingError, match=r"^parallel.data=3 × parallel.expert=1 × "
                                            r"parallel.tensor=1 = 3 devices: expected a divisor "
                                            r"of the 8 devices$"):
        make_mesh(data=3)
    with pytest.raises(ShardingError, match=r"^parallel.tensor=3 × parallel.expert=1 = 3: "):
        make_mesh(tensor=3)
    with pytest.raises(ShardingError, match=r"= 16 devices"):
        make_mesh(data=4, tensor=4)


def test_rule_naming_an_unknown_axis():
    with pytest.raises(ShardingError, match=r"^parallel.rules entry 'heads=model': unknown mesh "
                                            r"axis 'model'; expected one of \['data', "):
        make_rules(["heads=model"])
    with pytest.raises(ShardingError, match=r"unknown logical axis 'head'; expected one of"):
        make_rules(["head=tensor"])
    assert dict(make_rules(["vocab=", "embed=data,tensor"]))["vocab"] is None
    assert dict(make_rules(["embed=data,tensor"]))["embed"] == ("data", "tensor")


def test_dimension_not_divisible_by_its_mesh_axis(setup):
    model, tx, _, _, _ = setup
    gqa = Decoder(tiny_model_config(num_heads=4, num_kv_heads=2))
    with pytest.raises(ShardingError) as error:
        state_lib.state_shardings(gqa, tx, make_mesh(data=2, tensor=4), make_rules(), SEQ)
    assert str(error.value) == (
        "params/blocks/slot_0/attention/k_proj/kernel: dim 2 (kv_heads) of size 2 is not "
        "divisible by mesh axis tensor=4; expected parallel.tensor to divide 2, or a "
        "parallel.rules override for 'kv_heads'")
    # replicating kv heads by a rule override makes the same mesh valid
    state_lib.state_shardings(gqa, tx, make_mesh(data=2, tensor=4), make_rules(["kv_heads="]),
                              SEQ)
    with pytest.raises(ShardingError, match=r"^data.batch_size=12: 12 rows per micro-batch .* "
                                            r"data × expert = 8 devices$"):
        validate.check_batch(12, 1, make_mesh(data=8))


def test_launch_reports_a_bad_mesh_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, os.path.join(root, "experiments", "launch.py"), "--config",
         os.path.join(root, "experiments", "configs", "quickstart.py"), "--workdir",
         str(tmp_path / "run"), "--config.parallel.tensor=3"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parallel.tensor=3 × parallel.expert=1 = 3: expected a divisor of the 8 devices"]
    assert not (tmp_path / "run").exists()
