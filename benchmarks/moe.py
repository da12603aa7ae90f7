"""MoE FFN stacks versus a dense SwiGLU stack at equal *active* FLOPs per token.

A stack is `layers` residual FFN layers (x ← x + ffn(x)); one step is forward + backward of
mean(x_out²) + the MoE auxiliary losses. Three stacks, all with the same active hidden width F:

    dense         SwiGLU of width F
    8x top-2      8 experts of width F/2, top-2, dropless
    64x top-8     64 experts of width F/9, top-8, + 1 shared expert of width F/9, dropless

A fourth stack, `64x_top8_matmuls_only`, runs only the fine-grained stack's matmuls (shared
SwiGLU + the experts' grouped SwiGLU on perfectly balanced, already grouped rows): its ratio to
dense, `matmuls_only_over_dense`, is the floor that no dispatch can beat with these expert
shapes on this backend, and `dispatch_share_of_fine_grained` the part of the fine-grained step
that routing, sorting, gathers and combine take.

Routing uses the layer's own (random-init) router, so loads are what a fresh model sees. Steps
are timed round-robin (dense, 8x2, 64x8, dense, ...) so that load from other processes on the
machine hits all three alike; the reported step time is the median over rounds of the wall
time, and the process CPU time (min over rounds) is reported beside it, because on a shared
machine it tracks the work done better than the wall clock. Prints ONE JSON line: times,
ratios (`fine_grained_over_dense` is the 64x top-8 wall time over the dense wall time), the
dense-matmul GFLOP/s measured in this process, and the active FLOPs of a step.

The dense layers run on tokens flattened to [b·t, d] like the experts: XLA's CPU backend
computes the weight gradient of a [b, t, d] input ~1.6x slower, which would flatter the MoE.

    python benchmarks/moe.py [--layers 4] [--dim 512] [--batch 8] [--seq 512] [--width 2304]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm.layers.mlp import SwiGLU  # noqa: E402
from jaxlm.layers.moe import (MoE, MoEConfig, auto_block_size,  # noqa: E402
                              default_grouped_matmul_impl, grouped_matmul, swiglu_experts)


class Stack(nn.Module):
    """`layers` residual FFN layers; moe=None gives dense SwiGLU layers."""

    layers: int
    width: int
    moe: MoEConfig | None = None

    @nn.compact
    def __call__(self, x_btd):
        aux_total = jnp.zeros((), jnp.float32)
        for i in range(self.layers):
            if self.moe is None:  # on [tokens, d], as the MoE's experts see them (see main)
                y_td = SwiGLU(self.width, name=f"ffn_{i}")(x_btd.reshape(-1, x_btd.shape[-1]))
                x_btd = x_btd + y_td.reshape(x_btd.shape)
            else:
                y_btd, aux = MoE(self.moe, name=f"ffn_{i}")(x_btd, deterministic=True)
                x_btd = x_btd + y_btd
                aux_total = aux_total + sum(aux["losses"].values())
        return x_btd, aux_total


class ExpertMatmulsOnly(nn.Module):
    """The fine-grained stack's matmuls and nothing else: per layer, the shared SwiGLU and the
    routed experts' grouped SwiGLU on the k copies of the tokens laid out as if perfectly
    balanced (T·k/E rows per expert, already grouped), summed over the copies. No router,
    sort, gather or combine: the step time MoE dispatch could reach if it cost nothing."""

    layers: int
    moe: MoEConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.moe
        b, t, d = x_btd.shape
        rows = b * t * cfg.top_k
        block = auto_block_size(rows, cfg.num_experts)
        if rows % (cfg.num_experts * block):
            raise SystemExit(f"tokens x top_k = {rows}: expected a multiple of experts x block")
        sizes_e = jnp.full((cfg.num_experts,), rows // cfg.num_experts, jnp.int32)
        matmul = functools.partial(grouped_matmul, group_sizes_e=sizes_e, block=block,
                                   aligned=True)
        x_td = x_btd.reshape(b * t, d)
        for i in range(self.layers):
            def weights(name, shape):
                return self.param(f"{name}_{i}", nn.initializers.normal(0.02), shape)

            x_rd = jnp.tile(x_td, (cfg.top_k, 1))
            y_rd = swiglu_experts(matmul, x_rd,
                                  weights("wi_gate", (cfg.num_experts, d, cfg.mlp_dim)),
                                  weights("wi_up", (cfg.num_experts, d, cfg.mlp_dim)),
                                  weights("wo", (cfg.num_experts, cfg.mlp_dim, d)))
            shared_td = SwiGLU(cfg.shared_mlp_dim, name=f"shared_{i}")(x_td)
            x_td = x_td + shared_td + y_rd.reshape(cfg.top_k, b * t, d).sum(0)
        return x_td.reshape(b, t, d), jnp.zeros((), jnp.float32)


def make_step(stack: nn.Module, x_btd):
    params = jax.jit(stack.init)(jax.random.key(0), x_btd)["params"]

    def loss(p, x):
        y, aux = stack.apply({"params": p}, x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, x_btd))  # compile + first run

    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(step(params, x_btd))
        return time.perf_counter() - wall, time.process_time() - cpu

    return timed


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(1), (m, k))
    b = jax.random.normal(jax.random.key(2), (k, n))
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--width", type=int, default=2304, help="active hidden width F (÷ 18)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    f = args.width
    if f % 18:
        raise SystemExit(f"--width={f}: expected a multiple of 18 (F/2 and F/9 experts)")
    tokens = args.batch * args.seq
    x_btd = jax.random.normal(jax.random.key(3), (args.batch, args.seq, args.dim))

    variants = {
        "dense": None,
        "8x_top2": MoEConfig(num_experts=8, top_k=2, mlp_dim=f // 2),
        "64x_top8_shared1": MoEConfig(num_experts=64, top_k=8, mlp_dim=f // 9,
                                      num_shared_experts=1, shared_mlp_dim=f // 9),
    }
    load_before = os.getloadavg()[0]
    stacks = {name: Stack(args.layers, f, cfg) for name, cfg in variants.items()}
    stacks["64x_top8_matmuls_only"] = ExpertMatmulsOnly(args.layers,
                                                        variants["64x_top8_shared1"])
    steps = {name: make_step(stack, x_btd) for name, stack in stacks.items()}
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            wall, cpu = step()
            times[name].append(wall)
            cpu_times[name].append(cpu)
    gflops = matmul_gflops(tokens, args.dim, f)
    load_after = os.getloadavg()[0]

    median = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: min(ts) for name, ts in cpu_times.items()}
    # 3 matmuls per SwiGLU, ×3 for forward + backward; routers and dispatch not counted
    active_flops = 3 * 3 * 2 * tokens * args.dim * f * args.layers
    result = {
        "benchmark": "moe_vs_dense_equal_active_flops",
        "layers": args.layers, "dim": args.dim, "tokens": tokens, "active_width": f,
        "dispatch": "dropless", "grouped_matmul": default_grouped_matmul_impl(),
        "block_8x2": auto_block_size(tokens * 2, 8),
        "block_64x8": auto_block_size(tokens * 8, 64),
        "step_ms": {k: round(v * 1e3, 1) for k, v in median.items()},
        "step_ms_min": {k: round(min(v) * 1e3, 1) for k, v in times.items()},
        "step_cpu_ms_min": {k: round(v * 1e3, 1) for k, v in cpu.items()},
        "moe8x2_over_dense": round(median["8x_top2"] / median["dense"], 3),
        "fine_grained_over_dense": round(median["64x_top8_shared1"] / median["dense"], 3),
        "fine_grained_over_dense_cpu": round(cpu["64x_top8_shared1"] / cpu["dense"], 3),
        "matmuls_only_over_dense": round(median["64x_top8_matmuls_only"] / median["dense"], 3),
        "dispatch_share_of_fine_grained": round(
            1 - median["64x_top8_matmuls_only"] / median["64x_top8_shared1"], 3),
        "active_gflop_per_step": round(active_flops / 1e9, 1),
        "dense_step_gflops": round(active_flops / median["dense"] / 1e9, 1),
        "matmul_gflops": round(gflops, 1),
        "rounds": args.rounds,
        "loadavg_before_after": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
