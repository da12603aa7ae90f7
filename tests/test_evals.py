"""Perplexity / bits per byte against a direct float64 computation, and the model-evaluation
wiring (HumanEval pass@1, infilling exact match, the checkpoint-model check)."""

import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm.data.tokenizers import EOT, ByteTokenizer
from jaxlm.evals.humaneval import build_infilling_tasks, load_problems
from jaxlm.evals.model_eval import (EvalSettings, check_checkpoint_model, evaluate_model,
                                    humaneval_pass_at_1, infill_exact_match)
from jaxlm.evals.perplexity import perplexity, text_perplexity
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder, init_params

FAST = {"xla_backend_optimization_level": 0}
TOK = ByteTokenizer()
CFG = ModelConfig(vocab_size=264, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=48, max_seq_len=64, init_std=0.1)
MODEL = Decoder(CFG)
SEQ = 16


@pytest.fixture(scope="module")
def variables():
    init = jax.jit(lambda key: nn.unbox(init_params(MODEL, key)), compiler_options=FAST)
    return {"params": init(jax.random.key(3))}


APPLY = jax.jit(MODEL.apply, compiler_options=FAST)


def direct_nats(variables, inputs, targets):
    """Σ -log p(target) in float64 from the model's logits (inputs zero-padded to one window:
    the model is causal, so the padding after them is never seen)."""
    padded = np.zeros((1, SEQ), np.int32)
    padded[0, :len(inputs)] = inputs
    logits, _ = APPLY(variables, padded)
    logits = np.asarray(logits[0, :len(inputs)], np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return sum(log_z[i] - logits[i, t] for i, t in enumerate(targets))


def test_text_perplexity_and_bits_per_byte_equal_a_direct_computation(variables):
    """Texts with multi-byte characters, one longer than a window: nats summed window by
    window in float64, bytes are the texts' UTF-8 lengths (the end-of-text context is free)."""
    texts = ["déjà vu: naïve café\n", "x = 1\n" * 5]
    nats, tokens = 0.0, 0
    for text in texts:
        ids = [TOK.special_id(EOT)] + TOK.encode(text).tolist()
        for start in range(0, len(ids) - 1, SEQ):
            window = ids[start:start + SEQ + 1]
            nats += direct_nats(variables, window[:-1], window[1:])
            tokens += len(window) - 1
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    result = text_perplexity(MODEL, variables, texts, TOK, SEQ)
    assert result["tokens"] == tokens and result["bytes"] == text_bytes == tokens
    np.testing.assert_allclose(result["nats_per_token"], nats / tokens, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(nats / tokens), rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], nats / (math.log(2) * text_bytes),
                               rtol=1e-5)


def test_perplexity_counts_masked_targets_and_zero_byte_specials(variables):
    """A pipeline-style batch: masked targets are skipped, an <|endoftext|> target costs nats
    but stands for no bytes."""
    eot = TOK.special_id(EOT)
    row = [eot] + list(b"ab") + [eot] + list(b"cd") + [eot] + [0] * 10
    inputs, targets = np.asarray([row[:SEQ]]), np.asarray([row[1:SEQ + 1]])
    mask = np.asarray([[1.0] * 6 + [0.0] * (SEQ - 6)], np.float32)
    result = perplexity(MODEL, variables, [{"inputs": inputs, "targets": targets,
                                            "loss_mask": mask}], TOK)
    nats = direct_nats(variables, row[:6], row[1:7])
    assert result["tokens"] == 6 and result["bytes"] == 4
    np.testing.assert_allclose(result["bits_per_byte"], nats / (math.log(2) * 4), rtol=1e-5)
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(MODEL, variables, [{"inputs": inputs, "targets": targets,
                                       "loss_mask": mask * 0}], TOK)


class Oracle:
    """A text generator / infiller that answers with the canonical solutions."""

    def __init__(self):
        problems = load_problems(2)
        self.solutions = {p.prompt: p.canonical_solution for p in problems}
        self.middles = {(t.prefix, t.suffix): t.middle for t in build_infilling_tasks(problems)}

    def __call__(self, prompts, max_new_tokens):
        return [self.solutions[p] for p in prompts]

    def batch(self, pairs):
        return [self.middles[pair] for pair in pairs]


def test_harness_wiring_scores_an_oracle_perfectly():
    settings = EvalSettings(humaneval_limit=2, infill_limit=2)
    oracle = Oracle()
    he = humaneval_pass_at_1(oracle, settings)
    assert he["pass@1"] == 1.0 and he["num_problems"] == 2
    fim = infill_exact_match(oracle, settings)
    assert fim["exact_match"] == 1.0 and fim["num_tasks"] == len(oracle.middles)


def test_evaluate_model_end_to_end(variables):
    batch = {"inputs": np.asarray([list(b"def f(x):\n  return")[:SEQ]]),
             "targets": np.asarray([list(b"ef f(x):\n  return ")[:SEQ]]),
             "loss_mask": np.ones((1, SEQ), np.float32)}
    settings = EvalSettings(humaneval_limit=1, infill_limit=1, batch_size=4, max_new_tokens=8,
                            infill_max_new_tokens=4, context=32)
    result = evaluate_model(MODEL, variables, TOK, [batch], settings,
                            generator_kwargs=dict(prompt_bucket=16, compiler_options=FAST))
    direct = direct_nats(variables, batch["inputs"][0], batch["targets"][0]) / SEQ
    np.testing.assert_allclose(result["nats_per_token"], direct, rtol=1e-5)
    assert result["humaneval_problems"] == 1 and result["humaneval_pass@1"] == 0.0
    lines = [x for x in load_problems(1)[0].canonical_solution.splitlines() if x.strip()]
    assert result["infill_tasks"] == len(lines) and 0.0 <= result["infill_exact_match"] <= 1.0
    assert set(result["seconds"]) == {"perplexity", "humaneval", "infilling"}
    with pytest.raises(ValueError, match=r"^humaneval_limit=-1: expected None"):
        evaluate_model(MODEL, variables, TOK, None, EvalSettings(humaneval_limit=-1))


def test_checkpoint_of_another_model_is_a_one_line_error(tmp_path):
    saved = {"family": "llama", "num_layers": 2, "embed_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps({"model": saved}))
    check_checkpoint_model(dict(saved), str(tmp_path))  # the same model passes
    with pytest.raises(ValueError) as err:
        check_checkpoint_model(dict(saved, family="mamba2"), str(tmp_path))
    assert str(err.value).startswith("model.family='mamba2': the checkpoint in")
    assert "is a 'llama' model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^model.num_layers=4: the checkpoint in .* has "
                                         r"model.num_layers=2"):
        check_checkpoint_model(dict(saved, num_layers=4), str(tmp_path))
