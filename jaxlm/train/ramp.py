"""Batch-size ramp: grow the batch instead of decaying the learning rate.

Smith et al. 2017 ("Don't decay the learning rate, increase the batch size"): where a schedule
would cut the LR by α, multiply the batch by α instead — same epochs, fewer updates. Yi-9B
raised the batch each time the loss stopped falling. McCandlish et al. 2018 estimate the
useful batch from the gradient noise scale B_simple = tr(Σ)/|G|².

The micro-batch shape never changes; the *number* k of micro-batches accumulated per optimizer
step grows, so nothing recompiles. Two jitted functions, each compiled once:

    micro_step(acc, params, model_state, micro_batch, step, index, total_weight, k) -> acc, ...
        adds one micro-batch's gradient (already ÷ the step's token count) to `acc`, with its
        metric sums and k²·|grad|² (the squared norm of that micro-batch's own gradient)
    apply_step(state, acc, k, lr_scale) -> state, metrics
        clips and applies the summed gradient; the learning rate is the schedule's × lr_scale

and the host loop calls micro_step k times (k from `RampController`), then apply_step. The
objective is the token mean over all k micro-batches, exactly as in `jaxlm.train.step`.

Triggers (`train.ramp.trigger`), decided on the host after every step:

  schedule     k = the accum_steps of the last (step, accum_steps) entry at or before the step
  plateau      ema_t = d·ema_{t−1} + (1−d)·loss_t (ema_0 = loss_0). The best EMA and its step
               are tracked; ema_t < best − δ is an improvement (best := ema_t). If no
               improvement for `patience` steps: fire, and the window restarts at t
               (best := ema_t).
  noise_scale  with B_small = rows of a micro-batch, B_big = k·B_small, |G_small|² the mean
               over the step's micro-batches of |g_i|² (g_i = that micro-batch's gradient) and
               |G_big|² that of the step's gradient:
                 |G|²_est = (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small)
                 S_est    = (|G_small|² − |G_big|²)/(1/B_small − 1/B_big)
                 B_simple = EMA(S_est)/EMA(|G|²_est)   (same decay, so bias corrections cancel)
               fires when B_simple exceeds the current batch (k·B_small rows) and at least
               `patience` steps passed since the last change. Needs k ≥ 2 from the start.

Firing multiplies k by `factor`, capped at `max_accum_steps`. Once k is at the cap, a firing
trigger divides the learning rate by `factor` instead (`lr_decay_at_max`, Smith et al.: when
the batch cannot grow, decay the LR) — applied as a scale on the optimizer's update, so the
optimizer state and train.schedule are untouched (use schedule='constant' for a pure ramp).

The controller's state (k, LR scale, EMAs, tokens seen) travels with the data-iterator state in
every checkpoint (`RampDataset`), so a resumed run continues the ramp where it was. Logged per
step: batch_size (rows), accum_steps, tokens_seen (input tokens so far), lr_scale, and b_simple
once EMA(|G|²_est) is positive (early on, noise can make it negative; then it is left out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.schema import ConfigError, field, section
from jaxlm.train import guard as guard_lib
from jaxlm.train.losses import cross_entropy_sums
from jaxlm.train.step import apply_model

TRIGGERS = ("off", "schedule", "plateau", "noise_scale")


@section
class RampConfig:
    trigger: str = field("off", "what grows the accumulated micro-batches per step: off, a "
                         "fixed schedule, a loss plateau, or the gradient noise scale",
                         choices=TRIGGERS)
    schedule: tuple[tuple[int, int], ...] = field(
        (), "schedule trigger: ((step, accum_steps), ...) — from `step` on, accumulate "
        "`accum_steps` micro-batches (before the first entry: train.grad_accum_steps)")
    factor: int = field(2, "plateau / noise_scale: multiply the accumulation by this when the "
                        "trigger fires", min=2)
    max_accum_steps: int = field(16, "the accumulation never exceeds this many micro-batches",
                                 min=1)
    patience: int = field(50, "plateau: steps without an improvement of the loss EMA before it "
                          "fires; noise_scale: steps after a change before it may fire again",
                          min=1)
    plateau_delta: float = field(0.01, "plateau: an EMA lower than the best by more than this "
                                 "(nats) is an improvement", min=0.0)
    ema_decay: float = field(0.9, "decay of the loss EMA (plateau) and of the noise-scale "
                             "EMAs", min=0.0, max=1.0)
    lr_decay_at_max: bool = field(True, "once the accumulation is at max_accum_steps, a firing "
                                  "trigger divides the learning rate by `factor` instead")

    def validate(self) -> None:
        previous = 0
        for i, entry in enumerate(self.schedule):
            step, accum = entry
            if step <= previous:
                raise ConfigError(f"train.ramp.schedule[{i}]=({step}, {accum}): expected a step "
                                  f"> {previous} (entries in increasing step order, after 0)")
            if not 1 <= accum <= self.max_accum_steps:
                raise ConfigError(f"train.ramp.schedule[{i}]=({step}, {accum}): expected "
                                  f"accum_steps in [1, train.ramp.max_accum_steps="
                                  f"{self.max_accum_steps}]")
            previous = step
        if self.trigger == "schedule" and not self.schedule:
            raise ConfigError("train.ramp.schedule=(): expected at least one (step, "
                              "accum_steps) entry with train.ramp.trigger='schedule'")

    def check(self, grad_accum_steps: int) -> None:
        """Cross-field checks against train.grad_accum_steps (the starting accumulation)."""
        if self.trigger == "off":
            return
        if grad_accum_steps > self.max_accum_steps:
            raise ConfigError(f"train.ramp.max_accum_steps={self.max_accum_steps}: expected >= "
                              f"train.grad_accum_steps={grad_accum_steps}")
        if self.trigger == "noise_scale" and grad_accum_steps < 2:
            raise ConfigError(f"train.grad_accum_steps={grad_accum_steps}: expected >= 2 with "
                              "train.ramp.trigger='noise_scale' (B_simple compares single "
                              "micro-batches with their sum)")


# ---- the host-side controller ------------------------------------------------------------------

def noise_scale_terms(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float):
    """Unbiased (|G|², tr Σ) estimates from two batch sizes (McCandlish et al., appendix A)."""
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace


@dataclasses.dataclass
class RampState:
    accum: int
    lr_scale: float = 1.0
    loss_ema: float | None = None
    best: float | None = None
    best_step: int = 0
    last_change: int = 0
    g_sq_ema: float = 0.0
    trace_ema: float = 0.0
    tokens_seen: int = 0
    fired: int = 0  # how many times a trigger fired


class RampController:
    """Decides k (micro-batches per step) and the LR scale from what each step observed."""

    def __init__(self, cfg: RampConfig, start_accum: int, micro_rows: int, tokens_per_row: int):
        self.cfg, self.start_accum = cfg, start_accum
        self.micro_rows, self.tokens_per_row = micro_rows, tokens_per_row
        self.state = RampState(accum=start_accum)

    # -- checkpointing (JSON) --
    def reset(self) -> None:
        self.state = RampState(accum=self.start_accum)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, saved: dict) -> None:
        self.state = RampState(**saved)

    # -- decisions --
    def accum_for(self, step: int) -> int:
        """k for the optimizer step with index `step` (0-based)."""
        if self.cfg.trigger == "schedule":
            accum = self.start_accum
            for start, value in self.cfg.schedule:
                if step >= start:
                    accum = value
            return accum
        return self.state.accum

    def b_simple(self) -> float | None:
        s = self.state
        return s.trace_ema / s.g_sq_ema if s.g_sq_ema > 0 else None

    def _fire(self, step_done: int) -> None:
        s, cfg = self.state, self.cfg
        if s.accum < cfg.max_accum_steps:
            s.accum = min(s.accum * cfg.factor, cfg.max_accum_steps)
        elif cfg.lr_decay_at_max:
            s.lr_scale /= cfg.factor
        s.last_change, s.fired = step_done, s.fired + 1

    def observe(self, step: int, accum: int, loss: float, g_small_sq: float | None = None,
                g_big_sq: float | None = None) -> bool:
        """Records optimizer step `step` (0-based) taken with `accum` micro-batches; returns
        whether a trigger fired (the new k applies from the next step)."""
        s, cfg = self.state, self.cfg
        done = step + 1
        s.tokens_seen += accum * self.micro_rows * self.tokens_per_row
        d = cfg.ema_decay
        if math.isfinite(loss):
            s.loss_ema = loss if s.loss_ema is None else d * s.loss_ema + (1 - d) * loss
        if (g_small_sq is not None and g_big_sq is not None and accum >= 2
                and math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            g_sq, trace = noise_scale_terms(g_small_sq, g_big_sq, self.micro_rows,
                                            accum * self.micro_rows)
            s.g_sq_ema = d * s.g_sq_ema + (1 - d) * g_sq
            s.trace_ema = d * s.trace_ema + (1 - d) * trace
        if cfg.trigger == "plateau" and s.loss_ema is not None:
            if s.best is None or s.loss_ema < s.best - cfg.plateau_delta:
                s.best, s.best_step = s.loss_ema, done
            elif done - s.best_step >= cfg.patience:
                self._fire(done)
                s.best, s.best_step = s.loss_ema, done
                return True
        if cfg.trigger == "noise_scale":
            b_simple = self.b_simple()
            if (b_simple is not None and b_simple > accum * self.micro_rows
                    and done - s.last_change >= cfg.patience):
                self._fire(done)
                return True
        if cfg.trigger == "schedule":
            s.accum = self.accum_for(done)
        return False

    def metrics(self, accum: int, lr_scale: float) -> dict:
        """What a step taken with `accum` micro-batches and `lr_scale` logs (after observing
        it: tokens_seen includes it, b_simple is the current estimate)."""
        out = {"batch_size": accum * self.micro_rows, "accum_steps": accum,
               "tokens_seen": self.state.tokens_seen, "lr_scale": lr_scale}
        b_simple = self.b_simple()
        if b_simple is not None:
            out["b_simple"] = b_simple
        return out


# ---- data: k micro-batches per step, the ramp state inside the iterator state ------------------

class RampBatches:
    """Yields one step's rows: k micro-batches of the inner iterator, concatenated."""

    def __init__(self, inner, controller: RampController):
        self.inner, self.controller = inner, controller
        self.step = 0  # the optimizer step the next batch is for

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        k = self.controller.accum_for(self.step)
        parts = [next(self.inner) for _ in range(k)]
        self.step += 1
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self) -> dict:
        return {"data": self.inner.get_state(), "ramp": self.controller.state_dict(),
                "step": self.step}

    def set_state(self, saved: dict) -> None:
        """Restores the data position and the ramp. A state saved without a ramp (the ramp
        turned on when resuming) restores the data position and starts the ramp afresh, its
        schedule counting steps from there."""
        if "ramp" not in saved:
            self.inner.set_state(saved)
            self.controller.reset()
            self.step = 0
            return
        self.inner.set_state(saved["data"])
        self.controller.load_state_dict(saved["ramp"])
        self.step = saved["step"]


