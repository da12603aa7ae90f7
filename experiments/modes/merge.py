"""--mode merge: merge the newest checkpoints of runs into a new run directory (step 0, fresh
optimizer).

    launch.py --mode merge --merge_inputs runs/a,runs/b --merge_method slerp --slerp_t 0.3 \
        --workdir runs/ab
    launch.py --mode merge --merge_method ties --merge_base runs/base --merge_inputs runs/a,runs/b \
        --ties_density 0.5 --merge_weights 1,0.5 --workdir runs/ties

Methods (jaxlm.surgery.merge): linear (--merge_weights, default uniform), slerp (two inputs,
--slerp_t, optional --slerp_layer_t one value per layer), task_arithmetic (--merge_base,
--merge_weights as the λ of each input, default 1), ties (--merge_base, --ties_density,
--merge_weights, --ties_scale). Every input (and the base) must have the same model config. The
new run takes the first input's config (with --config: all of that file's sections but the
model). Non-parameter state (the MoE selection bias) is the plain mean of the inputs'.
"""

from __future__ import annotations

import json
import os

from absl import flags

METHODS = ("linear", "slerp", "task_arithmetic", "ties")
flags.DEFINE_list("merge_inputs", None, "merge: run directories to merge, comma-separated")
flags.DEFINE_enum("merge_method", "linear", METHODS, "merge: how to combine them")
flags.DEFINE_list("merge_weights", None, "merge: one weight per input (linear / ties weights, "
                  "task_arithmetic λ); default equal")
flags.DEFINE_string("merge_base", None, "merge: base run of task_arithmetic and ties")
flags.DEFINE_float("slerp_t", 0.5, "merge: SLERP position from input 0 (0) to input 1 (1)")
flags.DEFINE_list("slerp_layer_t", None, "merge: SLERP t per layer (overrides --slerp_t on the "
                  "layer stack)")
flags.DEFINE_float("ties_density", 0.5, "merge: TIES fraction of each task vector kept")
flags.DEFINE_float("ties_scale", 1.0, "merge: TIES scale of the merged task vector")


def _floats(values, flag: str):
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--{flag}={','.join(values)}: expected comma-separated numbers") \
            from None


def check_inputs(flags_, count: int) -> None:
    """One-line errors for flag combinations a method cannot use."""
    method = flags_.merge_method
    needs_base = method in ("task_arithmetic", "ties")
    if needs_base and not flags_.merge_base:
        raise ValueError(f"--merge_method={method}: needs --merge_base (the model the inputs "
                         "were fine-tuned from)")
    if not needs_base and flags_.merge_base:
        raise ValueError(f"--merge_base: not used by --merge_method={method}; expected "
                         "task_arithmetic or ties")
    if method == "slerp" and count != 2:
        raise ValueError(f"--merge_inputs: {count} runs; --merge_method=slerp expected exactly 2")
    if method in ("linear",) and count < 2:
        raise ValueError(f"--merge_inputs: {count} run; --merge_method={method} expected >= 2")
    if method == "slerp" and flags_.merge_weights:
        raise ValueError("--merge_weights: not used by --merge_method=slerp (use --slerp_t)")


def merge_params(method: str, params: list, base_params, flags_) -> dict:
    from jaxlm.surgery import merge
    weights = _floats(flags_.merge_weights, "merge_weights")
    if method == "linear":
        return merge.linear(params, weights)
    if method == "slerp":
        return merge.slerp(params[0], params[1], flags_.slerp_t,
                           _floats(flags_.slerp_layer_t, "slerp_layer_t"))
    if method == "task_arithmetic":
        return merge.task_arithmetic(base_params, params, weights)
    return merge.ties(base_params, params, flags_.ties_density, weights, flags_.ties_scale)


def run(ctx) -> None:
    f = ctx.flags
    inputs = list(f.merge_inputs or [])
    if not inputs:
        ctx.fail("--mode merge needs --merge_inputs dir1,dir2,...")
    check_inputs(f, len(inputs))
    from jaxlm.surgery import merge, rundir
    rundir.check_new_workdir(ctx.workdir)
    dirs = inputs + ([f.merge_base] if f.merge_base else [])
    runs = [rundir.read_run(d) for d in dirs]
    try:
        merge.check_same_config([r.cfg.model for r in runs])
    except ValueError as e:
        names = ", ".join(f"{i}: {d}" for i, d in enumerate(dirs))
        raise ValueError(f"{e} (checkpoints {names})") from None
    inputs_runs = runs[:len(inputs)]
    base = runs[-1] if f.merge_base else None
    params = merge_params(f.merge_method, [r.params for r in inputs_runs],
                          base.params if base else None, f)
    model_state = (merge.linear([r.model_state for r in inputs_runs])
                   if any(r.model_state for r in inputs_runs) else {})
    cfg = ctx.config() if ctx.config_given else inputs_runs[0].cfg
    cfg = rundir.with_model(cfg, inputs_runs[0].cfg.model)
    origin = {"mode": "merge", "method": f.merge_method,
              "inputs": [os.path.abspath(d) for d in inputs],
              "steps": [r.step for r in inputs_runs],
              "base": os.path.abspath(f.merge_base) if f.merge_base else None,
              "weights": _floats(f.merge_weights, "merge_weights"),
              "slerp_t": f.slerp_t if f.merge_method == "slerp" else None,
              "ties_density": f.ties_density if f.merge_method == "ties" else None}
    path = rundir.write_run(ctx.workdir, cfg, params, model_state or None, origin=origin)
    print(json.dumps({"workdir": path, "method": f.merge_method, "inputs": len(inputs)}))
