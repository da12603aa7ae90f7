"""Multi-process (multi-host) start-up and host <-> global array plumbing.

Every process runs the same program (SPMD, one controller per host). `initialize` must run
before anything asks JAX for devices:

    initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # explicit
    initialize()        # auto: a cluster JAX can detect (SLURM, Open MPI, TPU pods), else 1 process

Each process then loads its own rows of every global batch (`data.pipeline.train_dataset`
takes process_index / process_count) and `global_batch` stitches them into one jax.Array whose
rows are ordered by process: process p's rows land on its own devices, which the mesh puts at
data positions [p·D/P, (p+1)·D/P) because `jax.devices()` lists devices by process.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import Sharding

from jaxlm.parallel.validate import ShardingError

def cluster_environment() -> str | None:
    """Name of a multi-process launcher that `jax.distributed.initialize()` can read its
    coordinator, process count and id from, or None for a plain single-process run."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def use_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend go through gloo (the default CPU client
    has none). Harmless on GPU/TPU hosts: it only configures the CPU client."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> bool:
    """Starts the multi-process runtime; returns whether this is a multi-process run.

    With `coordinator` ('host:port') all three arguments are needed. Without it, and `auto`, a
    detected cluster environment (see `cluster_environment`) initializes from its variables;
    otherwise nothing happens and the run is single-process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if coordinator is None and (num_processes is not None or process_id is not None):
        raise ShardingError("--num_processes/--process_id given without --coordinator: expected "
                            "all three (or none, for auto-detection)")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ShardingError(f"--coordinator={coordinator!r}: expected 'host:port'")
        if num_processes is None or process_id is None:
            raise ShardingError("--coordinator given: expected --num_processes and --process_id "
                                "too")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ShardingError(f"--process_id={process_id}: expected 0 <= id < "
                                f"--num_processes={num_processes}")
        use_cpu_collectives()
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif auto and cluster_environment() is not None:
        use_cpu_collectives()
        jax.distributed.initialize()
    else:
        return False
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and config files."""
    return jax.process_index() == 0


def global_batch(local_batch: dict, sharding: Sharding, global_rows: int | None = None) -> dict:
    """This process's rows of a batch -> global arrays over `sharding` (rows ordered by process).

    `global_rows` (default: local rows × process count) is checked against what the processes
    together provide."""
    def one(x):
        x = np.asarray(x)
        rows = global_rows if global_rows is not None else x.shape[0] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, (rows,) + x.shape[1:])
    return jax.tree.map(one, local_batch)


def replicated_batch(batch: dict, sharding: Sharding) -> dict:
    """A batch that every process holds in full (e.g. held-out data) -> global arrays."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), np.shape(x)), batch)


def is_single_process() -> bool:
    return jax.process_count() == 1


def to_host(tree):
    """NumPy copies of (possibly multi-process) global arrays; every process must call it."""
    if is_single_process():
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: every process
    must call it). Used for per-process host state such as data-iterator positions."""
    if is_single_process():
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, :int(lengths[i, 0])]).decode())
            for i in range(gathered.shape[0])]


PER_PROCESS = "per_process"


def pack_process_state(state: dict) -> dict:
    """A data-iterator state to save: itself in a single-process run; every process's state
    (gathered, so process 0 can write them all) in a multi-process one."""
    if is_single_process():
        return state
    return {PER_PROCESS: allgather_json(state)}


def unpack_process_state(saved: dict) -> dict:
    """This process's entry of what `pack_process_state` saved."""
    states = saved.get(PER_PROCESS) if saved else None
    count = 1 if states is None else len(states)
    if count != jax.process_count():
        raise ShardingError(f"checkpoint data-iterator state was written by {count} "
                            f"process(es): expected {jax.process_count()} (resume with the "
                            "same number of processes)")
    return saved if states is None else states[jax.process_index()]
