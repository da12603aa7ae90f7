"""--mode generate: continue --prompt from the newest checkpoint with the cached generator
(jaxlm.infer.decode; the same sample ends a training run)."""

from absl import flags

flags.DEFINE_string("prompt", None, "generate: prompt text (default config.generate.prompt)")


def run(ctx) -> None:
    cfg = ctx.config()
    from jaxlm.evals.model_eval import check_checkpoint_model
    from jaxlm.train import loop
    if ctx.config_given:
        check_checkpoint_model(loop.config_to_dict(cfg)["model"], ctx.workdir)
    run_, state = loop.restore_for_inference(cfg, ctx.workdir)
    prompt = ctx.flags.prompt if ctx.flags.prompt is not None else cfg.generate.prompt
    print_sample(run_, state, prompt, cfg)


def sample_text(run, variables: dict, prompt: str, cfg, mesh=None) -> str:
    """The completion of `prompt` by config.generate's settings (stops at end-of-text)."""
    from jaxlm.infer.decode import Generator
    from jaxlm.infer.text import TextGenerator
    if not prompt:
        raise ValueError("generate: prompt='': expected some text to continue")
    g = cfg.generate
    kwargs = dict(mesh=mesh, rules=run.rules) if mesh is not None else {}
    generator = Generator(run.model, variables, **kwargs)
    text = TextGenerator(generator, run.tokenizer, batch_size=1)
    if g.max_new_tokens >= text.max_context:
        raise ValueError(f"generate.max_new_tokens={g.max_new_tokens}: expected < "
                         f"model.max_seq_len={text.max_context}")
    return text([prompt], g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                top_p=g.top_p, seed=g.seed)[0]


def print_sample(run, state, prompt: str, cfg) -> None:
    from jaxlm.parallel import distributed
    variables = {"params": state.params, **state.model_state}
    mesh = run.mesh
    if not distributed.is_single_process():
        # Every process takes part in gathering the weights; process 0 alone then samples on
        # its own devices.
        variables = distributed.to_host(variables)
        mesh = None
        if not distributed.is_main_process():
            return
    completion = sample_text(run, variables, prompt, cfg, mesh)
    print("--- sample ---")
    print(prompt + completion)
