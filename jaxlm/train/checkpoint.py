"""Checkpoints with orbax: train state (sharded arrays), data-iterator state and metadata.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items:
  state  the TrainState (step, params, optimizer state, model state) via StandardSave
  data   the grain iterator state (JSON), so a resumed run sees the same batches
  meta   the config and anything else needed to rebuild the run (JSON)
Restoring takes an abstract target whose leaves carry shardings, so a checkpoint saved on one
mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.parallel import distributed


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def save(self, step: int, state, data_state: dict | None, meta: dict,
             force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether it saved.
        In a multi-process run every process calls this; each one's data state is kept."""
        if not force and not self.manager.should_save(step):
            return False
        data_state = distributed.pack_process_state(data_state or {})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of checkpoint `step`, placed per `abstract_state`'s
        shardings (a pytree of jax.ShapeDtypeStruct with .sharding). A multi-process run's
        data_state holds every process's entry (`distributed.unpack_process_state`)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def restore_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
