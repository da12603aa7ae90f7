"""Merging parameter trees: linear soup of identical checkpoints is the identity, SLERP hits its
endpoints and matches the closed form, per-layer t lines up with the stacked slots, task
arithmetic with λ=0 is the base, TIES equals an element-by-element NumPy reference written
here; mismatched trees or configs fail with one line naming the first difference."""

import dataclasses
import math

import numpy as np
import pytest

from jaxlm.layers.rotary import RopeConfig
from jaxlm.models.config import ModelConfig
from jaxlm.surgery.merge import (check_same_config, check_same_structure, linear, slerp,
                                 task_arithmetic, ties)


def make_tree(seed, layers=2, slots=2):
    """A decoder-shaped tree: global leaves plus `slots` stacked slots of `layers` repeats."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    blocks = {f"slot_{s}": {"attention": {"q_proj": {"kernel": r(layers, 6, 2, 3)}},
                            "mixer_norm": {"scale": r(layers, 6)}} for s in range(slots)}
    return {"embed": {"embedding": r(10, 6)}, "blocks": blocks, "final_norm": {"scale": r(6)}}


def leaves(tree, prefix=()):
    for key in sorted(tree):
        if isinstance(tree[key], dict):
            yield from leaves(tree[key], prefix + (key,))
        else:
            yield prefix + (key,), tree[key]


def equal(a, b):
    return all(np.array_equal(x, y) and x.dtype == y.dtype
               for (_, x), (_, y) in zip(leaves(a), leaves(b)))


A, B, C, BASE = make_tree(1), make_tree(2), make_tree(3), make_tree(0)


def test_linear_of_identical_checkpoints_is_identity():
    assert equal(linear([A, A, A]), A)
    weighted = linear([A, A], weights=[0.3, 0.7])
    assert max(np.max(np.abs(x - y)) for (_, x), (_, y) in zip(leaves(weighted), leaves(A))) \
        <= 1e-6
    assert equal(linear([A, B], weights=[2.0]), linear([A, B]))  # one weight: uniform


def test_linear_weighted_average():
    merged = linear([A, B, C], weights=[1.0, 2.0, 1.0])
    for (path, m), (_, a), (_, b), (_, c) in zip(leaves(merged), leaves(A), leaves(B), leaves(C)):
        ref = (a.astype(np.float64) + 2 * b.astype(np.float64) + c.astype(np.float64)) / 4
        np.testing.assert_allclose(m, ref, rtol=1e-6, atol=1e-7, err_msg="/".join(path))


def test_slerp_endpoints_are_exact():
    assert equal(slerp(A, B, 0.0), A)
    assert equal(slerp(A, B, 1.0), B)


def reference_slerp(v0, v1, t):
    v0, v1 = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    omega = math.acos(v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def test_slerp_midpoint_matches_closed_form_per_layer_tensor():
    merged = slerp(A, B, 0.3)
    got = merged["blocks"]["slot_1"]["attention"]["q_proj"]["kernel"][1]
    ref = reference_slerp(A["blocks"]["slot_1"]["attention"]["q_proj"]["kernel"][1],
                          B["blocks"]["slot_1"]["attention"]["q_proj"]["kernel"][1], 0.3)
    np.testing.assert_allclose(got.ravel(), ref, rtol=1e-5, atol=1e-6)
    emb = reference_slerp(A["embed"]["embedding"], B["embed"]["embedding"], 0.3)
    np.testing.assert_allclose(merged["embed"]["embedding"].ravel(), emb, rtol=1e-5, atol=1e-6)


def test_slerp_falls_back_to_lerp_when_parallel():
    twice = {"embed": {"embedding": 2 * A["embed"]["embedding"]}}
    merged = slerp({"embed": A["embed"]}, twice, 0.25)
    np.testing.assert_allclose(merged["embed"]["embedding"], 1.25 * A["embed"]["embedding"],
                               rtol=1e-6)


def test_slerp_layer_t_follows_global_layer_order():
    # 2 slots x 2 repeats: global layer l is slot l % 2, repeat l // 2.
    merged = slerp(A, B, 0.5, layer_t=[0.0, 1.0, 1.0, 0.0])
    ends = {0: A, 1: B, 2: B, 3: A}
    for layer, src in ends.items():
        slot, repeat = f"slot_{layer % 2}", layer // 2
        assert np.array_equal(merged["blocks"][slot]["mixer_norm"]["scale"][repeat],
                              src["blocks"][slot]["mixer_norm"]["scale"][repeat])
    assert equal({"final_norm": merged["final_norm"]},
                 slerp({"final_norm": A["final_norm"]}, {"final_norm": B["final_norm"]}, 0.5))


def test_task_arithmetic():
    assert equal(task_arithmetic(BASE, [A, B], scales=[0.0, 0.0]), BASE)
    merged = task_arithmetic(BASE, [A, B], scales=[0.5, -0.25])
    for (_, m), (_, base), (_, a), (_, b) in zip(leaves(merged), leaves(BASE), leaves(A),
                                                 leaves(B)):
        base64 = base.astype(np.float64)
        np.testing.assert_allclose(m, base64 + 0.5 * (a - base64) - 0.25 * (b - base64),
                                   rtol=1e-6, atol=1e-6)


def reference_ties(base, models, density, weights, scale):
    """TIES on one tensor, entry by entry."""
    base = base.astype(np.float64).ravel()
    trimmed = []
    for m in models:
        delta = [float(x) for x in m.astype(np.float64).ravel() - base]
        keep = int(density * len(delta))
        order = sorted(range(len(delta)), key=lambda i: -abs(delta[i]))
        kept = set(order[:keep])
        trimmed.append([delta[i] if i in kept else 0.0 for i in range(len(delta))])
    out = []
    for i in range(base.size):
        total = sum(w * t[i] for w, t in zip(weights, trimmed))
        sign = (total > 0) - (total < 0)
        num = den = 0.0
        for w, t in zip(weights, trimmed):
            if t[i] != 0 and ((t[i] > 0) - (t[i] < 0)) == sign:
                num += w * t[i]
                den += w
        out.append(float(base[i]) + scale * (num / den if den else 0.0))
    return np.array(out)


def test_ties_matches_elementwise_reference():
    weights, density, scale = [1.0, 2.0, 0.5], 0.4, 0.8
    merged = ties(BASE, [A, B, C], density=density, weights=weights, scale=scale)
    checked = 0
    for (path, m), (_, base), (_, a), (_, b), (_, c) in zip(
            leaves(merged), leaves(BASE), leaves(A), leaves(B), leaves(C)):
        stacked = path[0] == "blocks"
        for r in range(base.shape[0] if stacked else 1):  # each layer is its own tensor
            pick = (lambda x: x[r]) if stacked else (lambda x: x)
            ref = reference_ties(pick(base), [pick(a), pick(b), pick(c)], density, weights, scale)
            np.testing.assert_allclose(pick(m).ravel(), ref, rtol=1e-6, atol=1e-6,
                                       err_msg="/".join(path))
            checked += 1
    assert checked == 2 + 2 * 2 * 2  # embed, final_norm, 2 leaves x 2 slots x 2 repeats
    assert equal(ties(BASE, [A], density=1.0), linear([A]))  # one model, no trim: the model


def test_mismatched_trees_name_the_first_difference():
    missing = make_tree(4)
    del missing["blocks"]["slot_1"]["mixer_norm"]
    with pytest.raises(ValueError, match="checkpoint 1: missing blocks/slot_1/mixer_norm/scale "
                                         r"\(present in checkpoint 0\)") as err:
        linear([A, missing])
    assert "\n" not in str(err.value)
    wide = make_tree(5)
    wide["embed"]["embedding"] = np.zeros((11, 6), np.float32)
    with pytest.raises(ValueError, match=r"model 1: embed/embedding has shape \[11, 6\], base "
                                         r"has \[10, 6\]"):
        ties(BASE, [A, wide], density=0.5)
    with pytest.raises(ValueError, match="checkpoint 1: unexpected extra/w"):
        check_same_structure([A, {**A, "extra": {"w": np.zeros(1)}}])


def test_mismatched_configs_name_the_field():
    cfg = ModelConfig()
    check_same_config([cfg, ModelConfig()])
    other = dataclasses.replace(cfg, rope=RopeConfig(theta=5e5))
    with pytest.raises(ValueError, match=r"model.rope.theta differs: 10000.0 \(checkpoint 0\) "
                                         r"vs 500000.0 \(checkpoint 1\)"):
        check_same_config([cfg, other])


@pytest.mark.parametrize("call, message", [
    (lambda: slerp(A, B, 1.5), r"slerp t=1.5: expected 0 <= t <= 1"),
    (lambda: slerp(A, B, 0.5, layer_t=[0.1, 0.2]), r"layer_t has 2 values: expected one per "
                                                    r"layer \(4\)"),
    (lambda: slerp(A, B, 0.5, layer_t=[0, 0, -1, 0]), r"slerp layer_t\[2\]=-1"),
    (lambda: ties(BASE, [A], density=0.0), r"ties density=0.0: expected 0 < density <= 1"),
    (lambda: linear([A, B], weights=[1.0, 2.0, 3.0]), r"linear weights: 3 values for 2 "
                                                      r"checkpoints"),
    (lambda: linear([A, B], weights=[1.0, -1.0]), r"expected a non-zero sum"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
