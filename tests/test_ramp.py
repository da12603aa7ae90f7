"""Batch-size ramp: triggers by their rules, the B_simple estimator, and a ramped step that
equals the scanned step and compiles once."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxlm_testing import tiny_model_config

from jaxlm.models.decoder import Decoder, init_params
from jaxlm.schema import ConfigError, from_config_dict
from jaxlm.train import ramp, step as step_lib
from jaxlm.train.state import TrainState


def controller(**fields):
    cfg = ramp.RampConfig(**fields)
    return ramp.RampController(cfg, start_accum=fields.pop("start", 1), micro_rows=4,
                               tokens_per_row=8)


def test_plateau_fires_exactly_when_the_rule_says():
    # ema_decay 0: the EMA is the loss itself, so the rule can be followed by hand.
    c = controller(trigger="plateau", ema_decay=0.0, plateau_delta=0.1, patience=3, factor=2,
                   max_accum_steps=4)
    losses = [5.0, 4.0, 3.95, 3.92, 3.91,   # best 4.0 at step 1; 3 steps without -0.1: fires at 4
              3.5, 3.5, 3.45, 3.42,         # improves at 5 (3.5 < 3.81); fires at 8 (k 2 -> 4)
              3.0, 3.0, 3.0, 3.0,           # improves at 9; fires at 12: k at max, LR / 2
              2.0]                          # improves at 13
    fired, ks, scales = [], [], []
    for step, loss in enumerate(losses):
        k = c.accum_for(step)
        if c.observe(step, k, loss):
            fired.append(step)
        ks.append(c.accum_for(step + 1))
        scales.append(c.state.lr_scale)
    assert fired == [4, 8, 12]
    assert ks == [1] * 4 + [2] * 4 + [4] * 6
    assert scales == [1.0] * 12 + [0.5] * 2
    assert c.state.tokens_seen == sum([1] * 5 + [2] * 4 + [4] * 5) * 4 * 8


def test_plateau_uses_the_ema():
    """With decay 0.5, EMAs 4, 3, 3, 3, ...: the loss jumps (2 -> 4) leave the EMA flat enough
    to fire, where the raw loss alternating would improve every other step."""
    c = controller(trigger="plateau", ema_decay=0.5, plateau_delta=0.2, patience=2)
    losses = [4.0, 2.0, 4.0, 2.0, 4.0, 2.0]
    emas, fired = [], []
    for step, loss in enumerate(losses):
        if c.observe(step, 1, loss):
            fired.append(step)
        emas.append(c.state.loss_ema)
    assert emas == [4.0, 3.0, 3.5, 2.75, 3.375, 2.6875]
    # improvements (< best - 0.2): step 0 (4), 1 (3.0), 3 (2.75); none at 4, 5 -> fire at 5
    assert fired == [5]


def test_schedule_trigger_follows_its_table():
    c = controller(trigger="schedule", schedule=((3, 2), (5, 8)), max_accum_steps=8)
    assert [c.accum_for(s) for s in range(7)] == [1, 1, 1, 2, 2, 8, 8]


def test_b_simple_of_synthetic_gradients_is_within_ten_percent():
    """Per-example gradients G + noise with covariance Σ (known trace): the estimator's
    B_simple converges to tr(Σ)/|G|²."""
    rng = np.random.default_rng(0)
    dim, b_small, k = 2000, 4, 8
    G = rng.normal(size=dim) * 0.02
    sigma_diag = rng.uniform(0.5, 1.5, size=dim) * 0.02
    want = sigma_diag.sum() / (G @ G)
    c = ramp.RampController(ramp.RampConfig(trigger="noise_scale", ema_decay=0.95,
                                            patience=10 ** 6), start_accum=k,
                            micro_rows=b_small, tokens_per_row=1)
    for step in range(200):
        examples = G + rng.normal(size=(k, b_small, dim)) * np.sqrt(sigma_diag)
        micro = examples.mean(axis=1)                      # [k, dim] micro-batch gradients
        big = micro.mean(axis=0)
        g_small_sq = float(np.mean(np.sum(micro ** 2, axis=1)))
        c.observe(step, k, 1.0, g_small_sq, float(big @ big))
    assert 10 < want < 1000
    assert c.b_simple() == pytest.approx(want, rel=0.10)
    assert c.state.fired == 0  # patience holds it back, though B_simple > k·b = 32 rows


def test_noise_scale_fires_when_b_simple_exceeds_the_batch():
    c = ramp.RampController(ramp.RampConfig(trigger="noise_scale", ema_decay=0.0, patience=1,
                                            max_accum_steps=8),
                            start_accum=2, micro_rows=4, tokens_per_row=1)
    # |G_big|² = 1, |G_small|² = 1 + S/4 with S = 40: B_simple = 40 > 8 rows -> fires
    assert c.observe(0, 2, 1.0, 1.0 + 40 / 4, 1.0 + 40 / 8)
    assert c.b_simple() == pytest.approx(40.0) and c.accum_for(1) == 4
    # B_simple 10 < 16 rows: does not fire
    assert not c.observe(1, 4, 1.0, 1.0 + 10 / 4, 1.0 + 10 / 16)


@pytest.mark.parametrize("fields,message", [
    ({"schedule": ((5, 2), (5, 4))}, r"train.ramp.schedule\[1\]=\(5, 4\): expected a step > 5"),
    ({"schedule": ((5, 32),)}, r"expected accum_steps in \[1, train.ramp.max_accum_steps=16\]"),
    ({"trigger": "schedule"}, r"train.ramp.schedule=\(\): expected at least one"),
    ({"trigger": "sometimes"}, r"train.ramp.trigger='sometimes': expected one of"),
])
def test_bad_ramp_config_is_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        from_config_dict(ramp.RampConfig, fields, "train.ramp.")


def test_noise_scale_needs_two_micro_batches():
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps=1: expected >= 2 with "
                                          r"train.ramp.trigger='noise_scale'"):
        ramp.RampConfig(trigger="noise_scale").check(1)


# ---- the ramped step --------------------------------------------------------------------------

FAST = {"xla_backend_optimization_level": 0}


def test_ramped_step_equals_the_scanned_step_and_growing_k_does_not_recompile():
    model = Decoder(tiny_model_config())
    params = jax.jit(lambda r: nn.unbox(init_params(model, r)))(jax.random.key(0))
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(8, 17)).astype(np.int32)
    mask = (rng.random((8, 16)) > 0.2).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}

    def fresh():
        return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                          opt_state=tx.init(params), model_state={})

    scanned = jax.jit(step_lib.make_train_step(model, tx, schedule, accum_steps=4, z_loss=1e-3),
                      compiler_options=FAST)
    want_state, want = scanned(fresh(), batch)
    c = ramp.RampController(ramp.RampConfig(trigger="plateau"), start_accum=4, micro_rows=2,
                            tokens_per_row=16)
    stepper = ramp.RampStepper(model, tx, schedule, c, z_loss=1e-3)
    got_state, got = stepper(fresh(), batch)          # k = 4 micro-batches of 2 rows
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    assert float(got["z_loss"]) == pytest.approx(float(want["z_loss"]), rel=1e-6)
    assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(want_state.params), jax.tree.leaves(got_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert got["batch_size"] == 8 and got["tokens_seen"] == 8 * 16 and got["accum_steps"] == 4
    # |G_small|² is the mean of the micro-batches' own squared gradient norms, |G_big|² the step's
    assert float(got["g_big_sq"]) == pytest.approx(float(want["grad_norm"]) ** 2, rel=1e-5)
    assert float(got["g_small_sq"]) > float(got["g_big_sq"])
    # k = 1, 2, 4 rows of the same micro-batch shape: one compiled micro-step, one apply-step
    state = got_state
    for k in (1, 2, 4):
        state, metrics = stepper(state, {key: np.concatenate([v[:2]] * k)
                                         for key, v in batch.items()})
        assert metrics["accum_steps"] == k
    assert stepper.micro_step._cache_size() == 1
    assert stepper.apply_step._cache_size() == 1
    assert int(state.step) == 4


class CountingIterator:
    """A checkpointable iterator of micro-batches: {'inputs': [[i]]} for i = 0, 1, ..."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return {"inputs": np.array([[self.i - 1]]), "loss_mask": np.ones((1, 1), np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_ramp_iterator_draws_k_micro_batches_and_checkpoints_the_ramp():
    class Source:
        def __iter__(self):
            return CountingIterator()

    c = controller(trigger="schedule", schedule=((2, 3),))
    it = iter(ramp.RampDataset(Source(), c))
    assert [next(it)["inputs"][:, 0].tolist() for _ in range(3)] == [[0], [1], [2, 3, 4]]
    c.observe(2, 3, 1.0)
    saved = it.get_state()
    after = next(it)["inputs"][:, 0].tolist()
    c2 = controller(trigger="schedule", schedule=((2, 3),))
    it2 = iter(ramp.RampDataset(Source(), c2))
    it2.set_state(saved)
    assert next(it2)["inputs"][:, 0].tolist() == after == [5, 6, 7]
    assert c2.state.tokens_seen == c.state.tokens_seen == 3 * 4 * 8
    # a data state saved without a ramp: same data position, the ramp starts afresh
    it2.set_state({"i": 5})
    assert c2.state.tokens_seen == 0
    assert [next(it2)["inputs"][:, 0].tolist() for _ in range(3)] == [[5], [6], [7, 8, 9]]


