"""Fault injection on real `experiments/launch.py` processes (issue 10): SIGKILL at random
steps, SIGTERM, corrupted checkpoints, an injected NaN batch, and a table of bad inputs.

Every run is the same tiny experiment (D=32, 2 layers, seq 16, batch 2, 60 steps, a checkpoint
every 4 steps), so one uninterrupted run is the reference for all of them. The subprocesses
inherit this process's XLA_FLAGS (8 host devices; the config asks for a 1-device mesh), so the
in-process reference of the NaN test compiles the same program as the runs it is compared to.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm.config import parse_config
from jaxlm.data import pipeline
from jaxlm.parallel import distributed, sharding
from jaxlm.train import batchlog, loop, state as state_lib, step as step_lib
from jaxlm.train.checkpoint import restore_step
from jaxlm.train.workdir import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "launch.py")
QUICKSTART = os.path.join(ROOT, "experiments", "configs", "quickstart.py")
STEPS = 60
TINY = ["--config", QUICKSTART, "--config.model.num_layers=2", "--config.model.embed_dim=32",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.mlp_dim=64", "--config.data.seq_len=16", "--config.data.batch_size=2",
        f"--config.train.steps={STEPS}", "--config.train.warmup_steps=5",
        "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", "--config.train.checkpoint_every=4",
        "--config.train.keep_checkpoints=3", "--config.train.progress_bar=False",
        "--config.parallel.data=1", "--nosample", "--log_batch_hashes"]
TIMEOUT = 900  # seconds per launch: generous, other engineers load the same 2 cores


# Launches share a persistent compilation cache (a launch costs ~6 s of CPU instead of ~15);
# the reference run fills it. Launches with fresh_compile=True compile for themselves.
COMPILE_CACHE = {}


def _env(extra=None, fresh_compile=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAXLM_POISON_STEPS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if COMPILE_CACHE and not fresh_compile:
        env.update(JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE["dir"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra or {})
    return env


def start(workdir, *args, env=None, base=TINY, fresh_compile=False):
    """A launch in the background; its stdout/stderr go to files beside the workdir."""
    logs = f"{workdir}.{time.monotonic_ns()}"
    out, err = open(logs + ".out", "w"), open(logs + ".err", "w")
    proc = subprocess.Popen([sys.executable, LAUNCH, *base, "--workdir", str(workdir), *args],
                            stdout=out, stderr=err, env=_env(env, fresh_compile), cwd=ROOT)
    proc.logs = (out, err)
    return proc


def finish(proc, timeout=TIMEOUT):
    """(returncode, stdout, stderr) of a started launch."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    texts = []
    for f in proc.logs:
        f.close()
        with open(f.name, encoding="utf-8") as g:
            texts.append(g.read())
    return proc.returncode, texts[0], texts[1]


def launch(workdir, *args, env=None, base=TINY):
    return finish(start(workdir, *args, env=env, base=base))


def wait_for_step(workdir, step, proc):
    """Blocks until the run has drawn the batch of `step` (0-based) in this launch."""
    path = batchlog.log_path(str(workdir))
    offset = os.path.getsize(path) if os.path.exists(path) else 0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}: "
                                 + open(proc.logs[1].name).read()[-2000:])
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                for line in f.read().splitlines():
                    if line.strip() and json.loads(line)["step"] >= step:
                        return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {TIMEOUT} s")


def losses(workdir) -> dict[int, float]:
    """step -> training loss as logged (the last record of each step, after resumes)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record and not record.get("nonfinite"):
                out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 60-step run: workdir, its config, and a restore target."""
    COMPILE_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_compile_cache"))
    workdir = str(tmp_path_factory.mktemp("faults") / "reference")
    code, out, err = launch(workdir)
    assert code == 0, err[-3000:]
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        cfg = parse_config(json.load(f))
    run = loop.build_run(cfg)
    return {"workdir": workdir, "cfg": cfg, "run": run, "abstract": run.abstract_state()}


