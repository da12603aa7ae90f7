"""--mode eval: the workdir's newest checkpoint through every evaluation, as one JSON line:
held-out perplexity, bits per byte and loss (next to the unigram baseline), HumanEval pass@1
(greedy, sandboxed) and HumanEval single-line infilling exact match (jaxlm.evals.model_eval).

    python experiments/launch.py --mode eval --workdir runs/quickstart --humaneval_limit=20

Prompts and completions fit in --eval_context positions (default data.seq_len, the longest
context the model was trained on); completion lengths are capped to half (HumanEval) and a
quarter (infilling) of it so any run directory evaluates with the defaults.
"""

import dataclasses
import json
import sys

from absl import flags

flags.DEFINE_integer("humaneval_limit", None, "eval: the first N HumanEval problems (default: "
                     "all 164; 0 skips HumanEval)")
flags.DEFINE_integer("infill_limit", None, "eval: infill every line of the first N problems' "
                     "canonical solutions (default: all 164, 1033 lines; 0 skips)")
flags.DEFINE_integer("eval_batch_size", 16, "eval: prompts generated together")
flags.DEFINE_integer("humaneval_max_new_tokens", 128, "eval: HumanEval completion tokens (at "
                     "most half the context)")
flags.DEFINE_integer("infill_max_new_tokens", 32, "eval: infilled-line tokens (at most a quarter "
                     "of the context)")
flags.DEFINE_integer("eval_context", None, "eval: positions per prompt + completion (default "
                     "data.seq_len)")
flags.DEFINE_integer("eval_workers", 2, "eval: sandboxed programs run at once")


def progress(message: str) -> None:
    """Progress on stderr: stdout carries the one JSON line."""
    print(message, file=sys.stderr, flush=True)


def run(ctx) -> None:
    cfg = ctx.config()
    f = ctx.flags
    from jaxlm.data import pipeline
    from jaxlm.evals.model_eval import EvalSettings, check_checkpoint_model, evaluate_model
    from jaxlm.parallel import distributed, sharding
    from jaxlm.train import loop

    context = f.eval_context if f.eval_context is not None else cfg.data.seq_len
    if not 4 <= context <= cfg.model.max_seq_len:
        ctx.fail(f"--eval_context={context}: expected 4 .. model.max_seq_len="
                 f"{cfg.model.max_seq_len}")
    settings = EvalSettings(
        humaneval_limit=f.humaneval_limit, infill_limit=f.infill_limit,
        batch_size=f.eval_batch_size,
        max_new_tokens=min(f.humaneval_max_new_tokens, context // 2),
        infill_max_new_tokens=min(f.infill_max_new_tokens, context // 4),
        context=context, workers=f.eval_workers)
    settings.validate()
    if ctx.config_given:
        check_checkpoint_model(loop.config_to_dict(cfg)["model"], ctx.workdir)
    run_, state = loop.restore_for_inference(cfg, ctx.workdir)
    batches = pipeline.take(pipeline.heldout_dataset(cfg.data, run_.tokenizer),
                            cfg.train.eval_batches)
    variables = {"params": state.params, **state.model_state}
    single = distributed.is_single_process()
    if not single:
        # Perplexity runs on the global mesh; generation on process 0's devices alone.
        settings = dataclasses.replace(settings, humaneval_limit=0, infill_limit=0)
    result = evaluate_model(
        run_.model, variables, run_.tokenizer, batches, settings,
        generator_kwargs=dict(mesh=run_.mesh, rules=run_.rules),
        perplexity_kwargs=dict(
            put=lambda b: distributed.replicated_batch(b, run_.batch_sharding),
            get=distributed.to_host,
            tracing_context=lambda: sharding.activation_sharding(run_.mesh, run_.rules)),
        log=progress if distributed.is_main_process() else lambda message: None)
    if not single and (f.humaneval_limit != 0 or f.infill_limit != 0):
        host = distributed.to_host(variables)
        if distributed.is_main_process():
            generation = dataclasses.replace(settings, humaneval_limit=f.humaneval_limit,
                                             infill_limit=f.infill_limit)
            extra = evaluate_model(run_.model, host, run_.tokenizer, None, generation,
                                   log=progress)
            seconds = dict(result.pop("seconds"), **extra.pop("seconds"))
            result.update(extra, seconds=seconds)
    unigram = pipeline.unigram_cross_entropy(pipeline.open_documents(cfg.data, "train"),
                                             run_.tokenizer, batches, cfg.model.vocab_size)
    result = dict(step=int(state.step), eval_loss=result["nats_per_token"],
                  unigram_loss=unigram, **result)
    if distributed.is_main_process():
        print(json.dumps(result))
