"""launch.py --mode upscale / merge / convert and the run directories they write
(jaxlm.surgery.rundir): a SOLAR-style up-scaled run evaluates and trains on through launch.py;
up-scaled layers equal their sources bit for bit; merges against NumPy; HF -> run -> HF keeps the
transformers logits; seeded runs restore in the loop at step 0 with a fresh optimizer and no data
state; bad input is one line and leaves no output; inputs are never modified."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from absl import flags
from jaxlm_testing import tiny_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # experiments/ is not an installed package

from experiments.modes import convert, merge as merge_mode, upscale as upscale_mode  # noqa: E402
from jaxlm.config import parse_config  # noqa: E402
from jaxlm.layers.moe import MoEConfig  # noqa: E402
from jaxlm.layers.ssm import SSMConfig  # noqa: E402
from jaxlm.surgery import rundir  # noqa: E402
from jaxlm.surgery.merge import ties  # noqa: E402
from jaxlm.surgery.upscale import expand_layer_map  # noqa: E402
from jaxlm.train import loop  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402

LAUNCH = os.path.join(ROOT, "experiments", "launch.py")
QUICKSTART = os.path.join(ROOT, "experiments", "configs", "quickstart.py")
TINY = ["--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.mlp_dim=64", "--config.data.seq_len=16",
        "--config.data.batch_size=2", "--config.train.warmup_steps=1",
        "--config.train.eval_batches=1", "--config.train.progress_bar=False",
        "--config.generate.max_new_tokens=2"]
MODE_FLAGS = ("from_workdir", "layer_map", "merge_inputs", "merge_method", "merge_weights",
              "merge_base", "slerp_t", "slerp_layer_t", "ties_density", "ties_scale", "hf_dir",
              "hf_out")


def launch(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


class Ctx:
    """What launch.py hands a mode, for running modes in-process: flags at their defaults
    unless given, ctx.fail raising instead of exiting."""

    def __init__(self, workdir, config=None, **given):
        values = {name: flags.FLAGS[name].default for name in MODE_FLAGS}
        values.update(given)
        self.flags = types.SimpleNamespace(**values)
        self.workdir = str(workdir)
        self.config_given = config is not None
        self._config = config

    def config(self):
        return parse_config(self._config)

    def fail(self, message):
        raise SystemExit(message)


def tree_hash(directory):
    """Names, sizes and contents of every file under `directory`."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def leaves_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def layer(params, period, index):
    return jax.tree.map(lambda x: x[index // period], params["blocks"][f"slot_{index % period}"])


def seeded_run(path, seed, **model):
    """A run directory with random parameters (no training), through write_run itself."""
    cfg = parse_config(tiny_experiment(**model))
    shapes, state_shapes = rundir.abstract_variables(cfg.model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    model_state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                               state_shapes)
    rundir.write_run(str(path), cfg, params, model_state)
    return cfg, params, model_state


def no_partials(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n] == []


# ---- the acceptance path: SOLAR up-scaling through launch.py ----------------------------------

@pytest.fixture(scope="module")
def solar_chain(tmp_path_factory):
    """Train a 4-layer model 2 steps through launch.py; up-scale it SOLAR-style (m=1: layers
    0-2 then 1-3, 6 layers) with the upscale mode; evaluate the new run's step-0 checkpoint."""
    root = tmp_path_factory.mktemp("solar")
    src, new = str(root / "src"), str(root / "up")
    result = launch("--config", QUICKSTART, "--workdir", src, *TINY,
                    "--config.model.num_layers=4", "--config.train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    before = tree_hash(src)
    upscale_mode.run(Ctx(new, from_workdir=src, layer_map="solar:1"))
    cfg = rundir.read_config(new)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, data=1))
    return {"src": src, "new": new, "before": before,
            "eval": loop.evaluate_checkpoint(cfg, new)}


def test_solar_upscaled_run_copies_layers_and_evaluates_finite(solar_chain):
    src, new = rundir.read_run(solar_chain["src"]), rundir.read_run(solar_chain["new"])
    sources = expand_layer_map([(0, 3), (1, 4)], 4)
    assert sources == [0, 1, 2, 1, 2, 3]
    assert (src.step, new.step, new.cfg.model.num_layers) == (2, 0, 6)
    for i, s in enumerate(sources):
        assert leaves_equal(layer(new.params, 1, i), layer(src.params, 1, s)), (i, s)
    for key in ("embed", "final_norm", "lm_head"):
        assert leaves_equal(new.params[key], src.params[key])
    # everything but the depth is the source's config
    assert new.cfg == rundir.with_model(src.cfg, dataclasses.replace(src.cfg.model, num_layers=6))
    report = solar_chain["eval"]
    assert report["step"] == 0 and math.isfinite(report["eval_loss"]) and report["eval_loss"] > 0
    assert tree_hash(solar_chain["src"]) == solar_chain["before"]  # input untouched


def test_solar_upscaled_run_continues_training_through_launch(solar_chain):
    new = solar_chain["new"]
    result = launch("--config", QUICKSTART, "--workdir", new, *TINY,
                    "--config.model.num_layers=6", "--config.train.steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "/checkpoints/0" in result.stdout
    assert os.path.isdir(os.path.join(new, "checkpoints", "3"))
    assert "held-out loss" in result.stdout
    with open(os.path.join(new, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if "loss" in r] + [r["eval/loss"] for r in rows
                                                         if "eval/loss" in r]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    assert rundir.read_run(new).step == 3


def test_bad_layer_map_through_launch_is_one_line_and_writes_nothing(solar_chain, tmp_path):
    target = tmp_path / "never"
    result = launch("--mode", "upscale", "--from_workdir", solar_chain["src"], "--workdir",
                    str(target), "--layer_map", "0,1,2,7")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: layer_map[3]=7: expected a source layer index in [0, 4)"], lines
    assert not target.exists() and no_partials(tmp_path)


# ---- --layer_map syntax -------------------------------------------------------------------------

def test_layer_map_syntax(tmp_path):
    parse = upscale_mode.parse_layer_map
    assert parse("solar:8", 32) == [(0, 24), (8, 32)]
    assert parse("solar", 32) == [(0, 24), (8, 32)]
    assert parse("yi", 32) == [(0, 28), (12, 32)]
    assert parse("yi:2:6", 8) == [(0, 6), (2, 8)]
    assert parse("0,1,1,2", 3) == [0, 1, 1, 2]
    assert parse("0:24, 8:32", 32) == [(0, 24), (8, 32)]
    yaml_file = tmp_path / "solar.yaml"
    yaml_file.write_text(
        "slices:\n  - sources:\n      - model: base\n        layer_range: [0, 24]\n"
        "  - sources:\n      - model: base\n        layer_range: [8, 32]\n"
        "merge_method: passthrough\ndtype: bfloat16\n")
    assert parse(str(yaml_file), 32) == [(0, 24), (8, 32)]
    for text, message in [("solar:40", "solar drop=40"), ("nope", "--layer_map='nope': expected"),
                          ("1:x", "--layer_map='1:x': expected"),
                          (str(tmp_path / "missing.yaml"), "no such mergekit YAML file")]:
        with pytest.raises(ValueError, match=message) as err:
            parse(text, 32)
        assert "\n" not in str(err.value)


# ---- up-scaling a hybrid MoE run in-process: model state follows the layers ------------------

def test_upscale_mode_gathers_params_and_router_state_of_a_hybrid(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, mlp_dim=16, router="sigmoid_bias")
    ssm = SSMConfig(num_heads=2, head_dim=16, state_dim=8, chunk_size=8)
    cfg, params, model_state = seeded_run(tmp_path / "src", 1, num_layers=4, layer_pattern="MA",
                                          ffn="moe", moe=moe, ssm=ssm)
    layer_map = "0,1,2,3,2,3"  # pattern MA: every new layer takes a source of its own kind
    upscale_mode.run(Ctx(tmp_path / "up", from_workdir=str(tmp_path / "src"),
                         layer_map=layer_map))
    new = rundir.read_run(str(tmp_path / "up"))
    assert new.cfg.model.num_layers == 6 and new.cfg.model.layer_pattern == "MA"
    for i, s in enumerate([0, 1, 2, 3, 2, 3]):
        assert leaves_equal(layer(new.params, 2, i), layer(params, 2, s))
        assert leaves_equal(layer(new.model_state["router_state"], 2, i),
                            layer(model_state["router_state"], 2, s))
    with pytest.raises(ValueError, match="new layer 1 <- source layer 0: new layer 1 is attention"):
        upscale_mode.run(Ctx(tmp_path / "bad", from_workdir=str(tmp_path / "src"),
                             layer_map="0,0"))
    assert not (tmp_path / "bad").exists() and no_partials(tmp_path)


# ---- merge ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    runs = {name: seeded_run(root / name, seed)[1] for seed, name in enumerate("abz")}
    return root, runs


def test_linear_merge_mode_matches_numpy_and_restores_with_a_fresh_optimizer(three_runs):
    root, runs = three_runs
    before = tree_hash(root / "a")
    target = root / "lin"
    merge_mode.run(Ctx(target, merge_inputs=[str(root / "a"), str(root / "b")],
                       merge_weights=["1", "3"]))
    merged = rundir.read_run(str(target))
    expected = jax.tree.map(lambda a, b: ((1 * a.astype(np.float64) + 3 * b) / 4)
                            .astype(np.float32), runs["a"], runs["b"])
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                         merged.params, expected))
    assert max(diffs) <= 1e-6
    # The loop resumes it at step 0 with zero AdamW moments and no data-iterator state.
    cfg = merged.cfg
    _, state = loop.restore_for_inference(cfg, str(target))
    assert int(state.step) == 0
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert moments and all(not np.any(np.asarray(m)) for m in moments)
    from jaxlm.train.checkpoint import Checkpointer
    checkpointer = Checkpointer(os.path.join(str(target), "checkpoints"), async_save=False)
    meta = checkpointer.restore_meta(0)
    checkpointer.close()
    assert meta["origin"]["method"] == "linear" and meta["origin"]["weights"] == [1.0, 3.0]
    assert tree_hash(root / "a") == before


def test_task_arithmetic_and_slerp_modes(three_runs):
    root, runs = three_runs
    target = root / "ta"
    merge_mode.run(Ctx(target, merge_method="task_arithmetic", merge_base=str(root / "z"),
                       merge_inputs=[str(root / "a"), str(root / "b")],
                       merge_weights=["0.5", "-0.25"]))
    got = rundir.read_run(str(target)).params
    want = jax.tree.map(lambda z, a, b: (z + 0.5 * (a - z.astype(np.float64)) - 0.25 * (b - z))
                        .astype(np.float32), runs["z"], runs["a"], runs["b"])
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                            got, want))) <= 1e-6
    merge_mode.run(Ctx(root / "s0", merge_method="slerp", slerp_t=0.0,
                       merge_inputs=[str(root / "a"), str(root / "b")]))
    start = rundir.read_run(str(root / "s0")).params
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                            start, runs["a"]))) <= 1e-6