# ---- in the training loop ---------------------------------------------------------------------

def ramp_experiment(steps):
    from jaxlm_testing import tiny_experiment
    config = tiny_experiment()
    config.data.batch_size = 4
    config.train.grad_accum_steps = 2          # micro-batches of 2 rows, k starts at 2
    config.train.steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.schedule = "constant"
    ramp_cfg = config.train.ramp
    ramp_cfg.trigger, ramp_cfg.patience, ramp_cfg.plateau_delta = "plateau", 1, 100.0
    ramp_cfg.max_accum_steps = 8               # fires from step 1 on: k 2, 4, 8, then LR / 2
    return config


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory):
    from jaxlm.config import parse_config
    from jaxlm.train.loop import train
    workdir = str(tmp_path_factory.mktemp("ramp"))
    return {**train(parse_config(ramp_experiment(5)), workdir, log=lambda *_: None),
            "workdir": workdir}


def test_loop_logs_batch_size_tokens_seen_and_lr_scale(ramp_run):
    import json
    records = [json.loads(line) for line in open(ramp_run["workdir"] + "/metrics.jsonl")]
    steps = [r for r in records if "batch_size" in r]
    # the first EMA sets the best; every later step fails to improve by 100 nats and fires
    assert [r["accum_steps"] for r in steps] == [2, 2, 4, 8, 8]
    assert [r["batch_size"] for r in steps] == [4, 4, 8, 16, 16]
    assert [r["tokens_seen"] for r in steps] == [128, 256, 512, 1024, 1536]  # 32 tokens a row
    assert [r["lr_scale"] for r in steps] == [1.0, 1.0, 1.0, 1.0, 0.5]     # fired at the cap
    assert [r["learning_rate"] for r in steps][3:] == pytest.approx([1e-2, 0.5e-2], rel=1e-6)


def test_resumed_ramp_equals_the_uninterrupted_one(ramp_run, tmp_path):
    """The uninterrupted run as if stopped after step 2 (its later checkpoints removed from a
    copy of its workdir), resumed to step 5: same k, LR scale and data, same parameters."""
    import os
    import shutil
    from jaxlm.config import parse_config
    from jaxlm.train.loop import train
    workdir = str(tmp_path / "resumed")
    shutil.copytree(ramp_run["workdir"], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(checkpoints), key=int) == ["2", "4", "5"]
    for later in ("4", "5"):
        shutil.rmtree(os.path.join(checkpoints, later))
    messages = []
    resumed = train(parse_config(ramp_experiment(5)), workdir, log=messages.append)
    assert int(resumed["state"].step) == 5
    assert f"resumed from {checkpoints}/2" in messages
    for a, b in zip(jax.tree.leaves(ramp_run["state"].params),
                    jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
