"""The training loop: build, restore, step, evaluate, checkpoint, log.

    run = build_run(cfg)                 # mesh, model, tokenizer, optimizer, shardings
    summary = train(cfg, workdir)        # resumes from workdir's newest good checkpoint if any

The loop dispatches step s+1 before pulling step s's metrics to the host (as nanodo does), so
the host never waits on the device just to log.

What keeps a run safe (each piece is its own module):
  * everything that can fail on bad input — config, tokenizer, data, the workdir's previous
    config, the checkpoint to resume and the first batch — is checked before the first write;
    a failed launch leaves the workdir as it was                             (workdir.py)
  * one training process per workdir (a lock file; a dead holder's lock is taken over)
  * resume from the newest checkpoint that restores; damaged and interrupted ones are moved to
    <workdir>/bad_checkpoints/ with a warning, never deleted                 (checkpoint.py)
  * SIGTERM / SIGINT: finish the step, save, wait for the write, return      (signals.py)
  * a step with a non-finite loss or gradient norm changes nothing and is counted; too many in
    a row stop the run                                                       (guard.py)
  * optionally, a hash of every batch in batches.jsonl, to compare data order (batchlog.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from jaxlm.data import pipeline, preference
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer
from jaxlm.models.decoder import Decoder
from jaxlm.parallel import distributed, sharding, validate, zero
from jaxlm.parallel.mesh import mesh_from_config
from jaxlm.parallel.rules import make_rules
from jaxlm.schema import ConfigError
from jaxlm.train import batchlog, flops, guard, optimizer, state as state_lib, step as step_lib
from jaxlm.train import dpo, ramp
from jaxlm.train import workdir as workdir_lib
from jaxlm.train.checkpoint import (Checkpointer, abstract_with_shardings, find_restorable,
                                    list_checkpoints, quarantine)
from jaxlm.train.metrics import MetricWriter
from jaxlm.train.signals import Preemption
from jaxlm.train.workdir import IDENTITY_SECTIONS, RunDirError  # noqa: F401 (re-exported)

CHECKPOINTS = "checkpoints"


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


def evaluate(eval_step, state, batches: list[dict], batch_sharding) -> float:
    """Token-mean held-out cross-entropy (nats)."""
    total, weight = 0.0, 0.0
    for batch in batches:
        ce, w = eval_step(state.params, state.model_state,
                          distributed.replicated_batch(batch, batch_sharding))
        total, weight = total + float(ce), weight + float(w)
    return total / max(weight, 1.0)


def objective_data(cfg, run: Run):
    """(training dataset, {name: held-out batches}, ramp controller or None) of
    train.objective: lm reads data.sources, sft / dpo read align.path (jaxlm.data.preference).
    With a batch-size ramp the dataset yields micro-batches of data.batch_size /
    train.grad_accum_steps rows and the ramp iterator concatenates k of them per step."""
    tcfg, dcfg = cfg.train, cfg.data
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    rows = dcfg.batch_size // (tcfg.grad_accum_steps if tcfg.ramp.trigger != "off" else 1)
    if tcfg.objective == "lm":
        dataset = pipeline.train_dataset(dcfg, run.tokenizer, rows, **where)
        eval_sets = {name: pipeline.take(ds, tcfg.eval_batches)
                     for name, ds in pipeline.eval_datasets(dcfg, run.tokenizer).items()}
    else:
        dataset = preference.train_dataset(cfg.align, tcfg.objective, run.tokenizer,
                                           dcfg.seq_len, rows, **where)
        eval_sets = {"heldout": preference.heldout_batches(
            cfg.align, tcfg.objective, run.tokenizer, dcfg.seq_len, dcfg.batch_size,
            tcfg.eval_batches)}
    if tcfg.ramp.trigger == "off":
        return dataset, eval_sets, None
    controller = ramp.RampController(tcfg.ramp, tcfg.grad_accum_steps, rows, dcfg.seq_len)
    return ramp.RampDataset(dataset, controller), eval_sets, controller


def objective_steps(cfg, run: Run, controller=None):
    """(train_step(state, host batch) -> (state, metrics), eval_step(params, model_state,
    batch) -> (Σ loss, Σ weight)) of train.objective; build under activation_sharding."""
    tcfg, replicated = cfg.train, sharding.replicated(run.mesh)
    if tcfg.objective == "dpo":
        return dpo.make_steps(cfg, run)
    eval_step = jax.jit(step_lib.make_eval_step(run.model), out_shardings=replicated)
    if controller is not None:
        micro_rows = controller.micro_rows
        return ramp.RampStepper(
            run.model, run.tx, run.schedule, controller, z_loss=tcfg.z_loss, seed=tcfg.seed,
            to_device=lambda b: distributed.global_batch(b, run.batch_sharding, micro_rows),
            shardings=(run.state_shardings, run.batch_sharding, replicated)), eval_step
    jitted = step_lib.jit_train_step(
        step_lib.make_train_step(run.model, run.tx, run.schedule,
                                 accum_steps=tcfg.grad_accum_steps, z_loss=tcfg.z_loss,
                                 seed=tcfg.seed),
        run.state_shardings, run.batch_sharding, replicated)

    def train_step(state, batch):
        return jitted(state, distributed.global_batch(batch, run.batch_sharding,
                                                      cfg.data.batch_size))

    return train_step, eval_step


def _silent(*_args, **_kwargs) -> None:
    pass


def warn_stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def restore_data_iterator(dataset, data_state: dict | None):
    """A fresh iterator over `dataset`, moved to `data_state` when there is one."""
    data_iter = iter(dataset)
    if data_state:  # runs seeded by convert / upscale / merge start their data afresh
        data_iter.set_state(distributed.unpack_process_state(data_state))
    return data_iter


@dataclasses.dataclass
class _Start:
    """Where a launch starts: the state, the data iterator and what the checkpoint said."""

    state: Any
    data_iter: Any
    step: int | None = None        # the checkpoint restored (None: fresh)
    meta: dict | None = None
    bad: list = dataclasses.field(default_factory=list)         # (path, reason)
    incomplete: list = dataclasses.field(default_factory=list)  # paths


def _starting_point(cfg, run: Run, dataset, checkpoint_dir: str, *, fresh: bool,
                    keep_data_state: bool) -> _Start:
    """Restores the newest good checkpoint (reads only) or initialises a new state."""
    found = None
    if not fresh:
        accept = None
        if keep_data_state:
            def accept(_state, data_state, _meta):
                restore_data_iterator(dataset, data_state)
        found = find_restorable(checkpoint_dir, run.abstract_state(), accept=accept)
    if found is None:
        state = state_lib.create_state(run.model, run.tx, jax.random.key(cfg.train.seed),
                                       cfg.data.seq_len, run.state_shardings)
        incomplete = [] if fresh else list_checkpoints(checkpoint_dir).incomplete
        return _Start(state, iter(dataset), incomplete=incomplete)
    data_iter = restore_data_iterator(dataset, found.data_state if keep_data_state else None)
    return _Start(found.state, data_iter, found.step, found.meta, found.bad, found.incomplete)


def train(cfg, workdir: str, *, overwrite: bool = False, resume: bool = False,
          batch_log: bool = False, log=print, warn=warn_stderr) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest good checkpoint; returns final
    metrics (and `preempted`: whether a signal stopped it early, after saving).

    overwrite: start afresh even if the workdir holds another run (moved aside, not deleted).
    resume: continue the workdir's run even though its model/data config differs from `cfg`
        (a changed data section starts the data stream afresh).
    batch_log: append a hash of every batch to <workdir>/batches.jsonl.
    """
    workdir = os.path.abspath(workdir)
    is_main = distributed.is_main_process()
    if not is_main:
        log = warn = _silent  # only process 0 prints and writes
    # Everything that can fail on bad input happens before the workdir is touched.
    run = build_run(cfg)
    tcfg, dcfg = cfg.train, cfg.data
    current = config_to_dict(cfg)
    previous = workdir_lib.check(workdir, current, resume=resume, overwrite=overwrite)
    data_changed = previous is not None and previous.get("data") != current["data"]
    dataset, eval_sets, controller = objective_data(cfg, run)
    unigram = pipeline.unigram_cross_entropy(
        pipeline.open_documents(dcfg, "train"), run.tokenizer, eval_sets["heldout"],
        cfg.model.vocab_size)
    poisoned = guard.poison_steps()
    checkpoint_dir = os.path.join(workdir, CHECKPOINTS)

    with ExitStack() as stack:
        stack.enter_context(workdir_lib.claimed(workdir, warn))
        preemption = stack.enter_context(Preemption())
        start = _starting_point(cfg, run, dataset, checkpoint_dir, fresh=overwrite,
                                keep_data_state=not data_changed)
        first_batch = next(start.data_iter)
        check_batch_tokens(first_batch, cfg.model.vocab_size, int(start.state.step))

        # -- from here on the workdir is written --
        if overwrite and is_main:
            archived = workdir_lib.archive_previous_run(workdir)
            if archived:
                log(f"--overwrite: moved the previous contents of {workdir} to {archived}")
        for (path, reason), (_, target) in zip(start.bad, quarantine(
                [p for p, _ in start.bad], workdir)):
            warn(f"warning: skipped checkpoint {path} ({reason}); moved it to {target}")
        for path, target in quarantine(start.incomplete, workdir):
            warn(f"warning: found an interrupted checkpoint write {path}; moved it to {target}")
        if data_changed and start.step is not None:
            warn("warning: --resume with a different data config: the data stream starts "
                 "afresh")
        if is_main:
            workdir_lib.write_config(workdir, current)
        if start.step is not None:
            log(f"resumed from {checkpoint_dir}/{start.step}")
        return _loop(cfg, run, workdir, start, first_batch, eval_sets, unigram, preemption,
                     stack, poisoned=poisoned, batch_log=batch_log, log=log, warn=warn,
                     controller=controller)