def test_merge_refuses_different_configs_and_bad_flags(three_runs, tmp_path):
    root, _ = three_runs
    seeded_run(tmp_path / "wide", 7, mlp_dim=96)
    with pytest.raises(ValueError, match=r"model.mlp_dim differs: 64 \(checkpoint 0\) vs 96 "
                                         r"\(checkpoint 1\).*1: .*wide") as err:
        merge_mode.run(Ctx(tmp_path / "out", merge_inputs=[str(root / "a"),
                                                          str(tmp_path / "wide")]))
    assert "\n" not in str(err.value)
    cases = [(dict(merge_method="ties"), "--merge_method=ties: needs --merge_base"),
             (dict(merge_method="slerp", merge_inputs=[str(root / d) for d in "abz"]),
              "expected exactly 2"),
             (dict(merge_base=str(root / "z")), "--merge_base: not used by --merge_method=linear"),
             (dict(merge_weights=["1", "x"]), "--merge_weights=1,x: expected comma-separated")]
    for given, message in cases:
        given.setdefault("merge_inputs", [str(root / "a"), str(root / "b")])
        with pytest.raises(ValueError, match=message):
            merge_mode.run(Ctx(tmp_path / "out", **given))
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)
    with pytest.raises(rundir.RunDirError, match="already exists and is not empty"):
        merge_mode.run(Ctx(root / "a", merge_inputs=[str(root / "a"), str(root / "b")]))


