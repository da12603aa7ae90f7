"""Training throughput and MFU of one full train step (forward, backward, AdamW update).

    python benchmarks/train_throughput.py --config bench-small

Prints one JSON line: step time, tokens/s, model FLOP/s by the PaLM formula (jaxlm/train/
flops.py: 6·N·T + 12·L·H·d_head·S·T), the float32 matmul FLOP/s of this machine measured in the
same process, and their ratio `mfu` (median over rounds that alternate a train step with
the matmul, so a shared CPU's load hits both alike).
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

from bench_utils import emit, interleaved_ratio  # noqa: E402
from jaxlm.models import presets  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402
from jaxlm.schema import replace  # noqa: E402
from jaxlm.train import flops, optimizer, state as state_lib, step as step_lib  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402

SHAPES = {"bench-small": dict(seq_len=512, batch=8)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench-small", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()
    shape = SHAPES[args.config]
    cfg = replace(presets.get("llama", args.config), remat=args.remat)
    model = Decoder(cfg)
    tcfg = TrainConfig(steps=1000, warmup_steps=10)
    tx, schedule = optimizer.make_optimizer(tcfg), optimizer.learning_rate_schedule(tcfg)
    state = jax.jit(lambda r: nn.unbox(state_lib.boxed_state(model, tx, r, shape["seq_len"])))(
        jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                               (shape["batch"], shape["seq_len"] + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((shape["batch"], shape["seq_len"]), jnp.float32)}
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule), donate_argnums=(0,))

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    tokens_per_step = shape["batch"] * shape["seq_len"]
    model_flops = flops.flops_per_token(cfg, holder["state"].params, shape["seq_len"])
    measured = interleaved_ratio(one_step, tokens_per_step * model_flops, rounds=args.steps)
    step_time = measured["work_time_s"]
    tokens_per_s = tokens_per_step / step_time
    emit({"benchmark": "train_throughput", "config": args.config, "remat": args.remat,
          "batch": shape["batch"], "seq_len": shape["seq_len"], "dtype": cfg.dtype,
          "step_time_s": step_time, "tokens_per_s": tokens_per_s,
          "model_flops_per_token": model_flops, "model_flops_per_s": tokens_per_s * model_flops,
          "matmul_flops_per_s": measured["matmul_flops_per_s"], "mfu": measured["mfu"],
          "mfu_per_round": measured["mfu_per_round"], "load_avg_1m": os.getloadavg()[0],
          "devices": jax.device_count()})


if __name__ == "__main__":
    main()
