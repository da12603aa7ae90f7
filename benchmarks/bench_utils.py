"""Shared by the benchmarks: the machine's matmul peak, measured in the same process, and the
one-JSON-line output."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


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


def interleaved_ratio(work_fn, work_flops: float, rounds: int = 5, n: int = 2048,
                      warmup: int = 2) -> dict:
    """FLOP/s of `work_fn` over the matmul peak, measured in alternating rounds.

    Each round times one call of `work_fn` and, right after it, the best of three n×n×n
    matmuls, so both see the same machine load (the CPU is shared); the reported `mfu` is the
    median of the per-round ratios. Also returns the best work time and the best peak seen.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    for _ in range(warmup):
        jax.block_until_ready(work_fn())
        jax.block_until_ready(matmul(a, b))
    ratios, work_times, peaks = [], [], []
    for _ in range(rounds):
        work_s = time_fn(work_fn, warmup=0, repeats=1)
        peak = 2 * n ** 3 / time_fn(matmul, a, b, warmup=0, repeats=3)
        ratios.append(work_flops / work_s / peak)
        work_times.append(work_s)
        peaks.append(peak)
    return {"mfu": float(np.median(ratios)), "work_time_s": min(work_times),
            "matmul_flops_per_s": max(peaks), "mfu_per_round": [round(r, 4) for r in ratios]}


def memory_read_bytes_per_s(n_bytes: int = 512 * 2 ** 20, repeats: int = 5) -> float:
    """Best-of-`repeats` bandwidth of a jitted full reduction over an n_bytes float32 array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    seconds = time_fn(jax.jit(jnp.sum), x, warmup=2, repeats=repeats)
    return n_bytes / seconds


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))
