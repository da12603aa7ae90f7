"""experiments/launch.py as a user runs it: overrides, variants, modes, and bad input."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "launch.py")
QUICKSTART = os.path.join(ROOT, "experiments", "configs", "quickstart.py")
TINY = ["--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.mlp_dim=64",
        "--config.data.seq_len=16", "--config.data.batch_size=2", "--config.train.steps=2",
        "--config.train.warmup_steps=1", "--config.train.eval_batches=1",
        "--config.train.progress_bar=False", "--config.generate.max_new_tokens=3"]


def launch(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    result = launch("--config", QUICKSTART, "--workdir", workdir, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir, result


def test_overrides_reach_the_run_and_it_trains_checkpoints_and_samples(trained):
    workdir, result = trained
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["train"]["steps"] == 2 and saved["model"]["num_layers"] == 2
    assert saved["model"]["embed_dim"] == 32 and saved["data"]["seq_len"] == 16
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert "unigram baseline" in result.stdout and "--- sample ---" in result.stdout
    assert "def fibonacci(n):" in result.stdout


def test_eval_and_generate_modes_read_the_workdir(trained):
    workdir, _ = trained
    result = launch("--mode", "eval", "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 2 and report["eval_loss"] > 0 and report["unigram_loss"] > 0
    result = launch("--mode", "generate", "--workdir", workdir, "--prompt", "import os")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "import os" in result.stdout


BAD_INPUTS = [
    (["--config.model.num_headz=3"], "unknown config field 'model.num_headz'; did you mean "
                                     "'model.num_heads'?"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.data.sources=('text:/nonexistent/*.txt',)"], "no files match '/nonexistent/*.txt'"),
    (["--config.model.vocab_size=100"], "model.vocab_size=100: expected >= the tokenizer's "
                                        "vocabulary of 261"),
    (["--config.model.layer_pattern=AQ"], "unknown letter 'Q'"),
    (["--config.train.grad_accum_steps=3"], "train.grad_accum_steps=3: expected a divisor of "
                                            "data.batch_size=16"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_is_one_line_naming_it_and_leaves_no_workdir(tmp_path, args, message):
    workdir = tmp_path / "never"
    result = launch("--config", QUICKSTART, "--workdir", str(workdir), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not workdir.exists()


def test_config_variant_is_passed_to_get_config(tmp_path):
    result = launch("--config", os.path.join(ROOT, "experiments/configs/llama.py:huge"),
                    "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "unknown llama size 'huge'" in result.stderr


def test_workdir_of_another_experiment_is_refused(trained, tmp_path):
    workdir, _ = trained
    before = sorted(os.listdir(workdir))
    result = launch("--config", QUICKSTART, "--workdir", workdir, *TINY,
                    "--config.model.mlp_dim=96")
    assert result.returncode == 2 and "different model config (differs in model.mlp_dim)" \
        in result.stderr
    assert sorted(os.listdir(workdir)) == before


def test_train_tokenizer_mode_writes_a_tokenizer_with_the_specials(tmp_path):
    out = tmp_path / "tok.json"
    result = launch("--mode", "train_tokenizer", "--config",
                    os.path.join(ROOT, "experiments/configs/stablecode_fim.py"),
                    f"--config.data.tokenizer_path={out}", "--config.data.bpe_vocab_size=300")
    assert result.returncode == 0, result.stderr[-2000:]
    vocab = json.loads(out.read_text())["model"]["vocab"]
    assert len(vocab) <= 300
    added = {t["content"] for t in json.loads(out.read_text())["added_tokens"]}
    assert {"<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"} <= added
