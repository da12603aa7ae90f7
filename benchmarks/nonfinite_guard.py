"""Cost of the non-finite guard (jaxlm/train/guard.py): the same train step jitted with and
without it, timed in alternating rounds so a shared CPU's load hits both alike.

    python benchmarks/nonfinite_guard.py [--preset tiny] [--seq_len 256] [--batch 8]

Prints one JSON line: the best step time of each, the median per-round ratio guarded /
unguarded (1.0 = free), and whether one step of each gives bitwise-identical params (the guard
selects, it does not compute, so it must not change a good step's result).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_utils import emit, time_fn  # noqa: E402
from jaxlm.models import presets  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402
from jaxlm.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cfg = presets.get("llama", args.preset)
    model = Decoder(cfg)
    tcfg = TrainConfig(steps=1000, warmup_steps=10)
    tx, schedule = optimizer.make_optimizer(tcfg), optimizer.learning_rate_schedule(tcfg)
    init = jax.jit(lambda r: nn.unbox(state_lib.boxed_state(model, tx, r, args.seq_len)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq_len), jnp.float32)}
    # No donation: both steps start from the same state every call.
    steps = {name: jax.jit(step_lib.make_train_step(model, tx, schedule, guard=guarded))
             for name, guarded in (("guarded", True), ("unguarded", False))}
    state = init(jax.random.key(0))
    after = {name: fn(state, batch)[0].params for name, fn in steps.items()}
    identical = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                    zip(jax.tree.leaves(after["guarded"]), jax.tree.leaves(after["unguarded"])))

    times = {name: [] for name in steps}
    ratios = []
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(time_fn(lambda: fn(state, batch)[1]["loss"], warmup=0,
                                       repeats=2))
        ratios.append(times["guarded"][-1] / times["unguarded"][-1])
    emit({"benchmark": "nonfinite_guard", "preset": args.preset, "seq_len": args.seq_len,
          "batch": args.batch, "guarded_step_s": min(times["guarded"]),
          "unguarded_step_s": min(times["unguarded"]),
          "ratio_median": float(np.median(ratios)),
          "ratio_per_round": [round(r, 4) for r in ratios],
          "best_time_ratio": min(times["guarded"]) / min(times["unguarded"]),
          "params_bitwise_identical": identical, "load_avg_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
