"""The training loop: build, restore, step, evaluate, checkpoint, log.

    run = build_run(cfg)                 # mesh, model, tokenizer, optimizer, shardings
    summary = train(cfg, workdir)        # resumes from workdir's newest checkpoint if any

The loop dispatches step s+1 before pulling step s's metrics to the host (as nanodo does), so
the host never waits on the device just to log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from jaxlm.data import pipeline
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer
from jaxlm.models.decoder import Decoder
from jaxlm.parallel import distributed, sharding, validate, zero
from jaxlm.parallel.mesh import mesh_from_config
from jaxlm.parallel.rules import make_rules
from jaxlm.schema import ConfigError
from jaxlm.train import flops, optimizer, state as state_lib, step as step_lib
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.metrics import MetricWriter

# Sections of the config that define *what* is trained; a workdir trained with different
# values is another experiment, and the loop refuses to resume it.
IDENTITY_SECTIONS = ("model", "data")


class RunDirError(ValueError):
    """The workdir holds a different experiment (or is otherwise unusable)."""


@dataclasses.dataclass
class Run:
    """Everything built from a config that train / eval / generate share."""

    cfg: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    model: Decoder
    tokenizer: Tokenizer
    tx: Any
    schedule: Any
    state_shardings: Any
    batch_sharding: Any

    def abstract_state(self):
        abstract = state_lib.abstract_state(self.model, self.tx, jax.random.key(0),
                                            self.cfg.data.seq_len)
        return abstract_with_shardings(nn.unbox(abstract), self.state_shardings)


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def check_vocab(cfg, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: expected >= the "
                          f"tokenizer's vocabulary of {tokenizer.vocab_size}")


def check_batch_tokens(batch: dict, vocab_size: int, step: int) -> None:
    """Token ids past the vocabulary would be silently clamped by the embedding gather."""
    for key in ("inputs", "targets"):
        top = int(batch[key].max())
        if top >= vocab_size or int(batch[key].min()) < 0:
            raise ValueError(f"batch {key} at step {step}: token id {top} outside "
                             f"[0, model.vocab_size={vocab_size})")


def build_run(cfg, shardings_transform=None) -> Run:
    """`shardings_transform` defaults to the ZeRO stage of `cfg.parallel.zero`."""
    tokenizer = load_tokenizer(cfg.data)
    check_vocab(cfg, tokenizer)
    mesh = mesh_from_config(cfg.parallel)
    validate.check_processes(mesh)
    validate.check_batch(cfg.data.batch_size, cfg.train.grad_accum_steps, mesh)
    rules = make_rules(cfg.parallel.rules)
    if shardings_transform is None:
        shardings_transform = zero.transform(cfg.parallel.zero)
    model = Decoder(cfg.model)
    tx = optimizer.make_optimizer(cfg.train)
    schedule = optimizer.learning_rate_schedule(cfg.train)
    state_shardings = state_lib.state_shardings(model, tx, mesh, rules, cfg.data.seq_len,
                                                shardings_transform)
    return Run(cfg, mesh, rules, model, tokenizer, tx, schedule, state_shardings,
               sharding.batch_sharding(mesh))


def prepare_workdir(cfg, workdir: str, overwrite: bool = False) -> None:
    """Writes workdir/config.json; refuses a workdir that holds a different experiment."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = config_to_dict(cfg)
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8") as f:
            try:
                previous = json.load(f)
            except json.JSONDecodeError:
                raise RunDirError(f"{path} is not valid JSON; pass --overwrite to start a new "
                                  "run here") from None
        for section in IDENTITY_SECTIONS:
            if previous.get(section) != current[section]:
                diff = sorted(k for k in current[section]
                              if previous.get(section, {}).get(k) != current[section][k])
                raise RunDirError(f"workdir {workdir} holds a run with a different {section} "
                                  f"config (differs in {section}.{diff[0] if diff else '?'}); "
                                  "use a new --workdir or pass --overwrite")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(current, f, indent=2)
        os.replace(tmp, path)


def evaluate(eval_step, state, batches: list[dict], batch_sharding) -> float:
    """Token-mean held-out cross-entropy (nats)."""
    total, weight = 0.0, 0.0
    for batch in batches:
        ce, w = eval_step(state.params, state.model_state,
                          distributed.replicated_batch(batch, batch_sharding))
        total, weight = total + float(ce), weight + float(w)
    return total / max(weight, 1.0)


def _silent(*_args, **_kwargs) -> None:
    pass


