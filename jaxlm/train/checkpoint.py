"""Checkpoints with orbax: train state (sharded arrays), data-iterator state and metadata.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items:
  state  the TrainState (step, params, optimizer state, model state) via StandardSave
  data   the grain iterator state (JSON), so a resumed run sees the same batches
  meta   the config and anything else needed to rebuild the run (JSON)
Restoring takes an abstract target whose leaves carry shardings, so a checkpoint saved on one
mesh restores onto another.

Crash safety. orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it into
place when complete, so a process killed mid-write leaves a temporary directory, never a
half-written `<step>/`. A finished checkpoint can still go bad later (a truncated file, a
deleted item, a config whose shapes no longer match), and orbax's manager copes badly with
both: it counts any directory named like a step (even an empty one) as the newest checkpoint,
refuses to save at or below it, and lets keep-N rotate good checkpoints out in favour of it.
So `find_restorable` looks at the directory *before* any manager opens it: newest first, each
checkpoint is restored in full (that is the only check that reads every byte) and the first that
restores on every process wins. Bad and incomplete checkpoints are reported with the reason
and, when training resumes, moved by `quarantine` into `<workdir>/bad_checkpoints/` — out of
the manager's sight, never deleted. If finished checkpoints exist and none restores, it is an
error: a run must not silently start again from scratch next to its own saved work.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.parallel import distributed

ITEMS = ("state", "data", "meta")
BAD_CHECKPOINTS = "bad_checkpoints"  # beside checkpoints/ in the workdir
_STEP_NAME = re.compile(r"^(0|[1-9][0-9]*)$")
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; one line naming the directory."""


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split(" See full TensorStore details")[0]  # a repr of a bound method follows
    return text if len(text) <= limit else text[:limit] + "..."


def _from_failed_read(exc: BaseException | None, obj: Any = None) -> bool:
    """Whether an exception reported outside any caller is debris of a failed orbax read."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True  # a TensorStore read finishing after orbax closed its event loop
    code = getattr(obj, "cr_code", None) or getattr(getattr(obj, "get_coro", None) and
                                                    obj.get_coro(), "cr_code", None)
    return code is not None and "orbax" in code.co_filename


class _ReadDebrisFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        never_retrieved = "exception was never retrieved" in record.getMessage()
        return not (never_retrieved and (exc is None or "TensorStore" in str(exc)
                                         or "OCDBT" in str(exc) or _from_failed_read(exc)))


_debris_silenced = False


def _silence_read_debris() -> None:
    """After a failed read, orbax's concurrent reads of the other arrays are still in flight:
    when they finish, after orbax closed its event loop, Python prints "Event loop is closed"
    tracebacks and asyncio logs "Task exception was never retrieved" with pages of TensorStore
    spec — at a random later moment, often after our one-line error. We already reported the
    failure, so from the first read on, exactly these reports are dropped (installed
    once; everything else still reaches the previous hooks). TensorStore reports a callback
    that raised through `PyErr_Print`, which calls `sys.excepthook`, so both hooks filter."""
    global _debris_silenced
    if _debris_silenced:
        return
    _debris_silenced = True
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable):
        if not _from_failed_read(unraisable.exc_value, unraisable.object):
            previous_unraisable(unraisable)

    def except_hook(kind, value, traceback):
        if not _from_failed_read(value):
            previous_except(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    # a failed read's pending per-shard reads, freed unawaited: only orbax's coroutine of that
    # name, so a "never awaited" warning from the caller's own code still shows
    warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was never "
                            "awaited", RuntimeWarning)
    logging.getLogger("asyncio").addFilter(_ReadDebrisFilter())


@contextmanager
def _quiet_orbax():
    """orbax logs its own view of a failed read as absl warnings; we report one line instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=ITEMS)

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
        data_state holds every process's entry (`distributed.unpack_process_state`).
        Raises CheckpointError naming the checkpoint and what is wrong with it."""
        return restore_step(os.path.join(self.directory, str(step)), abstract_state)

    def restore_meta(self, step: int) -> dict:
        with _quiet_orbax():
            return _restore_json(epath.Path(self.directory) / str(step), "meta")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


# ---- reading one checkpoint, checked --------------------------------------------------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'params/embed/embedding' -> (shape, dtype) for every array leaf; dataclass fields,
    namedtuple fields, dict keys and tuple indices all read as path components, so a
    TrainState and orbax's metadata of its checkpoint give the same names."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out["/".join(_key_name(k) for k in path)] = (tuple(shape), str(leaf.dtype))
    return out


def check_shapes(stored: dict, wanted: dict) -> str | None:
    """The first difference between two `_leaf_shapes` maps, as a phrase (None if equal)."""
    for name in sorted(wanted):
        if name not in stored:
            return f"{name} is missing"
        if stored[name][0] != wanted[name][0]:
            return (f"{name} has shape {list(stored[name][0])}, expected "
                    f"{list(wanted[name][0])}")
    extra = sorted(set(stored) - set(wanted))
    if extra:
        return f"{extra[0]} is not part of this config's train state"
    return None


def _restore_json(step_dir: epath.Path, item: str) -> dict:
    handler = ocp.CompositeCheckpointHandler()
    args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
    value = handler.restore(step_dir, args=args)[item]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"item '{item}' holds {type(value).__name__}, expected a JSON "
                              "object")
    return dict(value)


def restore_step(path: str, abstract_state) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of the checkpoint directory `path`, every item checked.

    Raises CheckpointError("<path>: <what is wrong>"). Reads only: this process's shards,
    no cross-process barrier (so a failure on one process cannot hang the others)."""
    try:
        return _restore_checked(epath.Path(path), abstract_state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _restore_checked(step_dir: epath.Path, abstract_state):
    """restore_step's work; CheckpointError messages here say what, the caller adds where."""
    if not step_dir.is_dir():
        raise CheckpointError("not a directory")
    missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
    if missing:
        raise CheckpointError(f"item '{missing[0]}' is missing (an interrupted or damaged "
                              "checkpoint)")
    results, failure = {}, None
    _silence_read_debris()  # before the read: its debris can come while it is still failing
    with _quiet_orbax():
        try:
            stored = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
        except Exception as e:  # noqa: BLE001
            failure = f"item 'state': unreadable metadata ({_one_line(e)})"
        if failure is None:
            problem = check_shapes(_leaf_shapes(stored), _leaf_shapes(abstract_state))
            if problem:
                failure = f"item 'state': {problem}"
        for item in ITEMS if failure is None else ():
            try:
                if item == "state":
                    handler = ocp.CompositeCheckpointHandler()
                    results[item] = handler.restore(step_dir, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))["state"]
                else:
                    results[item] = _restore_json(step_dir, item)
            except CheckpointError as e:
                failure = str(e)
            except Exception as e:  # noqa: BLE001
                failure = f"item '{item}': {_one_line(e)}"
            if failure is not None:
                break
    if failure is not None:
        gc.collect()  # frees the failed read's coroutines now, while the filter is in place
        raise CheckpointError(failure)
    meta_step = results["meta"].get("step")
    state_step = int(results["state"].step)
    if meta_step is not None and int(meta_step) != state_step:
        raise CheckpointError(f"item 'meta' says step {meta_step} but the state is at step "
                              f"{state_step}")
    if step_dir.name.isdigit() and int(step_dir.name) != state_step:
        raise CheckpointError(f"the state is at step {state_step}, not {step_dir.name}")
    return results["state"], results["data"], results["meta"]


