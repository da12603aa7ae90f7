"""Forward+backward time and peak memory of the three Mamba-2 scans (`jaxlm.layers.ssm.ssd`).

Shape: batch 1, Hm=8 heads, P=64, N=64, G=1, chunk 256, L ∈ {512, 2048, 8192}. The timed
function is jit(value_and_grad) of a loss over y and the final state, w.r.t. x, dt, A, B, C.
Memory is `compiled.memory_analysis()`: temp + argument + output bytes. A configuration whose
footprint would not fit in 80% of the machine's available memory is compiled (for its memory
figure) but not run, and the JSON says so.

Prints one JSON line: per-L results, `chunked_speedup_L8192` (associative time ÷ chunked
time), chunked memory growth 512 → 8192 (16 = linear), and the matmul peak and load average
measured in the same process (other engineers share the 2 cores).

    python benchmarks/ssm_scan.py [--lengths 512,2048,8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_utils import emit, matmul_flops_per_s, time_fn  # noqa: E402
from jaxlm.layers.ssm import SCANS, ssd  # noqa: E402

HEADS, HEAD_DIM, STATE, GROUPS, CHUNK, BATCH = 8, 64, 64, 1, 256, 1


def inputs(length: int):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (BATCH, length, HEADS, HEAD_DIM))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (BATCH, length, HEADS)) - 2.0)
    A = -jnp.exp(jax.random.normal(keys[2], (HEADS,)))
    B = jax.random.normal(keys[3], (BATCH, length, GROUPS, STATE))
    C = jax.random.normal(keys[4], (BATCH, length, GROUPS, STATE))
    y_weight = jax.random.normal(keys[5], x.shape)
    return x, dt, A, B, C, y_weight


def train_fn(method: str):
    def loss(x, dt, A, B, C, y_weight):
        y, state = ssd(x, dt, A, B, C, None, method=method, chunk_size=CHUNK)
        return jnp.sum(y * y_weight) + jnp.sum(state)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(method: str, length: int, repeats: int) -> dict:
    args = inputs(length)
    compiled = train_fn(method).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    out = {"peak_mib": round(peak / 2 ** 20, 1), "temp_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        out["gflop"] = round(cost["flops"] / 1e9, 2)
    if peak > 0.8 * available_bytes():
        out["skipped"] = f"needs {peak / 2 ** 30:.1f} GiB, more than 80% of available memory"
        return out
    seconds = time_fn(compiled, *args, warmup=1, repeats=repeats if length < 8192 or
                      method == "chunked" else max(1, repeats - 1))
    out["seconds"] = round(seconds, 4)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    load_start = os.getloadavg()[0]
    peak = matmul_flops_per_s()
    results = {}
    for length in lengths:
        results[str(length)] = {m: measure(m, length, args.repeats) for m in SCANS}
    record = {
        "benchmark": "ssm_scan",
        "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "state": STATE,
                  "groups": GROUPS, "chunk": CHUNK},
        "what": "jit(value_and_grad) w.r.t. x, dt, A, B, C; seconds = min over repeats",
        "results": results,
        "matmul_gflops": round(peak / 1e9, 1),
        "loadavg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    longest = str(max(lengths))
    chunked, assoc = results[longest]["chunked"], results[longest]["associative"]
    if "seconds" in chunked and "seconds" in assoc:
        record[f"chunked_speedup_L{longest}"] = round(assoc["seconds"] / chunked["seconds"], 1)
    if "seconds" in chunked and chunked.get("gflop"):
        record[f"chunked_gflops_L{longest}"] = round(chunked["gflop"] / chunked["seconds"], 1)
    shortest = str(min(lengths))
    record["chunked_memory_growth"] = {
        "length_ratio": max(lengths) / min(lengths),
        "peak_ratio": round(results[longest]["chunked"]["peak_mib"]
                            / results[shortest]["chunked"]["peak_mib"], 2)}
    emit(record)


if __name__ == "__main__":
    main()
