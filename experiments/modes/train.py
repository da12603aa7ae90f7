"""--mode train: train the config in the workdir (resuming from its newest checkpoint)."""

from absl import flags

flags.DEFINE_bool("overwrite", False, "train: start afresh even if the workdir holds another "
                  "experiment's config")


def run(ctx) -> None:
    if not ctx.config_given:
        ctx.fail("--mode train needs --config")
    cfg = ctx.config()
    from jaxlm.parallel import distributed
    from jaxlm.train import loop
    from experiments.modes.generate import print_sample
    summary = loop.train(cfg, ctx.workdir, overwrite=ctx.flags.overwrite)
    if distributed.is_main_process():
        print(f"final held-out loss {summary['eval_loss']:.4f} nats/token "
              f"(unigram baseline {summary['unigram_loss']:.4f})")
    print_sample(summary["run"], summary["state"], cfg.generate.prompt, cfg)
