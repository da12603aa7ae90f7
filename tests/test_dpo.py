"""DPO losses against their closed forms, SFT prompt masking, the preference data files."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxlm_testing import tiny_model_config

from jaxlm.data import preference
from jaxlm.data.tokenizers import EOT, ByteTokenizer
from jaxlm.models.decoder import Decoder, init_params
from jaxlm.schema import ConfigError, from_config_dict
from jaxlm.train import dpo, step as step_lib
from jaxlm.train.state import TrainState

# hand-made summed log-probs of 3 pairs: [pair, (chosen, rejected)] and completion lengths
POLICY = np.array([[-10.0, -12.0], [-7.5, -7.0], [-20.0, -31.0]])
REF = np.array([[-11.0, -11.5], [-7.0, -7.25], [-22.0, -30.0]])
LENGTHS = np.array([[4.0, 6.0], [3.0, 2.0], [8.0, 10.0]])


def log_sigmoid64(x):
    return -np.log1p(np.exp(-x))


def reference_losses(loss, beta, eps=0.0):
    """Float64 closed forms, written from the formulas (SPEC §G)."""
    if loss == "ipo":
        pol, ref = POLICY / LENGTHS, REF / LENGTHS
    else:
        pol, ref = POLICY, REF
    delta = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    if loss == "sigmoid":
        return -(1 - eps) * log_sigmoid64(beta * delta) - eps * log_sigmoid64(-beta * delta)
    if loss == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    return np.maximum(0.0, 1 - beta * delta)


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                           ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0),
                                           ("hinge", 0.1, 0.0), ("hinge", 0.8, 0.0)])
def test_pair_losses_equal_their_closed_forms(loss, beta, eps):
    cfg = dpo.DPOConfig(loss=loss, beta=beta, label_smoothing=eps)
    loss_p, chosen, rejected = dpo.pair_losses(jnp.asarray(POLICY, jnp.float32),
                                               jnp.asarray(REF, jnp.float32),
                                               jnp.asarray(LENGTHS, jnp.float32), cfg)
    np.testing.assert_allclose(np.asarray(loss_p), reference_losses(loss, beta, eps), rtol=1e-5)
    scale = LENGTHS if loss == "ipo" else 1.0
    np.testing.assert_allclose(np.asarray(chosen), beta * ((POLICY - REF) / scale)[:, 0],
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected), beta * ((POLICY - REF) / scale)[:, 1],
                               rtol=1e-5)


def test_hinge_is_exactly_zero_past_the_margin():
    delta = jnp.array([5.0, 10.0, 20.0])
    np.testing.assert_array_equal(np.asarray(dpo.preference_loss(delta, beta=0.1,
                                                                 loss="hinge")), [0.5, 0.0, 0.0])


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0)])
def test_beta_to_zero_gives_zero_gradient_wrt_the_margin(loss, eps):
    delta = jnp.array([-3.0, 0.0, 0.7, 12.0])

    def grad_at(beta):
        return np.asarray(jax.grad(lambda d: jnp.sum(dpo.preference_loss(
            d, beta=beta, loss=loss, label_smoothing=eps)))(delta))

    assert np.abs(grad_at(1e-7)).max() <= 1e-7
    # and it is not zero for a real β: dL/dΔ = −β(1−ε)σ(−βΔ) + βεσ(βΔ) (sigmoid), −β (hinge)
    beta = 0.5
    d = np.asarray(delta, np.float64)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = (-beta * (1 - eps) * sig(-beta * d) + beta * eps * sig(beta * d) if loss == "sigmoid"
            else np.where(1 - beta * d > 0, -beta, 0.0))
    np.testing.assert_allclose(grad_at(beta), want, rtol=1e-5, atol=1e-7)


def test_sequence_logps_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 2
    targets = rng.integers(0, 11, size=(3, 5))
    mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
    logps, lengths = dpo.sequence_logps(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.asarray(mask))
    want = np.zeros(3)
    for b in range(3):
        for t in range(5):
            row = logits[b, t].astype(np.float64)
            want[b] += mask[b, t] * (row[targets[b, t]] - np.log(np.exp(row).sum()))
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lengths), mask.sum(1))


def test_label_smoothing_is_only_for_the_sigmoid_loss():
    with pytest.raises(ConfigError, match=r"train.dpo.label_smoothing=0.1: expected 0 with "
                                          r"train.dpo.loss='ipo'"):
        from_config_dict(dpo.DPOConfig, {"loss": "ipo", "label_smoothing": 0.1}, "train.dpo.")
    with pytest.raises(ConfigError, match=r"train.dpo.beta=0.0: expected > 0"):
        from_config_dict(dpo.DPOConfig, {"beta": 0.0}, "train.dpo.")


# ---- the step on a tiny model ------------------------------------------------------------------

TOKENIZER = ByteTokenizer()
SEQ = 24
FAST = {"xla_backend_optimization_level": 0}  # tiny shapes: compile time dominates
EVAL_CFG = dpo.DPOConfig(beta=0.3, label_smoothing=0.1)


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST)


@pytest.fixture(scope="module")
def model_and_params():
    model = Decoder(tiny_model_config())
    return model, jax.jit(lambda r: nn.unbox(init_params(model, r)))(jax.random.key(0))


def pair_batch():
    examples = [("def f(x):\n", "    return x\n", "    retrun\n"),
                ("a = ", "1\n", "one\n"),
                ("# add\n", "x + y", "x - y - z - w"),
                ("", "pass\n", "pas\n")]
    encode = preference.Encode(TOKENIZER, "dpo", SEQ, 8)
    rows = [encode(preference.Row(f"r:{i}", e)) for i, e in enumerate(examples)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


_EVAL = {}


def dpo_eval(model):
    """One compiled DPO evaluation (β 0.3, ε 0.1) shared by the tests."""
    if model not in _EVAL:
        _EVAL[model] = fast_jit(dpo.make_dpo_eval_step(model, EVAL_CFG))
    return _EVAL[model]


@pytest.fixture(scope="module")
def dpo_step(model_and_params):
    model, _ = model_and_params
    tx = optax.sgd(0.5)
    cfg = dpo.DPOConfig(beta=0.5)
    return {accum: fast_jit(dpo.make_dpo_step(model, tx, optax.constant_schedule(0.5), cfg,
                                             accum_steps=accum)) for accum in (1, 2)}, tx


def test_dpo_step_at_the_reference_is_log2_and_accumulation_does_not_change_it(
        model_and_params, dpo_step):
    model, params = model_and_params
    steps, tx = dpo_step
    batch = pair_batch()
    outs = []
    for accum in (1, 2):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state={})
        outs.append(steps[accum](state, params, batch))
    (s1, m1), (s2, m2) = outs
    assert float(m1["loss"]) == pytest.approx(math.log(2), rel=1e-6)  # Δ = 0 when π_θ = π_ref
    assert float(m1["rewards/margin"]) == 0.0 and float(m1["rewards/accuracy"]) == 0.0
    assert float(m1["pairs"]) == 4.0
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # the update raises every chosen completion's log-prob relative to its rejected one
    sums = dpo_eval(model)(s1.params, params, {}, batch)
    assert float(sums["loss"]) / 4 < math.log(2)
    assert float(sums["accuracy"]) == 4.0 and float(sums["margin"]) > 0


def test_dpo_loss_of_the_step_matches_numpy_from_the_models_log_probs(model_and_params):
    """Reference params ≠ policy params: the step's loss equals the float64 closed form built
    from log-probs computed separately in NumPy from the two models' logits."""
    model, params = model_and_params
    ref = jax.tree.map(lambda x: x * 0.9, params)
    batch = pair_batch()
    sums = dpo_eval(model)(params, ref, {}, batch)

    def np_logps(p):
        flat = {k: v.reshape(8, SEQ) for k, v in batch.items()}
        logits, _ = model.apply({"params": p}, flat["inputs"])
        logits = np.asarray(logits, np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tok = np.take_along_axis(logits, flat["targets"][..., None], -1)[..., 0]
        return ((tok - lse) * flat["loss_mask"]).sum(-1).reshape(4, 2)

    pol, rf = np_logps(params), np_logps(ref)
    delta = (pol[:, 0] - rf[:, 0]) - (pol[:, 1] - rf[:, 1])
    want = np.mean(-0.9 * log_sigmoid64(0.3 * delta) - 0.1 * log_sigmoid64(-0.3 * delta))
    assert float(sums["loss"]) / 4 == pytest.approx(want, rel=1e-5)


# ---- SFT masking ------------------------------------------------------------------------------

def test_sft_masking_ignores_prompt_targets(model_and_params):
    """The LM step on SFT rows: rewriting the targets under the prompt (mask 0) changes
    neither the loss nor any gradient; rewriting a completion target does."""
    model, params = model_and_params
    encode = preference.Encode(TOKENIZER, "sft", SEQ, 12)
    rows = [encode(preference.Row("r:1", ("def add(a, b):\n", "    return a + b\n"))),
            encode(preference.Row("r:2", ("x = [1, 2]\n", "print(x)\n")))]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    tx = optax.sgd(1.0)
    step = fast_jit(step_lib.make_train_step(model, tx, optax.constant_schedule(1.0)))

    def run(b):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state={})
        new, metrics = step(state, b)
        return float(metrics["loss"]), jax.tree.leaves(new.params)

    prompt = batch["loss_mask"] == 0
    assert prompt[:, :5].all() and (~prompt).sum() > 10
    scrambled = dict(batch, targets=np.where(prompt, (batch["targets"] * 7 + 3) % 250,
                                             batch["targets"]))
    assert (scrambled["targets"] != batch["targets"]).sum() > 10
    (loss_a, params_a), (loss_b, params_b) = run(batch), run(scrambled)
    assert loss_a == loss_b
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # control: one completion target changed -> the loss moves
    first = int(np.argmax(batch["loss_mask"][0]))
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][0, first] = (changed["targets"][0, first] + 1) % 250
    assert run(changed)[0] != loss_a


