"""Depth up-scaling: layer i of the new model is source layer map[i] bit for bit (SOLAR and Yi
presets on 32 layers, a Mamba/attention pattern), global tensors copied, config updated, the
up-scaled model runs, and bad maps fail with one line naming the entry."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder, init_params
from jaxlm.surgery.upscale import (expand_layer_map, from_mergekit, gather_layers, solar,
                                   upscale, yi)


def random_params(cfg, seed=0, scale=1.0):
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(Decoder(cfg), jax.random.key(0))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(np.float32), shapes)


def layer(params, cfg_or_period, index):
    """Layer `index` of a stacked tree: slot index % P at repeat index // P."""
    period = cfg_or_period if isinstance(cfg_or_period, int) else len(cfg_or_period.layer_pattern)
    return jax.tree.map(lambda x: x[index // period], params["blocks"][f"slot_{index % period}"])


def assert_layers_follow_map(new, src, period, sources):
    for i, s in enumerate(sources):
        same = jax.tree.map(np.array_equal, layer(new, period, i), layer(src, period, s))
        assert all(jax.tree.leaves(same)), f"new layer {i} != source layer {s}"


def assert_globals_copied(new, src):
    for key in src:
        if key != "blocks":
            assert all(jax.tree.leaves(jax.tree.map(np.array_equal, new[key], src[key])))


@pytest.fixture(scope="module")
def llama32():
    cfg = ModelConfig(vocab_size=32, embed_dim=8, num_layers=32, num_heads=2, mlp_dim=16,
                      max_seq_len=16)
    return cfg, random_params(cfg)


def test_presets_give_the_published_maps():
    assert solar(32, 8) == [(0, 24), (8, 32)]
    assert expand_layer_map(solar(32, 8), 32) == list(range(24)) + list(range(8, 32))
    assert yi(32) == [(0, 28), (12, 32)]
    assert expand_layer_map(yi(32), 32) == list(range(28)) + list(range(12, 28)) + list(range(28, 32))
    assert yi(16) == [(0, 14), (6, 16)]  # the same proportions at another depth


@pytest.mark.parametrize("preset", ["solar", "yi"])
def test_upscaled_layer_i_is_source_layer_map_i(llama32, preset):
    cfg, params = llama32
    layer_map = solar(32, 8) if preset == "solar" else yi(32)
    new_cfg, new = upscale(cfg, params, layer_map)
    assert new_cfg.num_layers == 48
    assert new["blocks"]["slot_0"]["attention"]["q_proj"]["kernel"].shape == (48, 8, 2, 4)
    assert_layers_follow_map(new, params, 1, expand_layer_map(layer_map, 32))
    assert_globals_copied(new, params)


def test_multi_slot_pattern_maps_by_slot_kind():
    cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=6, layer_pattern="MMA",
                      num_heads=2, mlp_dim=16, max_seq_len=16)
    params = random_params(cfg, seed=1)
    # slices: 6 + 3 layers = 3 repeats; and an index map whose Mamba layers swap slots.
    for layer_map in ([(0, 6), (3, 6)], [0, 1, 2, 1, 0, 5, 4, 3, 2]):
        new_cfg, new = upscale(cfg, params, layer_map)
        assert new_cfg.num_layers == 9 and new_cfg.num_repeats == 3
        assert_layers_follow_map(new, params, 3, expand_layer_map(layer_map, 6))
        assert_globals_copied(new, params)
    with pytest.raises(ValueError, match=r"new layer 3 <- source layer 2: new layer 3 is mamba "
                                         r"\(pattern 'MMA'\) but the source is attention"):
        upscale(cfg, params, [0, 1, 2, 2, 1, 5])
    with pytest.raises(ValueError, match=r"gives 10 layers: expected a multiple of "
                                         r"len\(layer_pattern\)=3"):
        upscale(cfg, params, [(0, 6), (2, 6)])


def test_gather_layers_applies_to_other_stacked_collections():
    state = {"blocks": {"slot_0": {"moe": {"bias": np.arange(8.0).reshape(4, 2)}}}}
    new = gather_layers(state, [3, 3, 0], period=1)
    np.testing.assert_array_equal(new["blocks"]["slot_0"]["moe"]["bias"],
                                  [[6.0, 7.0], [6.0, 7.0], [0.0, 1.0]])


def test_upscaled_model_runs_and_identity_map_keeps_logits():
    cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=4, num_heads=2, mlp_dim=32,
                      max_seq_len=16)
    params = random_params(cfg, seed=3, scale=0.2)
    tokens = np.random.default_rng(0).integers(0, 32, (2, 8))
    apply = jax.jit(Decoder(cfg).apply)
    logits, _ = apply({"params": params}, tokens)
    same_cfg, same = upscale(cfg, params, list(range(4)))
    assert same_cfg == cfg
    again, _ = apply({"params": same}, tokens)
    assert np.array_equal(np.asarray(again), np.asarray(logits))
    big_cfg, big = upscale(cfg, params, solar(4, 1))  # 6 layers
    deeper, _ = jax.jit(Decoder(big_cfg).apply)({"params": big}, tokens)
    log_probs = jax.nn.log_softmax(deeper[:, :-1])
    loss = -np.mean(np.take_along_axis(np.asarray(log_probs), tokens[:, 1:, None], -1))
    assert big_cfg.num_layers == 6 and np.isfinite(loss) and 0 < loss < 10


def test_mergekit_passthrough_config():
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 24]}]},
        {"sources": [{"model": "base", "layer_range": [8, 32]}]}]}
    assert from_mergekit(config) == solar(32, 8)
    config["slices"][1]["sources"][0]["model"] = "other"
    with pytest.raises(ValueError, match="expected one"):
        from_mergekit(config)


@pytest.mark.parametrize("layer_map, message", [
    ([0, 1, 32], r"layer_map\[2\]=32: expected a source layer index in \[0, 32\)"),
    ([0, -1], r"layer_map\[1\]=-1: expected a source layer index in \[0, 32\)"),
    ([(0, 24), (8, 40)], r"layer_map\[1\]=\(8, 40\): expected a half-open slice with "
                         r"0 <= start < stop <= 32"),
    ([(0, 24), 5], r"layer_map\[1\]=5: expected all entries to be layer indices or all"),
    ([], r"layer_map=\[\]"),
])
def test_bad_layer_maps_name_the_entry(llama32, layer_map, message):
    cfg, params = llama32
    with pytest.raises(ValueError, match=message) as err:
        upscale(cfg, params, layer_map)
    assert "\n" not in str(err.value)


def test_bad_presets():
    with pytest.raises(ValueError, match="solar drop=32: expected 0 < drop < num_layers=32"):
        solar(32, 32)
    with pytest.raises(ValueError, match="yi start=20, stop=10"):
        yi(32, 20, 10)
