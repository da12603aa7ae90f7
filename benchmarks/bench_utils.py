"""Shared by the benchmarks: the machine's matmul peak, measured in the same process, and the
one-JSON-line output."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp


def time_fn(fn, *args, warmup: int = 1, repeats: int = 5, reduce=min) -> float:
    """Seconds per call (min over repeats by default) after `warmup` calls; blocks on results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return reduce(times)


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n×n×n matmul: the peak a model's MFU is measured against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = time_fn(jax.jit(jnp.matmul), a, b, warmup=2, repeats=repeats)
    return 2 * n ** 3 / seconds


def memory_read_bytes_per_s(n_bytes: int = 512 * 2 ** 20, repeats: int = 5) -> float:
    """Best-of-`repeats` bandwidth of a jitted full reduction over an n_bytes float32 array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    seconds = time_fn(jax.jit(jnp.sum), x, warmup=2, repeats=repeats)
    return n_bytes / seconds


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))