# ---- finding the newest restorable checkpoint -----------------------------------------------

@dataclasses.dataclass
class Listing:
    steps: list[int]        # finished checkpoints (directories named by their step), ascending
    incomplete: list[str]   # paths of interrupted writes (orbax temporary directories)


def list_checkpoints(directory: str) -> Listing:
    """What is in `directory` without opening any of it (no orbax manager involved)."""
    if not os.path.isdir(directory):
        return Listing([], [])
    steps, incomplete = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _STEP_NAME.match(name):
            steps.append(int(name))
        elif _TMP_MARK in name:
            incomplete.append(path)
    return Listing(sorted(steps), incomplete)


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict
    bad: list[tuple[str, str]]   # (path, reason) of newer checkpoints that did not restore
    incomplete: list[str]        # interrupted writes found beside them


def find_restorable(directory: str, abstract_state, *,
                    accept: Callable[[Any, dict, dict], None] | None = None) -> Restored | None:
    """The newest checkpoint in `directory` that restores (and that `accept(state, data_state,
    meta)` does not reject by raising), with the reasons newer ones were skipped.

    None when `directory` holds no finished checkpoint (a fresh run). Raises CheckpointError
    when it holds some and none restores — nothing is moved or written in that case. Every
    process calls this; a checkpoint counts only if it restores on all of them."""
    listing = list_checkpoints(directory)
    bad: list[tuple[str, str]] = []
    for step in reversed(listing.steps):
        path = os.path.join(directory, str(step))
        reason = None
        try:
            state, data_state, meta = _restore_checked(epath.Path(path), abstract_state)
            if accept is not None:
                accept(state, data_state, meta)
        except CheckpointError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 — accept() rejected it (e.g. a data state of
            reason = _one_line(e)  # another pipeline), or orbax failed in a way not seen yet
        reasons = [r for r in distributed.allgather_json(reason) if r is not None]
        if not reasons:
            return Restored(step, state, data_state, meta, bad, listing.incomplete)
        bad.append((path, reasons[0]))
    if not listing.steps:
        return None
    path, reason = bad[0]
    more = f" and {len(bad) - 1} older one(s) did not restore either" if len(bad) > 1 else ""
    raise CheckpointError(f"no restorable checkpoint in {directory}: {path}: {reason}{more}; "
                          "nothing was changed (fix the config, or use a new --workdir)")


def quarantine(paths: list[str], workdir: str) -> list[tuple[str, str]]:
    """Moves checkpoint directories into `<workdir>/bad_checkpoints/` (process 0 moves, every
    process waits for it); returns (old, new) paths. Names that are taken get a suffix."""
    moved = []
    if distributed.is_main_process() and paths:
        target_dir = os.path.join(workdir, BAD_CHECKPOINTS)
        os.makedirs(target_dir, exist_ok=True)
        for path in paths:
            name = os.path.basename(path.rstrip("/"))
            target, n = os.path.join(target_dir, name), 1
            while os.path.exists(target):
                target, n = os.path.join(target_dir, f"{name}.{n}"), n + 1
            os.rename(path, target)
            moved.append((path, target))
    if not distributed.is_single_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxlm:quarantine")
        moved = [tuple(pair) for pair in distributed.allgather_json(moved)[0]]
    return moved
