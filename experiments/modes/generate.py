"""--mode generate: sample a continuation of --prompt from the newest checkpoint."""

from absl import flags

flags.DEFINE_string("prompt", None, "generate: prompt text (default config.generate.prompt)")


def run(ctx) -> None:
    cfg = ctx.config()
    from jaxlm.train import loop
    run_, state = loop.restore_for_inference(cfg, ctx.workdir)
    prompt = ctx.flags.prompt if ctx.flags.prompt is not None else cfg.generate.prompt
    print_sample(run_, state, prompt, cfg)


def print_sample(run, state, prompt: str, cfg) -> None:
    from jaxlm.data.tokenizers import EOT
    from jaxlm.infer.generate import generate_uncached
    from jaxlm.parallel import distributed
    variables = {"params": state.params, **state.model_state}
    if not distributed.is_single_process():
        # Every process takes part in gathering the weights; process 0 alone then samples on
        # its own devices.
        variables = distributed.to_host(variables)
        if not distributed.is_main_process():
            return
    g = cfg.generate
    ids = generate_uncached(run.model, variables, run.tokenizer.encode(prompt), g.max_new_tokens,
                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed,
                            stop_ids=(run.tokenizer.special_id(EOT),))
    print("--- sample ---")
    print(prompt + run.tokenizer.decode(ids))