def test_ties_mode_passes_its_flags(three_runs):
    root, runs = three_runs
    merge_mode.run(Ctx(root / "ties", merge_method="ties", merge_base=str(root / "z"),
                       merge_inputs=[str(root / "a"), str(root / "b")], merge_weights=["1", "2"],
                       ties_density=0.4, ties_scale=0.8))
    got = rundir.read_run(str(root / "ties")).params
    want = ties(runs["z"], [runs["a"], runs["b"]], density=0.4, weights=[1.0, 2.0], scale=0.8)
    assert leaves_equal(got, want)
    other = ties(runs["z"], [runs["a"], runs["b"]], density=0.5, weights=[1.0, 2.0], scale=0.8)
    assert not leaves_equal(got, other)  # the density flag reached the merge


def test_merge_mode_averages_the_moe_selection_bias(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, mlp_dim=16, router="sigmoid_bias")
    runs = [seeded_run(tmp_path / name, seed, ffn="moe", moe=moe) for seed, name in
            enumerate("cd")]
    merge_mode.run(Ctx(tmp_path / "slerp", merge_method="slerp", slerp_t=0.25,
                       merge_inputs=[str(tmp_path / "c"), str(tmp_path / "d")]))
    merged = rundir.read_run(str(tmp_path / "slerp"))
    (_, _, state_c), (_, _, state_d) = runs
    want = jax.tree.map(lambda a, b: (a + b) / 2, state_c, state_d)
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                            merged.model_state, want))) <= 1e-6
    assert jax.tree.leaves(merged.model_state)  # there was a selection bias to merge


