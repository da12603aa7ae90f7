"""Preemption: SIGTERM / SIGINT ask the training loop to stop after the current step.

    with Preemption() as preemption:
        for step in ...:
            if preemption.requested(step):
                ...save a checkpoint, wait for it, return (the process exits 0)
            ...run the step

A handler only records the signal; the loop polls `requested(step)` once per step, between
steps, so the step in flight finishes and the checkpoint holds a consistent state. A second
SIGINT raises KeyboardInterrupt at once (Ctrl-C twice = abort now); a second SIGTERM is ignored
(the save is already on its way).

Several processes must stop at the *same* step or their collectives (and the checkpoint) would
hang. In a multi-process run, SIGTERM is therefore left to JAX's preemption service (started by
jax.distributed.initialize: a notice to any process reaches all of them, and
`multihost_utils.reached_preemption_sync_point(step)` turns True at the same step everywhere);
SIGINT keeps its default there (KeyboardInterrupt, no checkpoint), as a Ctrl-C reaches one
process only. Handlers can only be installed from the main thread; elsewhere the context is
inert and `requested` is never True.
"""

from __future__ import annotations

import signal
import threading

from jaxlm.parallel import distributed


class Preemption:
    def __init__(self):
        self.received: str | None = None  # name of the first signal
        self._previous: dict[int, object] = {}
        self._multi = False

    def __enter__(self) -> "Preemption":
        self._multi = not distributed.is_single_process()
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = () if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = name

    def requested(self, step: int) -> bool:
        """Whether to stop before running step `step`; every process calls it every step."""
        if self._multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
