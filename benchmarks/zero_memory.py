"""Per-device memory of parameters and optimizer state under ZeRO 0 / 1 / 3 on 8 devices.

    python benchmarks/zero_memory.py            # llama 'bench-small' (V32000 D512 L8 H8 KV4)

For each stage the train state's shardings come from the rules table plus the ZeRO rewrite
(`jaxlm.parallel.zero`) on a data=8 mesh. Two independent measures of the bytes one device
holds:
  * from the shardings: Σ over leaves of shard_shape × itemsize (params and optimizer apart);
  * from XLA: `compiled.memory_analysis()` of the jitted train step — its argument bytes minus
    the batch's share are the state one device keeps between steps.
Ratios are per-device bytes ÷ (replicated bytes / 8), so 1.0 is a perfect 8-way split:
  zero1_opt_ratio    optimizer state under ZeRO-1 (target ≤ 1.05)
  zero3_total_ratio  params + optimizer state under ZeRO-3 (target ≤ 1.05)
Nothing is allocated or run: the state is abstract (jax.eval_shape) and only compiled.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_utils import emit  # noqa: E402
from jaxlm.models import presets  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402
from jaxlm.parallel import sharding, zero  # noqa: E402
from jaxlm.parallel.mesh import make_mesh  # noqa: E402
from jaxlm.parallel.rules import make_rules  # noqa: E402
from jaxlm.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
from jaxlm.train.checkpoint import abstract_with_shardings  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402

DEVICES = 8


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(abstract_tree))


def total_bytes(abstract_tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def measure(model, tx, schedule, stage: int, batch: int, seq_len: int) -> dict:
    mesh, rules = make_mesh(data=DEVICES), make_rules()
    shardings = state_lib.state_shardings(model, tx, mesh, rules, seq_len, zero.transform(stage))
    abstract = abstract_with_shardings(nn.unbox(state_lib.abstract_state(
        model, tx, jax.random.key(0), seq_len)), shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = {
        "inputs": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding),
        "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=batch_sharding)}
    with sharding.activation_sharding(mesh, rules):
        train_step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, schedule),
                                             shardings, batch_sharding, sharding.replicated(mesh))
        compiled = train_step.lower(abstract, abstract_batch).compile()
    analysis = compiled.memory_analysis()
    params, opt = shard_bytes(abstract.params), shard_bytes(abstract.opt_state)
    state_compiled = analysis.argument_size_in_bytes - shard_bytes(abstract_batch)
    return {"params": params, "opt": opt, "state_shardings": shard_bytes(abstract),
            "state_compiled": int(state_compiled), "temp_compiled": int(analysis.temp_size_in_bytes),
            "params_total": total_bytes(abstract.params), "opt_total": total_bytes(abstract.opt_state)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench-small")
    parser.add_argument("--seq_len", type=int, default=128, help="the state does not depend on it")
    args = parser.parse_args()
    assert jax.device_count() == DEVICES, jax.devices()
    cfg = presets.get("llama", args.config)
    model = Decoder(cfg)
    tcfg = TrainConfig(steps=1000, warmup_steps=10)
    tx, schedule = optimizer.make_optimizer(tcfg), optimizer.learning_rate_schedule(tcfg)
    results = {stage: measure(model, tx, schedule, stage, DEVICES, args.seq_len)
               for stage in zero.STAGES}
    base = results[0]
    replicated_params, replicated_opt = base["params_total"], base["opt_total"]
    record = {"benchmark": "zero_memory", "config": args.config, "devices": DEVICES,
              "replicated_params_bytes": replicated_params, "replicated_opt_bytes": replicated_opt}
    for stage, r in results.items():
        record[f"zero{stage}_params_bytes_per_device"] = r["params"]
        record[f"zero{stage}_opt_bytes_per_device"] = r["opt"]
        record[f"zero{stage}_state_bytes_per_device_compiled"] = r["state_compiled"]
        record[f"zero{stage}_temp_bytes_per_device_compiled"] = r["temp_compiled"]
        # the two measures must agree, or one of them is not measuring what we think
        assert r["state_compiled"] == r["state_shardings"], (stage, r)
    ideal_opt = replicated_opt / DEVICES
    ideal_total = (replicated_params + replicated_opt) / DEVICES
    record["zero1_opt_ratio"] = results[1]["opt"] / ideal_opt
    record["zero3_total_ratio"] = (results[3]["params"] + results[3]["opt"]) / ideal_total
    record["zero3_total_ratio_compiled"] = results[3]["state_compiled"] / ideal_total
    record["zero0_opt_ratio"] = results[0]["opt"] / ideal_opt
    emit(record)


if __name__ == "__main__":
    main()