# ---- convert ----------------------------------------------------------------------------------

def test_convert_hf_to_run_to_hf_keeps_transformers_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab["<|endoftext|>"] = 26
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    before = tree_hash(hf_dir)

    convert.run(Ctx(tmp_path / "run", hf_dir=str(hf_dir)))
    run = rundir.read_run(str(tmp_path / "run"))
    assert run.step == 0 and run.cfg.model.family == "llama" and run.cfg.model.num_layers == 2
    assert run.cfg.data.tokenizer == "file"
    assert run.cfg.data.tokenizer_path == str(tmp_path / "run" / "tokenizer.json")
    assert run.cfg.train == TrainConfig()  # no --config: the defaults

    convert.run(Ctx(tmp_path / "run", hf_out=str(tmp_path / "back")))
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 300, (2, 10)))
    with torch.no_grad():
        diff = float((back(ids).logits - model(ids).logits).abs().max())
    assert diff <= 1e-5
    assert tree_hash(hf_dir) == before
    with pytest.raises(ValueError, match="already exists and is not empty"):
        convert.run(Ctx(tmp_path / "run", hf_out=str(tmp_path / "back")))
    with pytest.raises(SystemExit, match="exactly one of --hf_dir"):
        convert.run(Ctx(tmp_path / "x", hf_dir=str(hf_dir), hf_out=str(tmp_path / "y")))
    # --config supplies every section but the model (here: a shorter run).
    experiment = tiny_experiment()
    experiment.train.steps = 4
    convert.run(Ctx(tmp_path / "run2", config=experiment, hf_dir=str(hf_dir)))
    run2 = rundir.read_run(str(tmp_path / "run2"))
    assert run2.cfg.train.steps == 4 and run2.cfg.data.tokenizer == "byte"
    assert leaves_equal(run2.params, run.params)


