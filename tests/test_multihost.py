"""Two processes on 127.0.0.1 (4 CPU devices each, jax.distributed with gloo collectives) run
`experiments/launch.py` for 3 steps; the result equals one process with 8 devices fed the same
global batches (each process's rows, process 0's first)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm.config import parse_config
from jaxlm.data import pipeline
from jaxlm.parallel import distributed, sharding
from jaxlm.parallel.validate import ShardingError
from jaxlm.train import loop, state as state_lib, step as step_lib
from jaxlm.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
OVERRIDES = ["--config.model.num_layers=2", "--config.model.embed_dim=32",
             "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
             "--config.model.mlp_dim=64", "--config.data.seq_len=16",
             "--config.data.batch_size=8", f"--config.train.steps={STEPS}",
             "--config.train.warmup_steps=1", "--config.train.log_every=1",
             "--config.train.eval_batches=1", "--config.train.progress_bar=False",
             "--config.generate.max_new_tokens=1",
             # data=4 × tensor=2: each process holds two data groups of a tensor pair
             "--config.parallel.tensor=2", "--config.parallel.zero=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH = [sys.executable, os.path.join(ROOT, "experiments", "launch.py")]


def launch_env(devices: int) -> dict:
    """This environment with `devices` host devices; LLVM optimisation off (much faster
    compiles, the same SPMD partitioning)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    return env


def run_two_processes(args: list) -> list[str]:
    """`launch.py args` as two processes of 4 devices on 127.0.0.1; each one's stdout (both
    must exit 0)."""
    command = LAUNCH + args + ["--coordinator", f"127.0.0.1:{free_port()}",
                               "--num_processes", "2"]
    procs = [subprocess.Popen(command + ["--process_id", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=launch_env(4), cwd=ROOT)
             for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=400) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multihost") / "run")
    config = os.path.join(ROOT, "experiments", "configs", "quickstart.py")
    return workdir, run_two_processes(["--config", config, "--workdir", workdir, *OVERRIDES])


@pytest.fixture(scope="module")
def one_process_reference(two_process_run):
    """The same config on this process's 8 devices, each global batch assembled from both
    processes' data streams."""
    workdir, _ = two_process_run
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = parse_config(json.load(f))
    run = loop.build_run(cfg)
    streams = [iter(pipeline.train_dataset(cfg.data, run.tokenizer, process_index=i,
                                           process_count=2)) for i in range(2)]
    state = state_lib.create_state(run.model, run.tx, jax.random.key(cfg.train.seed),
                                   cfg.data.seq_len, run.state_shardings)
    init_params = distributed.to_host(state.params)
    losses = []
    with sharding.activation_sharding(run.mesh, run.rules):
        step = step_lib.jit_train_step(step_lib.make_train_step(run.model, run.tx, run.schedule),
                                       run.state_shardings, run.batch_sharding,
                                       sharding.replicated(run.mesh))
        for index in range(STEPS):
            parts = [next(stream) for stream in streams]
            batch = distributed.global_batch(
                {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, run.batch_sharding)
            if index == 0:  # LLVM optimisation off: a faster compile, the same partitioning
                step = step.lower(state, batch).compile(
                    compiler_options={"xla_backend_optimization_level": 0})
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return run, state, init_params, losses, [stream.get_state() for stream in streams]


def test_two_processes_end_with_the_params_of_one_process(two_process_run,
                                                          one_process_reference):
    workdir, _ = two_process_run
    run, ref_state, init_params, ref_losses, ref_data_states = one_process_reference
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert checkpointer.latest_step() == STEPS
    state, data_state, _ = checkpointer.restore(STEPS, run.abstract_state())
    checkpointer.close()
    assert int(state.step) == STEPS
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    moved = max(float(np.abs(np.asarray(got) - init).max())
                for got, init in zip(jax.tree.leaves(state.params), jax.tree.leaves(init_params)))
    assert moved > 1e-4  # the steps really changed the parameters
    # each process's data-iterator position is in the checkpoint, in process order
    assert data_state == {"per_process": json.loads(json.dumps(ref_data_states))}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]  # written once: by process 0
    np.testing.assert_allclose([r["loss"] for r in train_records], ref_losses, rtol=1e-5)
    assert all(r["tokens"] == 8 * 16 for r in train_records)  # the global batch's tokens


def test_only_process_zero_prints(two_process_run):
    _, (out0, out1) = two_process_run
    for text in ("model:", "final held-out loss", "--- sample ---"):
        assert text in out0 and text not in out1


def test_per_process_data_state_round_trip_and_mismatch():
    assert distributed.pack_process_state({"a": 1}) == {"a": 1}  # one process: unchanged
    assert distributed.unpack_process_state({"a": 1}) == {"a": 1}
    with pytest.raises(ShardingError, match=r"^checkpoint data-iterator state was written by 2 "
                                            r"process\(es\): expected 1 "):
        distributed.unpack_process_state({"per_process": [{"a": 1}, {"a": 2}]})


def clear_cluster_env(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def test_initialize_flags_are_checked_in_one_line(monkeypatch):
    clear_cluster_env(monkeypatch)
    with pytest.raises(ShardingError, match=r"^--coordinator='localhost': expected 'host:port'$"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ShardingError, match=r"^--process_id=2: expected 0 <= id < "
                                            r"--num_processes=2$"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ShardingError, match=r"without --coordinator"):
        distributed.initialize(None, 2, None)
    assert distributed.initialize() is False  # no cluster in the environment: single process


def test_cluster_auto_detection(monkeypatch):
    clear_cluster_env(monkeypatch)
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.cluster_environment() is None  # a one-task allocation is single-process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_environment() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    assert distributed.cluster_environment() == "tpu"


def test_two_process_eval_equals_one_process(two_process_run):
    """`--mode eval` across the two processes (perplexity on the global mesh, generation on
    process 0) prints, from process 0 only, the line one 8-device process prints."""
    workdir, _ = two_process_run
    flags = ["--mode", "eval", "--workdir", workdir, "--humaneval_limit=2", "--infill_limit=1",
             "--eval_workers=1"]
    out0, out1 = run_two_processes(flags)
    assert "{" not in out1  # the JSON line comes from process 0 only (gloo prints)
    two = json.loads(out0.strip().splitlines()[-1])
    single = subprocess.run(LAUNCH + flags + ["--distributed", "off"], capture_output=True,
                            text=True, env=launch_env(8), cwd=ROOT, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert two["step"] == one["step"] == STEPS
    assert two["humaneval_problems"] == one["humaneval_problems"] == 2
    assert two["infill_tasks"] == one["infill_tasks"] > 0
    for key in ("eval_loss", "perplexity", "bits_per_byte", "humaneval_pass@1",
                "infill_exact_match", "unigram_loss"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
