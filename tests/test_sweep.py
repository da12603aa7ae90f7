"""experiments/sweep.py as a user runs it: a 2×2 grid × 2 seeds of a shrunken quickstart,
re-runs that touch nothing, bad overrides, SLURM emission, and the list / get_sweep forms."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.schema import ConfigError
from jaxlm.sweeps import runner, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")
QUICKSTART = os.path.join(ROOT, "experiments", "configs", "quickstart.py")
STEPS = 20
TINY = ["model.num_layers=2", "model.embed_dim=32", "model.num_heads=2",
        "model.num_kv_heads=1", "model.mlp_dim=64", "data.seq_len=32", "data.batch_size=4",
        "train.warmup_steps=2", "train.eval_every=10", "train.eval_batches=1",
        "train.log_every=5", "train.checkpoint_every=20", "train.progress_bar=False"]
GRID = ["--grid", "model.rope.fraction=0.5,1.0", "--grid", "train.learning_rate=1e-3,3e-3"]


def sweep(*args):
    # Runs on one CPU device each; compiles with LLVM optimisations off (20-step runs are all
    # compile time).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return subprocess.run([sys.executable, SWEEP, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)


def sweep_in_process(capsys, *args):
    """experiments/sweep.py's cli() in this process (no launches: validation, errors,
    --emit); returns (status, stdout, stderr)."""
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("sweep_cli", SWEEP)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.cli(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sweep_args(out, *extra):
    sets = [a for kv in TINY for a in ("--set", kv)]
    return ["--config", QUICKSTART, *GRID, "--seeds", "0,1", "--steps", str(STEPS),
            "--out", out, *sets, *extra]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    result = sweep(*sweep_args(out, "--parallel", "2"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result


def read_rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def final_eval(workdir):
    """The run's last held-out loss, straight from its metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "eval/loss" in r][-1]


def test_grid_times_seeds_gives_one_finished_row_per_run(swept):
    out, result = swept
    rows = read_rows(out)
    assert len(rows) == 8
    settings = {r["setting"] for r in rows}
    assert settings == {f"fraction={f}__learning_rate={lr}" for f in ("0.5", "1.0")
                        for lr in ("1e-3", "3e-3")}
    assert sorted((r["setting"], r["seed"]) for r in rows) == sorted(
        (s, k) for s in settings for k in ("0", "1"))
    for row in rows:
        assert row["status"] == "finished" and int(row["steps"]) == STEPS
        assert int(row["tokens"]) == STEPS * 4 * 32
        assert row["workdir"] == os.path.join(out, row["setting"], f"seed{row['seed']}")
        record = final_eval(row["workdir"])
        assert record["step"] == STEPS
        assert float(row["eval_loss"]) == pytest.approx(record["eval/loss"], rel=1e-12)
        assert 0 < float(row["wall_time_s"]) < 900
        with open(os.path.join(row["workdir"], "config.json")) as f:
            saved = json.load(f)
        assert saved["train"]["seed"] == int(row["seed"]) == saved["data"]["seed"]
        assert saved["train"]["learning_rate"] == float(row["train.learning_rate"])
        assert saved["model"]["rope"]["fraction"] == float(row["model.rope.fraction"])
    # the two learning rates train differently; the two seeds of a setting differ
    by = {(r["setting"], r["seed"]): float(r["train_loss"]) for r in rows}
    assert by[("fraction=1.0__learning_rate=1e-3", "0")] != by[
        ("fraction=1.0__learning_rate=3e-3", "0")]
    assert by[("fraction=1.0__learning_rate=1e-3", "0")] != by[
        ("fraction=1.0__learning_rate=1e-3", "1")]