def params_at(reference, workdir, step=STEPS):
    state, _, meta = restore_step(os.path.join(workdir, "checkpoints", str(step)),
                                  reference["abstract"])
    assert int(state.step) == step and meta["step"] == step
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# ---- 1. SIGKILL at three random steps ---------------------------------------------------------

def test_sigkill_at_random_steps_then_relaunch_equals_the_uninterrupted_run(reference, tmp_path):
    rng = np.random.default_rng(int(os.environ.get("JAXLM_FAULT_SEED", "10")))
    kill_steps = sorted(rng.choice(np.arange(3, STEPS - 3), size=3, replace=False).tolist())
    workdir = str(tmp_path / "killed")
    for k in kill_steps:
        proc = start(workdir)
        wait_for_step(workdir, k, proc)
        time.sleep(float(rng.uniform(0, 0.15)))  # anywhere in the step or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, err[-2000:]
    code, out, err = launch(workdir)
    assert code == 0, err[-3000:]
    assert "taking over the stale lock" in err and "resumed from" in out
    assert not os.path.exists(os.path.join(workdir, "train.lock"))

    # The data order: for every step, the batch the final state saw is the reference's.
    seen, expected = batchlog.read(batchlog.log_path(workdir)), batchlog.read(
        batchlog.log_path(reference["workdir"]))
    assert list(seen) == list(range(STEPS)) and seen == expected
    # Steps before a kill that were redone after it drew the same batch both times.
    with open(batchlog.log_path(workdir), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) > STEPS
    assert all(r["batch"] == expected[r["step"]] for r in records)
    assert losses(workdir) == losses(reference["workdir"])
    assert_bitwise_equal(params_at(reference, workdir), params_at(reference, reference["workdir"]))


# ---- 2. SIGTERM: checkpoint at the current step, exit 0, resume; determinism -----------------