def test_convert_caps_the_default_seq_len_and_bad_input_writes_nothing(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=8)
    hf_dir = tmp_path / "hf"
    transformers.MistralForCausalLM(config).save_pretrained(hf_dir)
    # no --config: the default data.seq_len (256) is capped at the window-capped max_seq_len
    convert.run(Ctx(tmp_path / "run", hf_dir=str(hf_dir)))
    run = rundir.read_run(str(tmp_path / "run"))
    assert (run.cfg.model.max_seq_len, run.cfg.data.seq_len) == (8, 8)
    assert "note: jaxlm has no sliding-window attention; model.max_seq_len=8" in \
        capsys.readouterr().out
    # a --config's own seq_len is checked as given
    with pytest.raises(ValueError, match=r"data.seq_len=32: expected <= model.max_seq_len=8"):
        convert.run(Ctx(tmp_path / "run2", config=tiny_experiment(), hf_dir=str(hf_dir)))

    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'") \
            as err:
        convert.run(Ctx(tmp_path / "run3", hf_dir=str(hf_dir)))
    assert "\n" not in str(err.value)

    seeded_run(tmp_path / "qknorm", 4, qk_norm=True)  # a run LlamaForCausalLM cannot express
    with pytest.raises(ValueError, match="model.qk_norm=True: LlamaForCausalLM can only") as err:
        convert.run(Ctx(tmp_path / "qknorm", hf_out=str(tmp_path / "hf_out")))
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["hf", "qknorm", "run"]  # nothing else, no partials


# ---- write_run / read_run: checks and atomicity -----------------------------------------------

def test_write_run_checks_params_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    cfg = parse_config(tiny_experiment())
    shapes, _ = rundir.abstract_variables(cfg.model)
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    bad = jax.tree.map(lambda x: x, params)
    del bad["final_norm"]
    with pytest.raises(rundir.RunDirError, match="params: missing final_norm/scale"):
        rundir.write_run(str(tmp_path / "w"), cfg, bad)
    bad = jax.tree.map(lambda x: x, params)
    bad["embed"]["embedding"] = np.zeros((3, 3), np.float32)
    with pytest.raises(rundir.RunDirError, match=r"embed/embedding has shape \[3, 3\], expected"):
        rundir.write_run(str(tmp_path / "w"), cfg, bad)
    bad = jax.tree.map(lambda x: x, params)
    bad["extra"] = {"kernel": np.zeros(2, np.float32)}
    with pytest.raises(rundir.RunDirError, match="params: unexpected extra/kernel"):
        rundir.write_run(str(tmp_path / "w"), cfg, bad)

    from jaxlm.train import checkpoint

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        rundir.write_run(str(tmp_path / "w"), cfg, params)
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match="kept: already exists and is not empty"):
        rundir.write_run(str(tmp_path / "kept"), cfg, params)
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]


def test_read_run_errors_name_the_directory(tmp_path):
    with pytest.raises(rundir.RunDirError, match="no config.json; expected a run directory"):
        rundir.read_run(str(tmp_path))
    cfg = parse_config(tiny_experiment())
    (tmp_path / "config.json").write_text(json.dumps(loop.config_to_dict(cfg)))
    with pytest.raises(rundir.RunDirError, match="no checkpoints/ directory"):
        rundir.read_run(str(tmp_path))
    # a config.json edited after the fact no longer describes the checkpoint's parameters
    seeded_run(tmp_path / "run", 3)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for edit, message in [({"mlp_dim": 96}, r"checkpoints/0 params: blocks/slot_0/mlp/down_proj/"
                                             r"kernel has shape \[2, 64, 32\], expected "
                                             r"\[2, 96, 32\]"),
                          ({"qkv_bias": True}, r"checkpoints/0 params: missing blocks/slot_0/attention/"
                                              r"k_proj/bias \(expected by the model config\)"),
                          ({"tie_embeddings": True}, r"checkpoints/0 params: unexpected "
                                                     r"lm_head/kernel for this model config")]:
        (tmp_path / "run" / "config.json").write_text(
            json.dumps({**saved, "model": {**saved["model"], **edit}}))
        with pytest.raises(rundir.RunDirError, match=message) as err:
            rundir.read_run(str(tmp_path / "run"))
        assert "\n" not in str(err.value)
