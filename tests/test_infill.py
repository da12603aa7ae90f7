"""FIM infilling and batched text generation on a tiny byte-level model."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm.data.tokenizers import EOT, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, ByteTokenizer
from jaxlm.infer.decode import Generator
from jaxlm.infer.generate import generate_uncached
from jaxlm.infer.infill import Infiller, fit_parts
from jaxlm.infer.text import TextGenerator
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder, init_params

FAST = {"xla_backend_optimization_level": 0}
TOK = ByteTokenizer()
# vocab = the tokenizer's, so TextGenerator draws from every id, as the uncached reference does
CFG = ModelConfig(vocab_size=TOK.vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, mlp_dim=48, max_seq_len=64, init_std=0.3)
MODEL = Decoder(CFG)
NEW = 6


@pytest.fixture(scope="module")
def variables():
    init = jax.jit(lambda key: nn.unbox(init_params(MODEL, key)), compiler_options=FAST)
    return {"params": init(jax.random.key(2))}


def make_text(variables, batch_size=2, max_context=None):
    gen = Generator(MODEL, variables, prompt_bucket=16, compiler_options=FAST)
    return TextGenerator(gen, TOK, batch_size=batch_size, max_context=max_context)


def test_psm_prompt_from_the_tokenizer_sentinels(variables):
    infill = Infiller(make_text(variables), max_new_tokens=NEW)
    ids = infill.prompt_ids("def f(x):\n    ", "\n    return y\n")
    expected = ([TOK.special_id(FIM_PREFIX)] + list(b"def f(x):\n    ")
                + [TOK.special_id(FIM_SUFFIX)] + list(b"\n    return y\n")
                + [TOK.special_id(FIM_MIDDLE)])
    assert ids.tolist() == expected
    assert sorted(infill.stop_ids) == sorted(TOK.special_id(n) for n in
                                             (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD))


def test_fit_parts_keeps_the_text_nearest_the_hole():
    p, s = np.arange(10), np.arange(100, 120)
    kp, ks = fit_parts(p, s, 12)
    assert kp.tolist() == list(range(4, 10)) and ks.tolist() == list(range(100, 106))
    kp, ks = fit_parts(p[:3], s, 12)  # a short prefix stays whole, the suffix takes the rest
    assert kp.tolist() == [0, 1, 2] and ks.tolist() == list(range(100, 109))
    kp, ks = fit_parts(p, s[:2], 12)
    assert kp.tolist() == list(range(0, 10)) and ks.tolist() == [100, 101]


@pytest.mark.parametrize("sentinel", [FIM_PAD, EOT])
def test_infill_stops_on_eot_or_any_fim_token(variables, sentinel):
    """Rig lm_head so the sentinel replaces the token greedy decoding would emit at its third
    step: the infill must end right before it, equal to the uncached reference cut there."""
    infill = Infiller(make_text(variables), max_new_tokens=NEW)
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    prompt = infill.prompt_ids(prefix, suffix)
    free = generate_uncached(MODEL, variables, prompt, NEW)
    stop = TOK.special_id(sentinel)
    kernel = variables["params"]["lm_head"]["kernel"]
    rigged = jax.tree.map(lambda x: x, variables)
    rigged["params"]["lm_head"]["kernel"] = kernel.at[:, stop].set(kernel[:, free[2]] * 1.5)
    reference = generate_uncached(MODEL, rigged, prompt, NEW, stop_ids=infill.stop_ids)
    assert reference[-1] == stop and len(reference) <= 3
    rigged_infill = Infiller(make_text(rigged), max_new_tokens=NEW)
    middle = rigged_infill(prefix, suffix)
    assert middle == TOK.decode(reference[:-1])
    ids = rigged_infill.text.generate_ids([prompt], NEW, stop_ids=rigged_infill.stop_ids)[0]
    assert ids == reference[:-1]


def test_infill_without_fim_tokens_is_a_one_line_error(variables):
    gen = Generator(MODEL, variables, compiler_options=FAST)
    with pytest.raises(ValueError, match=r"^infill: the tokenizer lacks a FIM special token"):
        Infiller(TextGenerator(gen, ByteTokenizer(special_tokens=(EOT,))))


def test_text_batches_keep_order_and_equal_one_by_one(variables):
    """Five prompts in batches of two (sorted by length, the last batch padded) give what each
    prompt gives alone; a prompt longer than the context keeps its end."""
    text = make_text(variables, batch_size=2, max_context=24)
    prompts = ["a", "import os\n", "def f():", "x = 1\ny = 2\n", "#" * 40 + "tail"]
    together = text(prompts, NEW)
    alone = [text([p], NEW)[0] for p in prompts]
    assert together == alone
    eot = TOK.special_id(EOT)
    for p, out in zip(prompts, together):
        ids = TOK.encode(p)[-(24 - NEW):]
        ref = generate_uncached(MODEL, variables, ids, NEW, stop_ids=[eot])
        assert out == TOK.decode(ref[:-1] if ref[-1] == eot else ref)
    with pytest.raises(ValueError, match=r"max_new_tokens=24: expected < the context of 24"):
        text(prompts, 24)