def test_sigterm_saves_the_current_step_exits_zero_and_resumes_bitwise(reference, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = start(workdir, fresh_compile=True)  # an independent compile, for the determinism
    wait_for_step(workdir, 25, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=60)
    elapsed = time.monotonic() - sent
    assert code == 0 and elapsed < 30, (elapsed, err[-2000:])
    stopped = int(out.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert 26 <= stopped < STEPS
    newest = max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                 if name.isdigit())
    assert newest == stopped  # not the last multiple of checkpoint_every: the current step
    assert params_at(reference, workdir, stopped)  # restores, at that step
    assert not os.path.exists(os.path.join(workdir, "train.lock"))

    code, out, err = launch(workdir)
    assert code == 0, err[-3000:]
    assert f"resumed from {workdir}/checkpoints/{stopped}" in out
    # Determinism: a fresh process (its own compile) with the same config and seed logs bitwise
    # the same losses (steps 1..stopped), and the resumed one continues them exactly.
    assert losses(workdir) == losses(reference["workdir"]) and len(losses(workdir)) == STEPS
    assert batchlog.read(batchlog.log_path(workdir)) == batchlog.read(
        batchlog.log_path(reference["workdir"]))
    assert_bitwise_equal(params_at(reference, workdir), params_at(reference, reference["workdir"]))


# ---- 3. corrupt checkpoints -----------------------------------------------------------------

def _truncate_largest_file(directory):
    files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, "r+b") as f:
        f.truncate(size // 2)
    return os.path.relpath(largest, directory), size // 2


def test_corrupt_newest_checkpoints_fall_back_with_a_warning_and_are_kept(reference, tmp_path):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(reference["workdir"], workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    assert sorted(int(n) for n in os.listdir(ckpts)) == [52, 56, 60]
    truncated, size = _truncate_largest_file(os.path.join(ckpts, "60", "state"))
    shutil.rmtree(os.path.join(ckpts, "56", "data"))  # a whole item missing

    # Read-only modes skip them with a warning and leave them where they are.
    code, out, err = launch(workdir, "--mode", "eval", base=[])
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["step"] == 52
    assert f"warning: skipped checkpoint {ckpts}/60 (item 'state':" in err
    assert f"warning: skipped checkpoint {ckpts}/56 (item 'data' is missing" in err
    assert sorted(int(n) for n in os.listdir(ckpts)) == [52, 56, 60]

    # Training resumes from 52; the bad ones are moved aside (never deleted) so that the
    # checkpoint manager can write 56 and 60 again.
    code, out, err = launch(workdir)
    assert code == 0, err[-3000:]
    assert f"resumed from {ckpts}/52" in out
    bad = os.path.join(workdir, "bad_checkpoints")
    for step, reason in ((60, "item 'state':"), (56, "item 'data' is missing")):
        assert (f"warning: skipped checkpoint {ckpts}/{step} ({reason}" in err
                and f"moved it to {bad}/{step}" in err), err
    assert os.path.getsize(os.path.join(bad, "60", "state", truncated)) == size
    assert not os.path.exists(os.path.join(bad, "56", "data"))
    assert os.path.isdir(os.path.join(bad, "56", "state"))
    assert sorted(int(n) for n in os.listdir(ckpts)) == [52, 56, 60]
    assert_bitwise_equal(params_at(reference, workdir), params_at(reference, reference["workdir"]))


# ---- 4. an injected NaN batch ---------------------------------------------------------------

POISONED = 17  # 0-based index of the step whose batch gets a NaN loss mask


def _train_without_batch(reference, skip: int):
    """Params after training on the data stream with batch `skip` removed: a plain loop over
    the pipeline with the jitted step, no guard, no training loop."""
    cfg, run = reference["cfg"], reference["run"]
    data = iter(pipeline.train_dataset(cfg.data, run.tokenizer, process_index=0,
                                       process_count=1))
    state = state_lib.create_state(run.model, run.tx, jax.random.key(cfg.train.seed),
                                   cfg.data.seq_len, run.state_shardings)
    with sharding.activation_sharding(run.mesh, run.rules):
        step = step_lib.jit_train_step(
            step_lib.make_train_step(run.model, run.tx, run.schedule, seed=cfg.train.seed,
                                     guard=False),
            run.state_shardings, run.batch_sharding, sharding.replicated(run.mesh))
        for i in range(STEPS):
            batch = next(data)
            if i != skip:
                state, _ = step(state, distributed.global_batch(batch, run.batch_sharding))
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_nan_batch_is_skipped_counted_and_equals_training_without_it(reference, tmp_path):
    workdir = str(tmp_path / "nan")
    code, out, err = launch(workdir, env={"JAXLM_POISON_STEPS": str(POISONED)})
    assert code == 0, err[-3000:]
    done = POISONED + 1
    assert (f"warning: step {done}: loss nan, gradient norm nan: update skipped (1 skipped so "
            "far, 1 in a row)") in err
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    flagged = [r["step"] for r in records if r.get("nonfinite")]
    assert flagged == [done]
    assert [r["skipped_steps"] for r in records if r["step"] == STEPS and "loss" in r] == [1]
    ref_losses, nan_losses = losses(reference["workdir"]), losses(workdir)
    assert [nan_losses[s] for s in range(1, done)] == [ref_losses[s] for s in range(1, done)]
    assert done not in nan_losses and nan_losses[done + 1] != ref_losses[done + 1]
    assert_bitwise_equal(params_at(reference, workdir), _train_without_batch(reference, POISONED))


def test_a_streak_of_nan_steps_stops_the_run_with_the_last_good_checkpoint_intact(reference,
                                                                                tmp_path):
    workdir = str(tmp_path / "diverged")
    code, out, err = launch(workdir, "--config.train.steps=30",
                            env={"JAXLM_POISON_STEPS": "9-18"})
    assert code == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 10 consecutive steps with a non-finite loss or gradient norm "
                           "(steps 10-19; train.max_nonfinite_steps=10): stopped; the newest "
                           f"checkpoint, {workdir}/checkpoints/8, is from before them"), last
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps[-1] == 8
    state, _, meta = restore_step(os.path.join(workdir, "checkpoints", "8"),
                                  reference["abstract"])
    assert int(state.step) == 8 and meta["skipped_steps"] == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# ---- 5. bad input: one line, non-zero exit, the workdir as it was ----------------------------

def _corrupt_all_checkpoints(workdir):
    for name in os.listdir(os.path.join(workdir, "checkpoints")):
        _truncate_largest_file(os.path.join(workdir, "checkpoints", name, "state"))


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# (name, launch arguments, expected part of the error line, workdir kind, options). Ranges,
# choices and types of every single field are covered in-process by test_config_validation.py.
# workdir kinds: "run" a copy of the reference run, "new" a path that does not exist.
# options: base (arguments before the row's; default TINY), env, prepare(workdir, data_dir).
BAD_INPUTS = [
    # config
    ("unknown-field", ["--config.model.num_headz=3"],
     "unknown config field 'model.num_headz'; did you mean 'model.num_heads'?", "run", {}),
    ("unknown-section", ["--config.trian.steps=5"],
     "unknown config field 'trian'; did you mean 'train'?", "run", {}),
    ("wrong-type", ["--config.train.steps=abc"], "--config.train.steps=abc", "run", {}),
    ("not-a-choice", ["--config.train.schedule=cosin"],
     "train.schedule='cosin': expected one of ['cosine', 'linear', 'constant']", "run", {}),
    ("infinite", ["--config.train.learning_rate=inf"],
     "train.learning_rate=inf: expected a finite number", "run", {}),
    ("warmup>steps", ["--config.train.warmup_steps=100"],
     "train.warmup_steps=100: expected <= train.steps=60", "run", {}),
    ("accum-divisor", ["--config.train.grad_accum_steps=3"],
     "train.grad_accum_steps=3: expected a divisor of data.batch_size=2", "new", {}),
    ("seq>max", ["--config.data.seq_len=4096"], "data.seq_len=4096: expected <= "
     "model.max_seq_len=", "run", {}),
    ("layer-pattern", ["--config.model.layer_pattern=AQ"], "unknown letter 'Q'", "run", {}),
    ("mode", ["--mode", "trian"], "--mode", "run", {}),
    ("no-workdir", [], "--workdir is required with --mode train", "none", {}),
    ("resume+overwrite", ["--resume", "--overwrite"],
     "--resume and --overwrite: expected at most one of them", "run", {}),
    ("config-file", ["--config", "/nonexistent/config.py"], "--config", "new", {"base": []}),
    ("coordinator", ["--coordinator", "localhost"],
     "--coordinator='localhost': expected 'host:port'", "run", {}),
    ("unknown-flag", ["--bogus_flag=1"], "bogus_flag", "run", {}),
    ("train-no-config", [], "--mode train needs --config", "run", {"base": []}),
    # data
    ("no-files", ["--config.data.sources=('text:/nonexistent/*.txt',)"],
     "no files match '/nonexistent/*.txt'", "new", {}),
    ("bad-jsonl", ["--config.data.sources=('jsonl:{data}/docs.jsonl',)"],
     "docs.jsonl:201: not valid JSON", "new",  # found at open, whether line 201 is in the
     {"prepare": lambda w, d: _write(f"{d}/docs.jsonl", "".join(  # train or held-out split
         json.dumps({"text": f"x = {i}\n" * 20}) + "\n" for i in range(200)) + '{"text": \n')}),
    ("poison-env", [], "JAXLM_POISON_STEPS='7,x': expected step indices like '7,30-39'", "run",
     {"env": {"JAXLM_POISON_STEPS": "7,x"}}),
    # tokenizer
    ("tokenizer-missing", ["--config.data.tokenizer=file",
                           "--config.data.tokenizer_path=/nonexistent/tokenizer.json"],
     "tokenizer file /nonexistent/tokenizer.json does not exist", "run", {}),
    ("tokenizer-garbage", ["--config.data.tokenizer=file",
                           "--config.data.tokenizer_path={data}/tokenizer.json"],
     "tokenizer.json: cannot load it", "run",
     {"prepare": lambda w, d: _write(f"{d}/tokenizer.json", "{not json")}),
    ("vocab-too-small", ["--config.model.vocab_size=100"],
     "model.vocab_size=100: expected >= the tokenizer's vocabulary of 261", "run", {}),
    # workdir and checkpoints
    ("other-experiment", ["--config.model.mlp_dim=96"],
     "holds a run with a different model config (differs in model.mlp_dim)", "run", {}),
    ("resume-wrong-shapes", ["--resume", "--config.model.mlp_dim=96"],
     "has shape [2, 64, 32], expected [2, 96, 32]", "run", {}),
    ("all-checkpoints-corrupt", [], "no restorable checkpoint in", "run",
     {"prepare": lambda w, d: _corrupt_all_checkpoints(w)}),
    ("eval-all-corrupt", ["--mode", "eval"], "no restorable checkpoint in", "run",
     {"base": [], "prepare": lambda w, d: _corrupt_all_checkpoints(w)}),
    ("workdir-is-a-file", [], "exists and is not a directory", "new",
     {"prepare": lambda w, d: _write(w, "not a directory")}),
    ("not-a-run-dir", [], "is not empty (notes.txt, ...) and holds no config.json", "new",
     {"prepare": lambda w, d: _write(f"{w}/notes.txt", "mine")}),
    ("config-json-corrupt", [], "config.json is not valid JSON", "run",
     {"prepare": lambda w, d: _write(f"{w}/config.json", '{"model": ')}),
    ("busy", [], "is in use by process {pid}", "run", {"lock": True}),
]


def snapshot(path):
    """Everything under `path`: (relative path, size, mtime) of files and directories."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    entries = []
    for directory, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            full = os.path.join(directory, name)
            st = os.stat(full)
            entries.append((os.path.relpath(full, path), st.st_size if name in files else -1,
                            st.st_mtime_ns))
    return sorted(entries)


@pytest.fixture(scope="module")
def bad_input_results(reference, tmp_path_factory):
    """Runs every row of BAD_INPUTS (three launches at a time); name -> (result, before,
    after, expected message)."""
    from concurrent.futures import ThreadPoolExecutor
    root = tmp_path_factory.mktemp("bad_inputs")
    jobs, locks = {}, []
    for name, args, expect, kind, options in BAD_INPUTS:
        workdir, data = str(root / name / "workdir"), str(root / name / "data")
        os.makedirs(data)
        if kind == "run":
            shutil.copytree(reference["workdir"], workdir)
        if "prepare" in options:
            options["prepare"](workdir, data)
        if options.get("lock"):
            locks.append(WorkdirLock(workdir))
            locks[-1].acquire()
        argv = [a.format(data=data) for a in args]
        if kind != "none":
            argv = ["--workdir", workdir, *argv]
        expect = expect.format(pid=os.getpid())
        jobs[name] = (workdir, snapshot(workdir), argv, options, expect)

    def run(name):
        workdir, before, argv, options, expect = jobs[name]
        proc = subprocess.Popen([sys.executable, LAUNCH, *options.get("base", TINY), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(options.get("env")), cwd=ROOT)
        out, err = proc.communicate(timeout=TIMEOUT)
        return name, (proc.returncode, out, err, before, snapshot(workdir), expect)

    try:
        with ThreadPoolExecutor(3) as pool:
            return dict(pool.map(run, jobs))
    finally:
        for lock in locks:
            lock.release()


def test_bad_input_table_has_at_least_twenty_rows_of_every_kind():
    assert len(BAD_INPUTS) >= 20 and len({row[0] for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("name", [row[0] for row in BAD_INPUTS])
def test_bad_input_fails_in_one_line_and_leaves_the_workdir_as_it_was(bad_input_results, name):
    code, out, err, before, after, expect = bad_input_results[name]
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, (code, err[-3000:])
    assert lines[0].startswith("error: ") and expect in lines[0], lines[0]
    assert after == before