def _loop(cfg, run: Run, workdir: str, start: _Start, first_batch: dict, eval_sets: dict,
          unigram: float, preemption: Preemption, stack: ExitStack, *, poisoned, batch_log,
          log, warn, controller=None) -> dict:
    tcfg, dcfg = cfg.train, cfg.data
    is_main = distributed.is_main_process()
    state, data_iter = start.state, start.data_iter
    writer = MetricWriter(workdir, enabled=is_main)
    stack.callback(writer.close)
    batches = batchlog.BatchLog(batchlog.log_path(workdir, jax.process_index())
                                if batch_log else None)
    stack.callback(batches.close)
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINTS), keep=tcfg.keep_checkpoints,
                                every=tcfg.checkpoint_every, async_save=tcfg.async_checkpoint)
    stack.callback(checkpointer.close)  # on every exit: wait for writes in flight
    tracker = guard.NonFiniteTracker.from_meta(guard.max_consecutive(tcfg), start.meta)
    last_saved = start.step

    with sharding.activation_sharding(run.mesh, run.rules):
        train_step, eval_step = objective_steps(cfg, run, controller)

        params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        flops_per_token = flops.flops_per_token(cfg.model, state.params, dcfg.seq_len)
        log(f"model: {params_count / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} "
            f"MFLOPs/token; unigram baseline held-out loss {unigram:.4f} nats/token")
        writer.write(int(state.step), {"eval/unigram_loss": unigram, "params": params_count})

        first = int(state.step)
        last_eval, last_evals = None, {}
        inflight: list[tuple[int, dict]] = []  # (step count after it, device metrics)
        window_start, window_tokens = time.perf_counter(), 0
        bar = tqdm(total=tcfg.steps, initial=first, disable=not (tcfg.progress_bar and is_main),
                   dynamic_ncols=True)
        stack.callback(bar.close)

        def flush(done, metrics):
            nonlocal window_start, window_tokens
            metrics = {k: np.asarray(v) for k, v in metrics.items()}
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            metrics["tokens_per_s"] = tokens_per_s
            metrics["model_flops_per_s"] = tokens_per_s * flops_per_token
            metrics["skipped_steps"] = tracker.total
            writer.write(done, metrics)
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                            tok_s=f"{tokens_per_s:,.0f}")

        def settle(keep_newest: bool):
            """Pulls finished steps' metrics to the host (all but the step just dispatched,
            unless it must be known now): counts skipped steps, logs, stops a bad streak."""
            n = len(inflight) - (1 if keep_newest else 0)
            for done, metrics in inflight[:max(n, 0)]:
                if tracker.observe(bool(metrics["nonfinite"])):
                    warn(f"warning: step {done}: loss {float(metrics['loss'])}, gradient norm "
                         f"{float(metrics['grad_norm'])}: update skipped ({tracker.total} "
                         f"skipped so far, {tracker.streak} in a row)")
                    writer.write(done, {"loss": metrics["loss"],
                                        "grad_norm": metrics["grad_norm"],
                                        "nonfinite": 1, "skipped_steps": tracker.total})
                    if tracker.exceeded():
                        raise tracker.error(done, None if last_saved is None else
                                            f"{checkpointer.directory}/{last_saved}")
                elif done % tcfg.log_every == 0 or done == tcfg.steps:
                    flush(done, metrics)
            del inflight[:max(n, 0)]

        def save(done, force=False) -> None:
            nonlocal last_saved
            if checkpointer.save(done, state, data_iter.get_state(),
                                 {"config": config_to_dict(cfg), "step": done,
                                  **tracker.state()}, force=force):
                last_saved = done

        preempted = False
        batch = first_batch
        for step in range(first, tcfg.steps):
            if preemption.requested(step):
                preempted = True
                break
            if batch is None:
                batch = next(data_iter)
                check_batch_tokens(batch, cfg.model.vocab_size, step)
            batches.write(step, batch)
            if step in poisoned:
                batch = guard.poison(batch)
            state, metrics = train_step(state, batch)
            window_tokens += batch["inputs"].size * jax.process_count()
            batch = None
            done = step + 1
            inflight.append((done, metrics))
            evaluating = (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps
            saving = done == tcfg.steps or checkpointer.manager.should_save(done)
            settle(keep_newest=not (evaluating or saving))
            if evaluating:
                last_evals = {name: evaluate(eval_step, state, batches_, run.batch_sharding)
                              for name, batches_ in eval_sets.items()}
                last_eval = last_evals["heldout"]
                writer.write(done, {"eval/loss": last_eval, "eval/unigram_loss": unigram,
                                    **{f"eval/{name}_loss": value for name, value
                                       in last_evals.items() if name != "heldout"}})
                others = "".join(f", {name} {value:.4f}" for name, value in last_evals.items()
                                 if name != "heldout")
                if is_main:
                    bar.write(f"step {done}: held-out loss {last_eval:.4f}{others} "
                              f"(unigram baseline {unigram:.4f})")
            # No periodic checkpoint inside a streak of skipped steps: the newest one on disk
            # stays the last good one (the final step is always saved).
            if saving and (tracker.streak == 0 or done == tcfg.steps):
                save(done, force=done == tcfg.steps)
            bar.update(1)
        settle(keep_newest=False)
        now = int(state.step)
        if preempted:
            if last_saved != now and now > first:
                save(now, force=True)
            checkpointer.wait()
            saved = ("no checkpoint yet (nothing was trained)" if last_saved is None else
                     f"checkpoint {checkpointer.directory}/{last_saved} written")
            log(f"{preemption.received}: stopped at step {now}; {saved}; launch the same "
                "command again to resume")
    return {"step": now, "eval_loss": last_eval, "evals": last_evals, "unigram_loss": unigram,
            "state": state, "run": run, "preempted": preempted,
            "skipped_steps": tracker.total}


def restore_for_inference(cfg, workdir: str, warn=warn_stderr):
    """(run, state) of the workdir's newest checkpoint that restores; newer ones that do not
    are skipped with a warning (and left where they are: this reads only)."""
    run = build_run(cfg)
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    found = find_restorable(directory, run.abstract_state())
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {directory}; train first")
    if distributed.is_main_process():
        for path, reason in found.bad:
            warn(f"warning: skipped checkpoint {path} ({reason})")
    return run, found.state


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
