"""Run directories seeded from parameters (convert / upscale / merge), and reading one back.

    run = read_run("runs/base")                       # Run(cfg, params, model_state, step)
    new_cfg, new_params = upscale(run.cfg.model, run.params, solar(32, 8))
    write_run("runs/solar", with_model(run.cfg, new_cfg), new_params)

A seeded run directory is exactly what the training loop writes, at step 0:

    <workdir>/config.json                 the full experiment config
    <workdir>/checkpoints/0/{state,data,meta}
        state  TrainState(step=0, params, fresh optimizer state of config.train, model_state)
        data   {}  (empty: the loop starts the data stream afresh)
        meta   {"config": ..., "step": 0, "origin": what it was made from}

so `launch.py --mode train|eval|generate --workdir <workdir>` resume it like any run. The
optimizer state is new (AdamW moments of other weights, or of a shallower stack, mean nothing
for these), and so is the data position.

`write_run` refuses a target that exists and is not empty, checks the parameters against the
model config (one-line error naming the first missing / unexpected / mis-shaped leaf) before
writing anything, writes into a hidden temporary directory beside the target and renames it into
place at the end: a failure leaves no target directory and no temporary one. `read_run` opens
checkpoints read-only and restores only params and model state as NumPy arrays (not the
optimizer moments, which would triple the memory); it never writes to the input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import Config, parse_config
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder
from jaxlm.schema import replace

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


class RunDirError(ValueError):
    """A run directory that cannot be read, or a target that cannot be written."""


class Run(NamedTuple):
    cfg: Config
    params: dict            # NumPy arrays, layout of nn.unbox(init_params(Decoder(cfg.model)))
    model_state: dict       # non-parameter collections (e.g. {'router_state': ...}), may be {}
    step: int               # the checkpoint's step


def with_model(cfg: Config, model: ModelConfig) -> Config:
    """`cfg` with its model section replaced (the whole config is re-validated)."""
    return replace(cfg, model=model)


def config_to_dict(cfg: Config) -> dict:
    from jaxlm.train.loop import config_to_dict as to_dict  # the loop's own serialisation
    return to_dict(cfg)


# ---- abstract trees of a model config --------------------------------------------------------

def _tokens(cfg: ModelConfig):
    return jnp.zeros((1, min(cfg.max_seq_len, 8)), jnp.int32)


@functools.lru_cache(maxsize=8)
def abstract_variables(cfg: ModelConfig) -> tuple[dict, dict]:
    """(params, model_state) of `cfg` as ShapeDtypeStructs; nothing is allocated. Cached per
    config (tracing a hybrid model's init takes seconds): callers must not mutate the trees."""
    model = Decoder(cfg)

    def init(rng):
        return nn.unbox(model.init({"params": rng, "router": rng}, _tokens(cfg)))

    variables = dict(jax.eval_shape(init, jax.random.key(0)))
    params = variables.pop("params")
    return params, variables


def fresh_model_state(cfg: ModelConfig) -> dict:
    """The initial non-parameter collections of `cfg` (e.g. a zero MoE selection bias). Jitted
    so that XLA drops the unused parameter initialisation."""
    model = Decoder(cfg)

    def init(rng):
        variables = nn.unbox(model.init({"params": rng, "router": rng}, _tokens(cfg)))
        return {k: v for k, v in variables.items() if k != "params"}

    return jax.tree.map(np.asarray, jax.jit(init)(jax.random.key(0)))


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def check_tree(got: Mapping, want: Mapping, what: str) -> None:
    """Raises RunDirError naming the first leaf of `want` missing from `got` (or mis-shaped),
    or the first leaf of `got` that `want` does not have."""
    have, need = _flatten(got), _flatten(want)
    for path in sorted(need):
        if path not in have:
            raise RunDirError(f"{what}: missing {'/'.join(path)} (expected by the model config)")
        if tuple(np.shape(have[path])) != tuple(need[path].shape):
            raise RunDirError(f"{what}: {'/'.join(path)} has shape {list(np.shape(have[path]))}, "
                              f"expected {list(need[path].shape)}")
    extra = sorted(set(have) - set(need))
    if extra:
        raise RunDirError(f"{what}: unexpected {'/'.join(extra[0])} for this model config")


# ---- reading ---------------------------------------------------------------------------------

def read_config(workdir: str) -> Config:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{workdir}: no {CONFIG_FILE}; expected a run directory written by "
                          "launch.py")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_config(raw)


