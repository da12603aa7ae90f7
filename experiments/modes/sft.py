"""--mode sft: supervised fine-tuning on align.path's {prompt, completion} rows.

    launch.py --mode sft --config experiments/configs/sft.py --workdir runs/sft

The loss is on completion tokens only (the prompt is context; jaxlm/data/preference.py has the
row layout and the truncation rule). Everything else — resume, checkpoints, evaluation on the
held-out rows, SIGTERM, --overwrite / --resume — is --mode train's; train.objective is set to
'sft' whatever the config says.
"""

from experiments.modes import train as _train_flags  # noqa: F401  (--overwrite, --resume, ...)


def run(ctx) -> None:
    run_objective(ctx, "sft")


def run_objective(ctx, objective: str, prepare=None) -> None:
    """Trains the config with train.objective = `objective`; `prepare(cfg, workdir)` may seed
    the run directory first."""
    if not ctx.config_given:
        ctx.fail(f"--mode {objective} needs --config")
    if ctx.flags.overwrite and ctx.flags.resume:
        ctx.fail("--resume and --overwrite: expected at most one of them")
    from jaxlm.schema import replace
    cfg = ctx.config()
    cfg = replace(cfg, train=replace(cfg.train, objective=objective))
    from jaxlm.parallel import distributed
    from jaxlm.train import loop
    if prepare is not None:
        prepare(cfg, ctx.workdir)
    summary = loop.train(cfg, ctx.workdir, overwrite=ctx.flags.overwrite,
                         resume=ctx.flags.resume, batch_log=ctx.flags.log_batch_hashes)
    if summary["preempted"] or not distributed.is_main_process():
        return
    if summary["eval_loss"] is None:
        print(f"nothing to train: the run is at step {summary['step']} >= train.steps="
              f"{cfg.train.steps}")
    else:
        what = "DPO loss per pair" if objective == "dpo" else "completion loss, nats/token"
        print(f"final held-out {what}: {summary['eval_loss']:.4f}")
