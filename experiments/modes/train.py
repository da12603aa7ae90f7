"""--mode train: train the config in the workdir (resuming from its newest good checkpoint).

A SIGTERM or SIGINT stops the run after the current step with a checkpoint (exit status 0);
the same command resumes it. A run stopped by too many consecutive non-finite steps exits with
status 3 (jaxlm/train/guard.py).
"""

import sys

from absl import flags

flags.DEFINE_bool("overwrite", False, "train: start afresh in a workdir that holds another run "
                  "(its files are moved to <workdir>/overwritten/<time>/, not deleted)")
flags.DEFINE_bool("resume", False, "train: continue the workdir's run although its model or "
                  "data config differs from --config (a new data config starts its data stream "
                  "afresh)")
flags.DEFINE_bool("log_batch_hashes", False, "train: append a hash of every training batch to "
                  "<workdir>/batches.jsonl (to compare data order between runs)")
flags.DEFINE_bool("sample", True, "train: print a sample from the final model")


def run(ctx) -> None:
    if not ctx.config_given:
        ctx.fail("--mode train needs --config")
    if ctx.flags.overwrite and ctx.flags.resume:
        ctx.fail("--resume and --overwrite: expected at most one of them")
    cfg = ctx.config()
    from jaxlm.parallel import distributed
    from jaxlm.train import loop
    from jaxlm.train.guard import NonFiniteError
    from experiments.modes.generate import print_sample
    try:
        summary = loop.train(cfg, ctx.workdir, overwrite=ctx.flags.overwrite,
                             resume=ctx.flags.resume, batch_log=ctx.flags.log_batch_hashes)
    except NonFiniteError as e:  # not bad input (exit 2): the run itself diverged
        sys.stderr.write(f"error: {e}\n")
        sys.exit(3)
    if summary["preempted"]:
        return
    if distributed.is_main_process():
        if summary["eval_loss"] is None:
            print(f"nothing to train: the run is at step {summary['step']} >= train.steps="
                  f"{cfg.train.steps}")
        else:
            print(f"final held-out loss {summary['eval_loss']:.4f} nats/token "
                  f"(unigram baseline {summary['unigram_loss']:.4f})")
    if ctx.flags.sample:
        print_sample(summary["run"], summary["state"], cfg.generate.prompt, cfg)