@contextlib.contextmanager
def _quiet_absl():
    """orbax warns about opening a directory read-only and about the items (data, meta) we do not
    ask for: both are the point here, so its absl warnings are muted while we read."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(directory: str):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory, item_names=("state",), options=options,
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def read_run(workdir: str, step: Optional[int] = None) -> Run:
    """Config and newest (or `step`'s) params + model state of a run directory, as NumPy."""
    workdir = os.path.abspath(workdir)
    cfg = read_config(workdir)
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise RunDirError(f"{workdir}: no {CHECKPOINTS}/ directory; train it first")
    with _quiet_absl():
        return _read(workdir, cfg, directory, step)


def _read(workdir: str, cfg: Config, directory: str, step: Optional[int]) -> Run:
    import orbax.checkpoint as ocp
    manager = _manager(directory)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise RunDirError(f"{directory}: no checkpoint; train it first")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise RunDirError(f"{directory}: no checkpoint for step {step}; have {sorted(steps)}")
        params, model_state = abstract_variables(cfg.model)
        where = f"{directory}/{step}"
        try:  # the stored tree's names and shapes, checked before any array is read
            stored = manager.item_metadata(step)["state"].tree
        except Exception as e:  # noqa: BLE001 — orbax raises many kinds; report one line
            raise RunDirError(f"{where}: unreadable checkpoint metadata "
                              f"({' '.join(str(e).split())[:200] or type(e).__name__})") from None
        check_tree(stored.get("params", {}), params, f"{where} params")
        target = {"params": params}
        if jax.tree.leaves(model_state):
            target["model_state"] = model_state
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))["state"]
        except Exception as e:  # noqa: BLE001 — orbax raises many kinds; report one line
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise RunDirError(f"{where}: cannot restore the parameters of "
                              f"{workdir}/{CONFIG_FILE}'s model ({first})") from None
    finally:
        manager.close()
    for name, tree in restored.items():
        # partial_restore hands back the target's own placeholder for what the checkpoint lacks
        absent = sorted(p for p, x in _flatten(tree).items() if not isinstance(x, np.ndarray))
        if absent:
            raise RunDirError(f"{where}: no {name} {'/'.join(absent[0])} in the checkpoint, but "
                              f"{workdir}/{CONFIG_FILE}'s model has it")
    check_tree(restored["params"], params, f"{where} params")
    return Run(cfg, dict(restored["params"]), dict(restored.get("model_state", {})), int(step))


# ---- writing ---------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_new_workdir(workdir: str) -> str:
    """The absolute target path; raises if it exists and is not an empty directory."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise RunDirError(f"workdir {workdir}: already exists and is not empty; a new run needs "
                          "a new --workdir (nothing was written)")
    return workdir


def write_run(workdir: str, cfg: Config, params: Mapping, model_state: Optional[Mapping] = None,
              *, origin: Optional[Mapping[str, Any]] = None,
              copy_files: Iterable[str] = ()) -> str:
    """Writes a new run directory whose step-0 checkpoint holds `params` (and `model_state`,
    default: the model's initial one) with a fresh optimizer state; returns its path.

    origin: provenance stored in the checkpoint's meta (e.g. {"mode": "upscale", ...}).
    copy_files: files copied into the run directory as they are (e.g. a tokenizer.json).
    """
    from jaxlm.train import optimizer
    from jaxlm.train.checkpoint import Checkpointer
    from jaxlm.train.state import TrainState

    if jax.process_count() > 1:
        raise RunDirError("write_run: run convert / upscale / merge as a single process (it "
                          "writes host copies of every parameter)")
    workdir = check_new_workdir(workdir)
    copy_files = list(copy_files)
    for path in copy_files:
        if not os.path.isfile(path):
            raise RunDirError(f"copy_files: {path!r} is not a file")
    want_params, want_state = abstract_variables(cfg.model)
    check_tree(params, want_params, "params")
    if model_state is None:
        model_state = fresh_model_state(cfg.model)
    check_tree(model_state, want_state, "model_state")

    def to_device(x, want):
        return jnp.asarray(np.asarray(x), dtype=want.dtype)

    device_params = jax.tree.map(to_device, dict(params), want_params)
    device_state = jax.tree.map(to_device, dict(model_state), want_state)
    tx = optimizer.make_optimizer(cfg.train)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=device_params,
                       opt_state=tx.init(device_params), model_state=device_state)
    meta = {"config": config_to_dict(cfg), "step": 0, "origin": dict(origin or {})}

    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(workdir)}.partial-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a run dir is not
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        checkpointer = Checkpointer(os.path.join(tmp, CHECKPOINTS),
                                    keep=cfg.train.keep_checkpoints, async_save=False)
        try:
            checkpointer.save(0, state, {}, meta, force=True)
        finally:
            checkpointer.close()
        for path in copy_files:
            shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
        os.rename(tmp, workdir)  # atomic; replaces an empty workdir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return workdir
