"""Training: accumulation equals a big batch, exact resume, schedule, decay mask, losses."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxlm_testing import tiny_experiment, tiny_model_config

from jaxlm.config import parse_config
from jaxlm.models.decoder import Decoder, init_params
from jaxlm.train import optimizer, step as step_lib
from jaxlm.train.config import TrainConfig
from jaxlm.train.losses import cross_entropy_sums
from jaxlm.train.loop import train
from jaxlm.train.state import TrainState


def make_state(model, tx):
    params = nn.unbox(init_params(model, jax.random.key(0)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state={})


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_model_config()
    model = Decoder(cfg)
    # SGD keeps the update linear in the gradient (Adam's first step is ≈ sign(g), which
    # would amplify float32 rounding of near-zero gradients).
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(8, 17)).astype(np.int32)
    mask = (rng.random((8, 16)) > 0.2).astype(np.float32)  # uneven masks across micro-batches
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    results = []
    for accum in (1, 4):
        fn = jax.jit(step_lib.make_train_step(model, tx, schedule, accum_steps=accum,
                                              z_loss=1e-3))
        state, metrics = fn(make_state(model, tx), batch)
        results.append((state.params, metrics))
    (p1, m1), (p4, m4) = results
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cross_entropy_and_z_loss_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    ce, z, w = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                  1e-3)
    l64 = logits.astype(np.float64)
    lse = np.log(np.exp(l64).sum(-1))
    ref_ce = ((lse - np.take_along_axis(l64, targets[..., None], -1)[..., 0]) * mask).sum()
    assert float(ce) == pytest.approx(ref_ce, rel=1e-6)
    assert float(z) == pytest.approx((lse ** 2 * mask).sum(), rel=1e-6)
    assert float(w) == 4.0


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(steps=110, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    sched = optimizer.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    for s in (35, 60, 85):
        frac = (s - 10) / 100
        assert float(sched(s)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)),
                                                rel=1e-5)
    assert float(sched(110)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_skips_norms_and_biases():
    cfg = tiny_model_config(qkv_bias=True)
    params = nn.unbox(init_params(Decoder(cfg), jax.random.key(0)))
    mask = optimizer.decay_mask(params)
    slot = mask["blocks"]["slot_0"]
    assert slot["attention"]["q_proj"]["kernel"] and slot["mlp"]["down_proj"]["kernel"]
    assert not slot["attention"]["q_proj"]["bias"]
    assert not slot["mixer_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert mask["embed"]["embedding"]


def test_adamw_decoupled_decay_matches_formula():
    """One AdamW step with β1, β2 = 0.9, 0.95 against the textbook update."""
    cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, schedule="constant",
                      grad_clip=0.0, weight_decay=0.1)
    tx = optimizer.make_optimizer(cfg)
    params = {"w": {"kernel": jnp.array([1.0, -2.0])}, "n": {"scale": jnp.array([3.0])}}
    grads = {"w": {"kernel": jnp.array([0.5, 0.25])}, "n": {"scale": jnp.array([1.0])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # first step: m̂ = g, v̂ = g², so the Adam direction is g/(|g|+eps) = sign(g)
    expected_w = -0.1 * (np.sign([0.5, 0.25]) + 0.1 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(updates["w"]["kernel"]), expected_w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["n"]["scale"]), [-0.1], rtol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    config = tiny_experiment()
    config.train.eval_every = 3
    workdir = str(tmp_path_factory.mktemp("full"))
    return {**train(parse_config(config), workdir, log=lambda *_: None), "workdir": workdir}


def test_resume_reproduces_the_uninterrupted_run_exactly(uninterrupted, tmp_path):
    config = tiny_experiment()
    config.train.eval_every = 3
    config.train.steps = 3
    workdir = str(tmp_path / "resumed")
    train(parse_config(config), workdir, log=lambda *_: None)
    config.train.steps = 6  # same experiment, trained further: resumes from step 3
    resumed = train(parse_config(config), workdir, log=lambda *_: None)
    assert int(resumed["state"].step) == 6
    full = jax.tree.leaves(uninterrupted["state"].params)
    for a, b in zip(full, jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["eval_loss"] == uninterrupted["eval_loss"]


def test_training_loss_falls_and_metrics_are_logged(uninterrupted):
    records = [json.loads(line) for line in open(uninterrupted["workdir"] + "/metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    logged = {k for r in records for k in r}
    assert {"grad_norm", "learning_rate", "tokens_per_s", "model_flops_per_s", "eval/loss",
            "eval/unigram_loss"} <= logged
