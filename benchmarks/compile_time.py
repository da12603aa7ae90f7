"""Compile time of the full train step at 4 and 32 layers: scanning over layers keeps it flat.

Prints one JSON line with both times and `ratio_32_over_4` (target ≤ 1.5).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_utils import emit  # noqa: E402
from jaxlm.models import presets  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402
from jaxlm.schema import replace  # noqa: E402
from jaxlm.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402

SEQ, BATCH = 512, 8


def compile_seconds(num_layers: int) -> float:
    cfg = replace(presets.get("llama", "bench-small"), num_layers=num_layers)
    model = Decoder(cfg)
    tcfg = TrainConfig(steps=100, warmup_steps=10)
    tx, schedule = optimizer.make_optimizer(tcfg), optimizer.learning_rate_schedule(tcfg)
    abstract = jax.eval_shape(lambda r: nn.unbox(state_lib.boxed_state(model, tx, r, SEQ)),
                              jax.random.key(0))
    batch = {"inputs": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),
             "targets": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32)}
    step = jax.jit(step_lib.make_train_step(model, tx, schedule), donate_argnums=(0,))
    start = time.perf_counter()
    step.lower(abstract, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    compile_seconds(2)  # warm the tracing caches so neither measured run pays first-use costs
    t4, t32 = compile_seconds(4), compile_seconds(32)
    emit({"benchmark": "compile_time", "config": "bench-small", "compile_s_4_layers": t4,
          "compile_s_32_layers": t32, "ratio_32_over_4": t32 / t4})


if __name__ == "__main__":
    main()