def test_markdown_has_mean_and_std_over_seeds_and_plots_exist(swept):
    out, _ = swept
    rows = read_rows(out)
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    for setting in {r["setting"] for r in rows}:
        losses = np.array([float(r["eval_loss"]) for r in rows if r["setting"] == setting])
        line = next(l for l in text.splitlines() if l.startswith(f"| `{setting}`"))
        assert f"{losses.mean():.4f} ± {losses.std(ddof=1):.4f}" in line
        assert "| 2/2 |" in line
    for name in ("loss_curves.png", "final_metrics.png"):
        with open(os.path.join(out, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(out, name)) > 5000


def _mtimes(out):
    stamps = {}
    for root, _, files in os.walk(out):
        if os.sep + "seed" in root:
            for name in files:
                path = os.path.join(root, name)
                stamps[path] = os.stat(path).st_mtime_ns
    return stamps


def test_rerun_launches_nothing_and_touches_no_run(swept):
    out, _ = swept
    before = _mtimes(out)
    assert len(before) > 8 * 3
    result = sweep(*sweep_args(out, "--parallel", "2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 runs, 8 already finished, 0 to run" in result.stdout
    assert _mtimes(out) == before
    assert len(read_rows(out)) == 8


def test_run_list_task_skips_a_finished_run(swept, tmp_path):
    out, _ = swept
    config, runs = QUICKSTART, spec.make_runs(
        [("fraction=0.5__learning_rate=1e-3", (("model.rope.fraction", "0.5"),
                                               ("train.learning_rate", "1e-3")))],
        [1], out, common=tuple(spec.parse_assignment(kv, "--set") for kv in TINY), steps=STEPS)
    run_list = str(tmp_path / "runs.json")
    runner.write_json(run_list, {"config": config, "runs": [r.to_json() for r in runs]})
    before = _mtimes(out)
    result = sweep("--run_list", run_list, "--index", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already finished" in result.stdout and _mtimes(out) == before


@pytest.mark.parametrize("args, message", [
    (["--grid", "model.num_headz=2,4"],
     "error: unknown config field 'model.num_headz'; did you mean 'model.num_heads'?"),
    (["--set", "train.learning_rat=1e-3"],
     "error: unknown config field 'train.learning_rat'; did you mean 'train.learning_rate'?"),
    (["--grid", "model.rope.fraction=0.5,0.01"],
     "error: model.rope.fraction=0.01: rotary dims int(head_dim·fraction)=0 must be even"),
    (["--grid", "train.steps=40,abc"], "error: flag --config.train.steps=abc"),
    (["--seeds", "0,x"], "error: --seeds='0,x': expected distinct non-negative ints"),
])
def test_bad_override_fails_in_one_line_before_running_anything(tmp_path, capsys, args,
                                                                message):
    out = str(tmp_path / "never")
    code, _, err = sweep_in_process(capsys, "--config", QUICKSTART, "--out", out, "--set",
                                    "model.num_layers=2", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not os.path.exists(out)


def test_emit_slurm_writes_an_array_script_and_runs_nothing(tmp_path, capsys):
    out = str(tmp_path / "slurm")
    code, _, err = sweep_in_process(capsys, *sweep_args(
        out, "--emit", "slurm", "--parallel", "3", "--sbatch=--time=00:30:00",
        "--sbatch=--cpus-per-task=4"))
    assert code == 0, err
    with open(os.path.join(out, "sweep.sbatch")) as f:
        script = f.read()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --array=0-7%3" in lines
    assert "#SBATCH --time=00:30:00" in lines and "#SBATCH --cpus-per-task=4" in lines
    assert f"#SBATCH --output={out}/logs/slurm_%A_%a.log" in lines
    assert lines[-1].endswith(f"{SWEEP} --run_list {out}/runs.json --index "
                              "\"$SLURM_ARRAY_TASK_ID\"")
    with open(os.path.join(out, "runs.json")) as f:
        listed = json.load(f)
    assert listed["config"] == QUICKSTART and len(listed["runs"]) == 8
    first = listed["runs"][0]
    assert first["setting"] == "fraction=0.5__learning_rate=1e-3" and first["seed"] == 0
    assert ["train.steps", str(STEPS)] in first["overrides"]
    assert ["train.seed", "0"] in first["overrides"] and ["data.seed", "0"] in first["overrides"]
    assert sorted(os.listdir(out)) == ["logs", "runs.json", "sweep.sbatch"]


def test_list_form_and_get_sweep_in_a_config_file(tmp_path, capsys):
    definition = {"runs": [{"name": "small", "overrides": {"model.embed_dim": 32}},
                           {"model.embed_dim": 64, "data.sources": ["stdlib"]}],
                  "set": {"model.num_layers": 2}, "seeds": [3, 4]}
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(definition))
    parsed = spec.read_sweep_file(str(sweep_file))
    assert parsed["settings"] == [("small", (("model.embed_dim", "32"),)),
                                  ("embed_dim=64__sources=stdlib",
                                   (("model.embed_dim", "64"), ("data.sources", "('stdlib',)")))]
    assert parsed["common"] == (("model.num_layers", "2"),) and parsed["seeds"] == [3, 4]
    config = tmp_path / "cfg.py"
    config.write_text(
        f"import importlib.util\n"
        f"_s = importlib.util.spec_from_file_location('qs', {QUICKSTART!r})\n"
        f"_m = importlib.util.module_from_spec(_s); _s.loader.exec_module(_m)\n"
        f"get_config = _m.get_config\n"
        f"def get_sweep(variant=None):\n"
        f"    return {{'grid': {{'train.learning_rate': [1e-3, 2e-3, 3e-3]}}, 'seeds': [0, 1],"
        f" 'set': {{'train.steps': 7 if variant == 'short' else 9, 'train.warmup_steps': 2}}}}\n")
    out = str(tmp_path / "from_config")
    code, _, err = sweep_in_process(capsys, "--config", f"{config}:short", "--out", out,
                                    "--emit", "slurm")
    assert code == 0, err
    with open(os.path.join(out, "runs.json")) as f:
        runs = [spec.Run.from_json(r) for r in json.load(f)["runs"]]
    assert [(r.setting, r.seed) for r in runs] == [
        (f"learning_rate={lr}", k) for lr in ("0.001", "0.002", "0.003") for k in (0, 1)]
    assert all(dict(r.overrides)["train.steps"] == "7" for r in runs)


def test_grid_parsing_and_finished_detection(tmp_path):
    assert spec.split_values("('a','b'),('c',)") == ["('a','b')", "('c',)"]
    assert spec.split_values("1e-3, 3e-3") == ["1e-3", "3e-3"]
    grid = spec.parse_grid(["a.x=1,2", "b.x=p,q,r"])
    settings = spec.grid_settings(grid)
    assert len(settings) == 6 and settings[0] == ("a.x=1__b.x=p", (("a.x", "1"), ("b.x", "p")))
    with pytest.raises(ConfigError, match="given twice"):
        spec.parse_grid(["a=1", "a=2"])
    run = spec.make_runs([("s", ())], [0], str(tmp_path))[0]
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 10, "loss": 3.0}) + "\n")
        f.write(json.dumps({"step": 10, "eval/loss": 3.1}) + "\n")
    assert runner.is_finished(run, 10) and not runner.is_finished(run, 20)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 20, "eval/lo')  # a torn line from a killed run
    assert not runner.is_finished(run, 20)


def test_residual_stream_reproduces_the_decoders_logits_and_cosines():
    """The per-layer stream of jaxlm.sweeps.analysis, finished with the final norm and head,
    equals Decoder.apply; the cosines match a float64 NumPy evaluation of that stream."""
    import flax.linen as nn
    import jax
    from jaxlm.models.config import ModelConfig
    from jaxlm.models.decoder import Decoder
    from jaxlm.sweeps import analysis
    cfg = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, layer_pattern="AA",
                      num_heads=2, mlp_dim=32)
    model = Decoder(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    logits, _ = model.apply({"params": params}, tokens)
    hs = analysis.residual_stream(cfg, params, tokens)
    assert hs.shape == (5, 2, 8, 16)
    last = hs[-1].astype(np.float64)
    scale = np.asarray(params["final_norm"]["scale"], np.float64)
    normed = last / np.sqrt((last ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * scale
    ref = normed @ np.asarray(params["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-5)
    cos = analysis.layer_io_cosine(cfg, params, tokens)
    x, y = hs[2].astype(np.float64).reshape(-1, 16), hs[3].astype(np.float64).reshape(-1, 16)
    want = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, y)])
    assert cos.shape == (4,) and abs(cos[2] - want) < 1e-9


def test_a_finished_run_with_another_config_is_an_error_not_a_result(tmp_path, capsys):
    """Skipping a finished run whose config differs would report its numbers under the wrong
    setting; the sweep refuses before running anything and leaves the run alone."""
    out = str(tmp_path / "sweep")
    args = ["--config", QUICKSTART, "--grid", "train.learning_rate=1e-3", "--seeds", "0",
            "--steps", "5", "--out", out, "--set", "train.warmup_steps=1"]
    run = spec.make_runs([("learning_rate=1e-3", ())], [0], out)[0]
    other = spec.validate_overrides(QUICKSTART, (("train.learning_rate", "2e-3"),
                                                 ("train.warmup_steps", "1"),
                                                 ("train.seed", "0"), ("data.seed", "0"),
                                                 ("train.steps", "5")))
    os.makedirs(run.workdir)
    runner.write_json(os.path.join(run.workdir, "config.json"), runner.config_dict(other))
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "eval/loss": 3.0}) + "\n")
    before = _mtimes(out)
    code, _, err = sweep_in_process(capsys, *args)
    assert code == 2 and err.startswith(f"error: {run.workdir} holds a finished run whose "
                                        "train.learning_rate differs"), err
    assert _mtimes(out) == before and sorted(os.listdir(out)) == ["learning_rate=1e-3"]
    # the same config (progress bar and logging aside) is accepted and skipped
    same = spec.validate_overrides(QUICKSTART, (("train.learning_rate", "1e-3"),
                                                ("train.warmup_steps", "1"), ("train.seed", "0"),
                                                ("data.seed", "0"), ("train.steps", "5"),
                                                ("train.log_every", "3")))
    runner.write_json(os.path.join(run.workdir, "config.json"), runner.config_dict(same))
    code, stdout, err = sweep_in_process(capsys, *args)
    assert code == 0 and "1 runs, 1 already finished, 0 to run" in stdout, err