def train(cfg, workdir: str, *, overwrite: bool = False, log=print) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest checkpoint; returns final metrics."""
    # Everything that can fail on bad input happens before the workdir is touched.
    run = build_run(cfg)
    tcfg, dcfg = cfg.train, cfg.data
    dataset = pipeline.train_dataset(dcfg, run.tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    eval_sets = {name: pipeline.take(ds, tcfg.eval_batches)
                 for name, ds in pipeline.eval_datasets(dcfg, run.tokenizer).items()}
    prepare_workdir(cfg, workdir, overwrite)
    is_main = distributed.is_main_process()
    if not is_main:
        log = _silent  # only process 0 prints and writes
    writer = MetricWriter(workdir, enabled=is_main)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                                every=tcfg.checkpoint_every, async_save=tcfg.async_checkpoint)
    data_iter = iter(dataset)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state, _ = checkpointer.restore(latest, run.abstract_state())
        if data_state:  # runs seeded by convert / upscale / merge start their data afresh
            data_iter.set_state(distributed.unpack_process_state(data_state))
        log(f"resumed from {checkpointer.directory}/{latest}")
    else:
        state = state_lib.create_state(run.model, run.tx, jax.random.key(tcfg.seed),
                                       dcfg.seq_len, run.state_shardings)

    with sharding.activation_sharding(run.mesh, run.rules):
        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(run.model, run.tx, run.schedule,
                                     accum_steps=tcfg.grad_accum_steps, z_loss=tcfg.z_loss,
                                     seed=tcfg.seed),
            run.state_shardings, run.batch_sharding, sharding.replicated(run.mesh))
        eval_step = jax.jit(step_lib.make_eval_step(run.model),
                            out_shardings=sharding.replicated(run.mesh))

        unigram = pipeline.unigram_cross_entropy(
            pipeline.open_documents(dcfg, "train"), run.tokenizer, eval_sets["heldout"],
            cfg.model.vocab_size)
        params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        flops_per_token = flops.flops_per_token(cfg.model, state.params, dcfg.seq_len)
        log(f"model: {params_count / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} "
            f"MFLOPs/token; unigram baseline held-out loss {unigram:.4f} nats/token")
        writer.write(int(state.step), {"eval/unigram_loss": unigram, "params": params_count})

        start = int(state.step)
        last_eval, last_evals = None, {}
        pending = None  # (step, device metrics) not yet pulled to the host
        window_start, window_tokens = time.perf_counter(), 0
        bar = tqdm(total=tcfg.steps, initial=start, disable=not (tcfg.progress_bar and is_main),
                   dynamic_ncols=True)

        def flush(item):
            nonlocal window_start, window_tokens
            step_done, metrics = item
            metrics = {k: np.asarray(v) for k, v in metrics.items()}
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            metrics["tokens_per_s"] = tokens_per_s
            metrics["model_flops_per_s"] = tokens_per_s * flops_per_token
            writer.write(step_done, metrics)
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                            tok_s=f"{tokens_per_s:,.0f}")

        for step in range(start, tcfg.steps):
            batch = next(data_iter)
            check_batch_tokens(batch, cfg.model.vocab_size, step)
            state, metrics = train_step(state, distributed.global_batch(
                batch, run.batch_sharding, dcfg.batch_size))
            window_tokens += batch["inputs"].size * jax.process_count()
            if pending is not None:
                flush(pending)
                pending = None
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                pending = (done, metrics)
            if (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps:
                if pending is not None:
                    flush(pending)
                    pending = None
                last_evals = {name: evaluate(eval_step, state, batches, run.batch_sharding)
                              for name, batches in eval_sets.items()}
                last_eval = last_evals["heldout"]
                writer.write(done, {"eval/loss": last_eval, "eval/unigram_loss": unigram,
                                    **{f"eval/{name}_loss": value for name, value
                                       in last_evals.items() if name != "heldout"}})
                others = "".join(f", {name} {value:.4f}" for name, value in last_evals.items()
                                 if name != "heldout")
                if is_main:
                    bar.write(f"step {done}: held-out loss {last_eval:.4f}{others} "
                              f"(unigram baseline {unigram:.4f})")
            checkpointer.save(done, state, data_iter.get_state(),
                              {"config": config_to_dict(cfg), "step": done},
                              force=done == tcfg.steps)
            bar.update(1)
        if pending is not None:
            flush(pending)
        bar.close()
    checkpointer.close()
    writer.close()
    return {"step": int(state.step), "eval_loss": last_eval, "evals": last_evals,
            "unigram_loss": unigram, "state": state, "run": run}


def restore_for_inference(cfg, workdir: str):
    """(run, state) of the workdir's newest checkpoint."""
    run = build_run(cfg)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    latest = checkpointer.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train first")
    state, _, _ = checkpointer.restore(latest, run.abstract_state())
    checkpointer.close()
    return run, state


def evaluate_checkpoint(cfg, workdir: str) -> dict:
    """Held-out loss of the newest checkpoint next to the unigram baseline."""
    run, state = restore_for_inference(cfg, workdir)
    batches = pipeline.take(pipeline.heldout_dataset(cfg.data, run.tokenizer),
                            cfg.train.eval_batches)
    with sharding.activation_sharding(run.mesh, run.rules):
        loss = evaluate(jax.jit(step_lib.make_eval_step(run.model),
                                out_shardings=sharding.replicated(run.mesh)),
                        state, batches, run.batch_sharding)
    unigram = pipeline.unigram_cross_entropy(pipeline.open_documents(cfg.data, "train"),
                                             run.tokenizer, batches, cfg.model.vocab_size)
    return {"step": int(state.step), "eval_loss": loss, "unigram_loss": unigram}