# ---- the data files ---------------------------------------------------------------------------

def test_encoding_layout_and_truncation_rule():
    eot = TOKENIZER.special_id(EOT)
    row = preference.encode_example(TOKENIZER, "abcdef", "XY", seq_len=10, max_prompt_tokens=3)
    # [EOT] "def" "XY" [EOT] pad: the prompt keeps its last 3 tokens
    assert list(row["inputs"]) == [eot, *b"defXY", eot, 0, 0, 0]
    assert list(row["targets"]) == [*b"defXY", eot, 0, 0, 0, 0]
    assert list(row["loss_mask"]) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    long = preference.encode_example(TOKENIZER, "ab", "0123456789", seq_len=6,
                                     max_prompt_tokens=3)
    # cut on the right at seq_len + 1 tokens: the completion loses its end and its EOT
    assert list(long["targets"]) == [*b"ab0123"] and eot not in long["targets"]
    assert list(long["loss_mask"]) == [0, 0, 1, 1, 1, 1]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_a_dpo_row_missing_rejected_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(preference.PreferenceDataError) as info:
        preference.read_rows(path, "dpo")
    assert str(info.value) == (f"{path}:2: missing field 'rejected' (expected {{prompt, chosen, "
                               "rejected})")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": 3}', "{oops"])
    with pytest.raises(preference.PreferenceDataError, match=r"bad.jsonl:1: field 'completion' "
                                                             r"is int, expected a string"):
        preference.read_rows(bad, "sft")


def test_datasets_shapes_split_resume_and_padding(tmp_path):
    rows = [{"prompt": f"p{i} ", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(40)]
    cfg = preference.AlignDataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows),
                                     heldout_fraction=0.2)
    train_rows = preference.split_rows(preference.read_rows(cfg.path, "dpo"), "train", 0.2)
    held = preference.split_rows(preference.read_rows(cfg.path, "dpo"), "heldout", 0.2)
    assert len(train_rows) + len(held) == 40 and 0 < len(held) < 20
    it = iter(preference.train_dataset(cfg, "dpo", TOKENIZER, SEQ, batch_size=4))
    first = next(it)
    assert first["inputs"].shape == (4, 2, SEQ) and first["loss_mask"].dtype == np.float32
    saved = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = iter(preference.train_dataset(cfg, "dpo", TOKENIZER, SEQ, batch_size=4))
    again.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])
    batches = preference.heldout_batches(cfg, "dpo", TOKENIZER, SEQ, batch_size=3)
    real = sum(int((b["loss_mask"].sum(axis=(1, 2)) > 0).sum()) for b in batches)
    assert real == len(held) and len(batches) == -(-len(held) // 3)


# ---- launch.py --mode sft | dpo ---------------------------------------------------------------

def launch(*args):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, os.path.join(root, "experiments", "launch.py"),
                           *args], capture_output=True, text=True, cwd=root, env=env,
                          timeout=600)