@dataclasses.dataclass
class RampDataset:
    """A dataset of micro-batches seen through the controller (a fresh iterator resets it)."""

    micro_batches: Any
    controller: RampController

    def __iter__(self) -> RampBatches:
        self.controller.reset()
        return RampBatches(iter(self.micro_batches), self.controller)


# ---- the two jitted functions ------------------------------------------------------------------

def zero_accumulator(model, params, model_state, micro_batch: dict) -> dict:
    aux = jax.eval_shape(lambda: apply_model(model, params, model_state, micro_batch,
                                             deterministic=True)[1])
    zero = jnp.zeros((), jnp.float32)
    return {"grads": jax.tree.map(jnp.zeros_like, params), "ce": zero, "z": zero,
            "g_small_sq": zero, "model_state": model_state,
            "aux": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux)}


def make_micro_step(model, *, z_loss: float = 0.0, seed: int = 0):
    """(acc, params, micro_batch, step, index, total_weight, k) -> acc with this micro-batch
    added. The gradient is of (Σ CE + z·Σ z²)/total_weight + aux/k, so k of them sum to the
    gradient of the whole step; k·grad is the micro-batch's own gradient (for |G_small|²)."""
    base_rng = jax.random.key(seed)

    def micro_step(acc, params, micro_batch, step, index, total_weight, k):
        rng = jax.random.fold_in(jax.random.fold_in(base_rng, step), index)
        k = k.astype(jnp.float32)

        def objective(p):
            logits, aux, new_state = apply_model(model, p, acc["model_state"], micro_batch,
                                                 deterministic=False, rng=rng)
            ce, z, _ = cross_entropy_sums(logits, micro_batch["targets"],
                                          micro_batch["loss_mask"], z_loss)
            aux_loss = sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
            return (ce + z_loss * z) / total_weight + aux_loss / k, (ce, z, aux, new_state)

        grads, (ce, z, aux, new_state) = jax.grad(objective, has_aux=True)(params)
        return {"grads": jax.tree.map(jnp.add, acc["grads"], grads),
                "ce": acc["ce"] + ce, "z": acc["z"] + z,
                "g_small_sq": acc["g_small_sq"] + jnp.square(k * optax.tree.norm(grads)),
                "model_state": new_state,
                "aux": jax.tree.map(lambda a, b: a + b / k, acc["aux"], aux)}

    return micro_step


