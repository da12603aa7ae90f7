"""The decoder stack: causality, scan vs layer-by-layer, shapes of the big presets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlm_testing import tiny_model_config

from jaxlm.layers.mlp import Dense
from jaxlm.layers.norms import RMSNorm
from jaxlm.models import presets
from jaxlm.models.decoder import Block, Decoder, init_params


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_model_config(num_layers=3)
    model = Decoder(cfg)
    params = nn.unbox(init_params(model, jax.random.key(0)))
    return cfg, model, params


def test_param_tree_is_stacked_with_logical_names():
    cfg = tiny_model_config(num_layers=3)
    boxed = init_params(Decoder(cfg), jax.random.key(0))
    q = boxed["blocks"]["slot_0"]["attention"]["q_proj"]["kernel"]
    assert q.value.shape == (3, 32, 4, 8)
    assert q.names == ("layers", "embed", "heads", "head_dim")
    for leaf in jax.tree.leaves(boxed["blocks"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert leaf.names[0] == "layers" and leaf.value.shape[0] == 3


def test_causal_gradient_of_later_tokens_is_exactly_zero(tiny):
    cfg, model, params = tiny
    t = 12
    tokens = jnp.arange(t)[None] + 3  # distinct tokens, so embedding rows map to positions

    for position in (0, 5, t - 2):
        def logits_at(embedding):
            p = {**params, "embed": {"embedding": embedding}}
            return model.apply({"params": p}, tokens)[0][0, position].sum()

        grad = np.asarray(jax.grad(logits_at)(params["embed"]["embedding"]))
        rows = np.asarray(tokens[0])
        assert np.all(grad[rows[position + 1:]] == 0.0)
        assert np.any(grad[rows[: position + 1]] != 0.0)


def test_scan_equals_layer_by_layer(tiny):
    cfg, model, params = tiny
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    logits, aux = model.apply({"params": params}, tokens)

    x = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
    for layer in range(cfg.num_layers):
        layer_params = jax.tree.map(lambda a: a[layer], params["blocks"])
        x, _ = Block(cfg).apply({"params": layer_params}, x, positions, None, True)
    x = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, x)
    manual = Dense(cfg.vocab_size, ("embed", "vocab")).apply({"params": params["lm_head"]}, x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(manual), rtol=1e-5, atol=1e-5)
    assert aux == {"losses": {}, "metrics": {}}


def test_tied_embeddings_have_no_head_and_use_the_table():
    cfg = tiny_model_config(tie_embeddings=True)
    model = Decoder(cfg)
    params = nn.unbox(init_params(model, jax.random.key(0)))
    assert "lm_head" not in params
    tokens = jnp.array([[1, 2, 3]])
    logits, _ = model.apply({"params": params}, tokens)
    # scaling the table scales the logits' table factor: check the unembedding is the table
    p2 = {**params, "embed": {"embedding": params["embed"]["embedding"].at[7].set(0.0)}}
    logits2, _ = model.apply({"params": p2}, jnp.array([[1, 2, 3]]))
    np.testing.assert_array_equal(np.asarray(logits2[..., 7]), 0.0)
    assert not np.allclose(np.asarray(logits[..., 7]), 0.0)


def test_granite_multipliers():
    base = tiny_model_config()
    scaled = tiny_model_config(embedding_multiplier=3.0, logits_divisor=4.0)
    params = nn.unbox(init_params(Decoder(base), jax.random.key(0)))
    tokens = jnp.array([[5, 6, 7, 8]])
    logits_scaled = Decoder(scaled).apply({"params": params}, tokens)[0]
    # with embedding ×3: feed a table ×3 to the base model, then divide its logits by 4
    p3 = {**params, "embed": {"embedding": params["embed"]["embedding"] * 3.0}}
    expected = Decoder(base).apply({"params": p3}, tokens)[0] / 4.0
    np.testing.assert_allclose(np.asarray(logits_scaled), np.asarray(expected), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("size,expected", [("1b", 1_235_814_400), ("7b", 6_738_415_616)])
def test_big_presets_build_abstractly_with_known_parameter_counts(size, expected):
    cfg = presets.get("llama", size)
    shapes = jax.eval_shape(lambda r: nn.unbox(init_params(Decoder(cfg), r)), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
