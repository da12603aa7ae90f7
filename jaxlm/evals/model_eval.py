"""A trained checkpoint through every evaluation: held-out perplexity and bits per byte,
HumanEval pass@1 (greedy) and HumanEval single-line infilling exact match.

    result = evaluate_model(model, variables, tokenizer, heldout_batches, EvalSettings(...))

All generation goes through one cached `Generator` (batched, prompts sorted by length), so the
164 HumanEval problems and the ~1000 infilling tasks take minutes on a CPU. Prompts longer than
`context` (default: the training sequence length; a model has never seen later positions) keep
the text nearest to where the model writes: the end of a HumanEval prompt, the end of an
infilling prefix and the start of its suffix. Completions run in the sandbox
(jaxlm.evals.sandbox) via jaxlm.evals.humaneval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

from jaxlm.evals.humaneval import build_infilling_tasks, evaluate_humaneval, evaluate_infilling
from jaxlm.evals.humaneval import load_problems
from jaxlm.evals.perplexity import perplexity


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    humaneval_limit: Optional[int] = None  # None: all 164 problems; 0: skip
    infill_limit: Optional[int] = None  # problems whose lines are infilled (None: all; 0: skip)
    batch_size: int = 16
    max_new_tokens: int = 128  # HumanEval completion length
    infill_max_new_tokens: int = 32  # one line
    context: Optional[int] = None  # positions per prompt + completion (None: model.max_seq_len)
    workers: int = 2  # sandboxed programs run at once
    timeout_s: float = 10.0

    def validate(self) -> None:
        for name in ("humaneval_limit", "infill_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r}: expected None (all problems), 0 (skip) or "
                                 "a positive int")
        for name in ("batch_size", "max_new_tokens", "infill_max_new_tokens", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")


def check_checkpoint_model(model_cfg: dict, workdir: str) -> None:
    """One-line ValueError when the workdir's run (its config.json) is another model than
    `model_cfg` (a dict of ModelConfig fields): another family first, else the first field
    that differs. A workdir without config.json is not checked."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("model", {})
    if saved.get("family") != model_cfg.get("family"):
        raise ValueError(f"model.family={model_cfg.get('family')!r}: the checkpoint in "
                         f"{workdir} is a {saved.get('family')!r} model; expected the config "
                         "it was trained with (omit --config to use it)")
    for key in sorted(set(saved) | set(model_cfg)):
        if saved.get(key) != model_cfg.get(key):
            raise ValueError(f"model.{key}={model_cfg.get(key)!r}: the checkpoint in {workdir} "
                             f"has model.{key}={saved.get(key)!r}; expected the config it was "
                             "trained with (omit --config to use it)")


def humaneval_pass_at_1(text_generator, settings: EvalSettings) -> dict:
    """Greedy pass@1 over the first `humaneval_limit` problems."""
    def generate(prompts):
        return text_generator(prompts, settings.max_new_tokens)
    problems = load_problems(settings.humaneval_limit)
    result = evaluate_humaneval(generate, n_samples=1, ks=(1,), limit=settings.humaneval_limit,
                                batch_size=len(problems), workers=settings.workers,
                                timeout_s=settings.timeout_s)
    return result["aggregate"]


def infill_exact_match(infiller, settings: EvalSettings) -> dict:
    """Single-line infilling exact match over the lines of the first `infill_limit` problems;
    every middle is generated up front in batches, then scored by the harness."""
    tasks = build_infilling_tasks(load_problems(settings.infill_limit))
    pairs = list(dict.fromkeys((t.prefix, t.suffix) for t in tasks))
    middles = dict(zip(pairs, infiller.batch(pairs)))
    result = evaluate_infilling(lambda prefix, suffix: middles[(prefix, suffix)],
                                limit=settings.infill_limit)
    return result["aggregate"]


def evaluate_model(model, variables: dict, tokenizer, heldout_batches: Optional[list[dict]],
                   settings: EvalSettings, *, generator_kwargs: Optional[dict] = None,
                   perplexity_kwargs: Optional[dict] = None,
                   log: Callable[[str], None] = lambda message: None) -> dict:
    """Flat dict of every metric (see the module docstring) and the seconds each took;
    heldout_batches None skips perplexity, a limit of 0 skips that generation task."""
    from jaxlm.infer.decode import Generator
    from jaxlm.infer.infill import Infiller
    from jaxlm.infer.text import TextGenerator

    settings.validate()
    out: dict = {}
    seconds = {}
    if heldout_batches is not None:
        start = time.perf_counter()
        ppl = perplexity(model, variables, heldout_batches, tokenizer,
                         **(perplexity_kwargs or {}))
        seconds["perplexity"] = time.perf_counter() - start
        out.update(perplexity=ppl["perplexity"], nats_per_token=ppl["nats_per_token"],
                   bits_per_byte=ppl["bits_per_byte"], heldout_tokens=ppl["tokens"],
                   heldout_bytes=ppl["bytes"])
        log(f"perplexity {ppl['perplexity']:.4f}, {ppl['bits_per_byte']:.4f} bits/byte")
    if settings.humaneval_limit == 0 and settings.infill_limit == 0:
        out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        return out

    generator = Generator(model, variables, **(generator_kwargs or {}))
    text = TextGenerator(generator, tokenizer, batch_size=settings.batch_size,
                         max_context=settings.context)
    if settings.humaneval_limit != 0:
        start = time.perf_counter()
        he = humaneval_pass_at_1(text, settings)
        seconds["humaneval"] = time.perf_counter() - start
        out.update({"humaneval_pass@1": he["pass@1"], "humaneval_problems": he["num_problems"],
                    "humaneval_statuses": he["statuses"]})
        log(f"HumanEval pass@1 {he['pass@1']:.4f} over {he['num_problems']} problems")
    if settings.infill_limit != 0:
        start = time.perf_counter()
        infiller = Infiller(text, max_new_tokens=settings.infill_max_new_tokens)
        fim = infill_exact_match(infiller, settings)
        seconds["infilling"] = time.perf_counter() - start
        out.update(infill_exact_match=fim["exact_match"], infill_tasks=fim["num_tasks"],
                   infill_problems=fim["num_problems"])
        log(f"infilling exact match {fim['exact_match']:.4f} over {fim['num_tasks']} lines")
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return out