def make_apply_step(tx: optax.GradientTransformation, schedule: Callable, *,
                    z_loss: float = 0.0):
    """(state, acc, total_weight, k, lr_scale) -> (state, metrics); a step whose loss or
    gradient norm is not finite changes nothing but the step count (`nonfinite` = 1)."""

    def apply_step(state, acc, total_weight, k, lr_scale):
        grads = acc["grads"]
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = acc["ce"] / total_weight, optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step) * lr_scale, "tokens": total_weight,
                   "g_big_sq": jnp.square(grad_norm),
                   "g_small_sq": acc["g_small_sq"] / k.astype(jnp.float32),
                   **{f"aux/{n}": v for n, v in acc["aux"]["losses"].items()},
                   **{f"model/{n}": v for n, v in acc["aux"]["metrics"].items()}}
        if z_loss:
            metrics["z_loss"] = acc["z"] / total_weight
        finite = guard_lib.is_finite(loss, grad_norm, metrics.get("z_loss", 0.0))
        params, opt_state, model_state = guard_lib.keep_if_finite(
            finite, (params, opt_state, acc["model_state"]),
            (state.params, state.opt_state, state.model_state))
        metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=model_state), metrics

    return apply_step


class RampStepper:
    """The host side of a ramped step: (state, rows of k micro-batches) -> (state, metrics).

    `to_device(micro_batch)` places one micro-batch (e.g. `distributed.global_batch`);
    `shardings` = (state shardings, batch sharding, replicated sharding) pins every jitted
    input and output (None: let jit infer them, fine on one device). The controller observes
    each step's loss and gradient norms right away (one small device->host transfer per step),
    so the next batch is drawn with the new k."""

    def __init__(self, model, tx, schedule, controller: RampController, *, z_loss: float = 0.0,
                 seed: int = 0, to_device: Callable = lambda b: b, shardings=None):
        self.controller, self.to_device = controller, to_device
        micro = make_micro_step(model, z_loss=z_loss, seed=seed)
        apply = make_apply_step(tx, schedule, z_loss=z_loss)

        def zero(params, model_state, micro_batch):
            return zero_accumulator(model, params, model_state, micro_batch)

        if shardings is None:
            self.zero = jax.jit(zero)
            self.micro_step = jax.jit(micro, donate_argnums=(0,))
            self.apply_step = jax.jit(apply, donate_argnums=(0,))
            return
        state_sh, batch_sh, rep = shardings
        acc_sh = {"grads": state_sh.params, "ce": rep, "z": rep, "g_small_sq": rep,
                  "model_state": state_sh.model_state, "aux": rep}
        self.zero = jax.jit(zero, in_shardings=(state_sh.params, state_sh.model_state, batch_sh),
                            out_shardings=acc_sh)
        self.micro_step = jax.jit(micro, in_shardings=(acc_sh, state_sh.params, batch_sh, rep,
                                                       rep, rep, rep),
                                  out_shardings=acc_sh, donate_argnums=(0,))
        self.apply_step = jax.jit(apply, in_shardings=(state_sh, acc_sh, rep, rep, rep),
                                  out_shardings=(state_sh, rep), donate_argnums=(0,))

    def __call__(self, state, rows: dict):
        micro_rows = self.controller.micro_rows // jax.process_count()  # this process's rows
        k = len(rows["inputs"]) // micro_rows
        step = int(state.step)
        local_weight = float(np.sum(rows["loss_mask"]))
        total_weight = np.float32(max(_all_processes_sum(local_weight), 1.0))
        acc = None
        for i in range(k):
            micro = self.to_device({key: v[i * micro_rows:(i + 1) * micro_rows]
                                    for key, v in rows.items()})
            if acc is None:
                acc = self.zero(state.params, state.model_state, micro)
            acc = self.micro_step(acc, state.params, micro, np.int32(step), np.int32(i),
                                  total_weight, np.int32(k))
        lr_scale = self.controller.state.lr_scale
        state, metrics = self.apply_step(state, acc, total_weight, np.int32(k),
                                         np.float32(lr_scale))
        self.controller.observe(step, k, float(metrics["loss"]), float(metrics["g_small_sq"]),
                                float(metrics["g_big_sq"]))
        metrics = dict(metrics)
        metrics.update(self.controller.metrics(k, lr_scale))
        return state, metrics


def _all_processes_sum(value: float) -> float:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return float(np.sum(multihost_utils.process_allgather(np.float32(value))))