TINY = ["--config.model.num_layers=2", "--config.model.embed_dim=32",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.mlp_dim=64", "--config.data.seq_len=48", "--config.data.batch_size=4",
        "--config.train.steps=3", "--config.train.warmup_steps=0",
        "--config.train.learning_rate=0.01", "--config.train.log_every=1",
        "--config.train.eval_batches=1", "--config.train.progress_bar=False",
        "--config.train.async_checkpoint=False", "--config.parallel.data=1"]


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_launch_mode_runs_end_to_end_and_logs_its_metrics(mode, tmp_path):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / mode
    result = launch("--mode", mode, "--config", os.path.join(root, "experiments", "configs",
                                                             f"{mode}.py"),
                    "--workdir", str(workdir), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["objective"] == mode
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps)
    evals = [r for r in records if "eval/loss" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval/loss"])
    assert os.path.isdir(workdir / "checkpoints" / "3")
    if mode == "dpo":
        # step 1: policy = reference, so Δ = 0 and the loss is log 2; later the margin moves
        assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert steps[0]["rewards/margin"] == 0.0
        assert all({"rewards/accuracy", "rewards/margin", "rewards/chosen",
                    "rewards/rejected"} <= set(r) for r in steps)
        assert 0.0 <= steps[-1]["rewards/accuracy"] <= 1.0 and steps[-1]["rewards/margin"] != 0
    else:
        assert steps[-1]["loss"] < steps[0]["loss"]


def test_launch_dpo_with_a_row_missing_rejected_is_one_line_naming_file_and_line(tmp_path):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "d", "chosen": "e", "rejected": "f"},
        {"prompt": "g", "chosen": "h"}])
    workdir = tmp_path / "never"
    result = launch("--mode", "dpo", "--config", os.path.join(root, "experiments", "configs",
                                                             "dpo.py"),
                    "--workdir", str(workdir), f"--config.align.path={data}", *TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {data}:3: missing field 'rejected' (expected {{prompt, chosen, "
                     "rejected})"]
    assert not workdir.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"train": {"objective": "dpo"}}, "align.path='': expected a JSONL file with "
                                      "train.objective='dpo'"),
    ({"train": {"objective": "sft"}, "align": {"path": "x.jsonl", "max_prompt_tokens": 256}},
     "align.max_prompt_tokens=256: expected < data.seq_len=256"),
    ({"train": {"objective": "dpo", "ramp": {"trigger": "plateau"}},
      "align": {"path": "x.jsonl"}}, "train.ramp.trigger='plateau': expected 'off' with "
                                     "train.objective='dpo'"),
    ({"train": {"objective": "rlhf"}}, "train.objective='rlhf': expected one of"),
])
def test_objective_config_errors_are_one_line(overrides, message):
    from jaxlm.config import default_config, parse_config
    config = default_config()
    for section, fields in overrides.items():
        for key, value in fields.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    config[section][key][k] = v
            else:
                config[section][key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert message in str(info.value) and "\n" not in str(info.value)
