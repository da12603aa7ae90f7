"""Tokens/s of the full training data pipeline — read documents, byte-level BPE tokenize, FIM
(rate 0.5, PSM/SPM), concat-then-split packing, mixture, batch — next to the token rate of the
bench-small training step measured in the same process.

    python benchmarks/data_throughput.py                           # also times the train step
    python benchmarks/data_throughput.py --train-tokens-per-s 450  # reuse a measured rate

Prints one JSON line: `tokens_per_s` of the pipeline (single process, no prefetch threads, the
way the training loop pulls batches) and `ratio_to_train` = tokens_per_s / training tokens/s
(target >= 20: the loader is never the bottleneck). Both rates come from this process, so
load from other processes on the machine affects them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_utils import emit, time_fn  # noqa: E402
from jaxlm.data import pipeline  # noqa: E402
from jaxlm.data.config import DataConfig  # noqa: E402
from jaxlm.data.tokenizers import load_tokenizer  # noqa: E402
from jaxlm.models import presets  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402
from jaxlm.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
from jaxlm.train.config import TrainConfig  # noqa: E402


def pipeline_tokens_per_s(data_cfg: DataConfig, batches: int) -> dict:
    start = time.perf_counter()
    tokenizer = load_tokenizer(data_cfg, log=lambda m: print(m, file=sys.stderr))
    ready = time.perf_counter()
    it = iter(pipeline.train_dataset(data_cfg, tokenizer))
    for _ in range(3):  # opens the corpus index, fills the packer
        next(it)
    built = time.perf_counter()
    tokens, fim_rows = 0, 0
    prefix = tokenizer.special_id("<fim_prefix>")
    for _ in range(batches):
        batch = next(it)
        tokens += batch["inputs"].size
        fim_rows += int(np.any(batch["inputs"] == prefix, axis=1).sum())
    seconds = time.perf_counter() - built
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "rows_with_fim": fim_rows / (batches * data_cfg.batch_size),
            "tokenizer_vocab": tokenizer.vocab_size, "tokenizer_ready_s": ready - start,
            "pipeline_build_s": built - ready}


def train_tokens_per_s(steps: int) -> float:
    """bench-small (V32000 D512 L8) train step at seq 512 × batch 8, as train_throughput.py."""
    cfg = presets.get("llama", "bench-small")
    seq_len, batch_size = 512, 8
    model = Decoder(cfg)
    tcfg = TrainConfig(steps=1000, warmup_steps=10)
    tx, schedule = optimizer.make_optimizer(tcfg), optimizer.learning_rate_schedule(tcfg)
    state = jax.jit(lambda r: nn.unbox(state_lib.boxed_state(model, tx, r, seq_len)))(
        jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule), donate_argnums=(0,))
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    return batch_size * seq_len / time_fn(one_step, warmup=1, repeats=steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--fim-rate", type=float, default=0.5)
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary (bench-small's)")
    parser.add_argument("--train-tokens-per-s", type=float, default=None,
                        help="skip timing the bench-small train step and use this rate")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    data_cfg = DataConfig(sources=("stdlib",), tokenizer="bpe", bpe_vocab_size=args.vocab,
                          fim_rate=args.fim_rate, seq_len=args.seq_len,
                          batch_size=args.batch_size)
    data = pipeline_tokens_per_s(data_cfg, args.batches)
    if args.train_tokens_per_s is None:
        train_rate, source = train_tokens_per_s(args.train_steps), "measured"
    else:
        train_rate, source = args.train_tokens_per_s, "argument"
    emit({"benchmark": "data_throughput", "pipeline": "stdlib -> bpe -> fim -> pack -> batch",
          "seq_len": args.seq_len, "batch_size": args.batch_size, "batches": args.batches,
          "fim_rate": args.fim_rate, **data, "train_config": "bench-small",
          "train_tokens_per_s": train_rate, "train_tokens_per_s_source": source,
          "ratio_to_train": data["tokens_per_s"] / train_rate, "target_ratio": 20.0,
          "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
