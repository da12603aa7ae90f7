"""The non-finite guard: a step whose loss or gradient norm is NaN/Inf changes nothing.

Inside the jitted step (`keep_if_finite`): the new params, optimizer state and model state are
selected with `jnp.where(finite, new, old)` leaf by leaf. XLA fuses the select into the
optimizer's elementwise update, so a normal step costs the same (benchmarks/nonfinite_guard.py
measures it). What a skipped step does and does not advance:

  * `state.step` advances: it counts batches consumed, so the data position (the iterator has
    moved past the bad batch, which is not retried — a poisoned batch would fail again) and
    the per-step RNG `fold_in(seed, step)` move on exactly as in a run where the step was good.
  * The optimizer state does not: its own step count (which drives the learning-rate
    schedule and Adam's bias correction) stays where it was, as with optax.apply_if_finite.
    A run that skipped batch k therefore ends with the params of a run whose data stream never
    contained batch k (for models that draw no randomness; MoE router jitter keys on
    `state.step` and differs after the skip).

On the host (`NonFiniteTracker`), the loop counts skipped steps and the current streak of
consecutive ones, logs each, and stops the run after `limit` in a row (`NonFiniteError`).
Periodic checkpoints are not written during a streak, so the newest one on disk is from before
it. The total and the streak are saved in each checkpoint's meta and restored on resume.

Test hook: `JAXLM_POISON_STEPS=7,30-39` makes the loop set the loss mask of those steps'
batches to NaN after it has logged them — a poisoned batch entering the real step, nothing
mocked.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

POISON_ENV = "JAXLM_POISON_STEPS"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm; one line."""


def is_finite(*scalars) -> jax.Array:
    ok = jnp.array(True)
    for x in scalars:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def keep_if_finite(finite: jax.Array, new, old):
    """`new` where `finite`, else `old`, leaf by leaf (same tree structure)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def max_consecutive(train_cfg) -> int:
    """train.max_nonfinite_steps (0: never stop)."""
    return int(train_cfg.max_nonfinite_steps)


class NonFiniteTracker:
    """Host-side bookkeeping of skipped steps; `observe` is called once per finished step."""

    def __init__(self, limit: int, total: int = 0, streak: int = 0):
        self.limit, self.total, self.streak = limit, total, streak

    def observe(self, nonfinite: bool) -> bool:
        """Records one finished step; returns whether it was skipped."""
        if not nonfinite:
            self.streak = 0
            return False
        self.total += 1
        self.streak += 1
        return True

    def exceeded(self) -> bool:
        return bool(self.limit) and self.streak >= self.limit

    def error(self, step: int, last_checkpoint: str | None) -> NonFiniteError:
        """The error that stops the run after step `step` (the step count after it)."""
        kept = (f"the newest checkpoint, {last_checkpoint}, is from before them"
                if last_checkpoint else "no checkpoint had been written")
        return NonFiniteError(
            f"{self.streak} consecutive steps with a non-finite loss or gradient norm (steps "
            f"{step - self.streak + 1}-{step}; train.max_nonfinite_steps={self.limit}): "
            f"stopped; {kept}; lower the learning rate or check the data of those steps")

    def state(self) -> dict:
        return {"skipped_steps": self.total, "nonfinite_streak": self.streak}

    @classmethod
    def from_meta(cls, limit: int, meta: dict | None) -> "NonFiniteTracker":
        meta = meta or {}
        return cls(limit, int(meta.get("skipped_steps", 0)), int(meta.get("nonfinite_streak", 0)))


def poison_steps(environ=os.environ) -> frozenset[int]:
    """Steps listed in $JAXLM_POISON_STEPS ('7', '7,9', '30-39'; 0-based step indices)."""
    text = environ.get(POISON_ENV, "").strip()
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            steps.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
        except ValueError:
            raise ValueError(f"{POISON_ENV}={text!r}: expected step indices like '7,30-39'") \
                from None
    return frozenset(steps)


def poison(batch: dict) -> dict:
    """The batch with a NaN loss mask: its loss and every gradient become NaN."""
    return {**batch, "loss_mask": np.full_like(np.asarray(batch["loss_mask"]), np.nan)}
