"""Hugging Face RoPE fields <-> `RopeConfig`, for transformers 4.57 and 5.x config.json files.

transformers 4.57 writes `rope_theta` (and StableLM's `partial_rotary_factor`) at the top level
and the scaling as `rope_scaling = {"rope_type" (or legacy "type"): ..., "factor": ...}` or null.
transformers 5 writes one `rope_parameters` dict holding all of them (`rope_theta` included) and
reads `rope_scaling` in preference when both are present. We read either and write both, so a
file we export loads the same in 4.57 and in 5.x.

Two HF conventions that are easy to get wrong:
* `dynamic` NTK scales relative to `max_position_embeddings` (not to an
  `original_max_position_embeddings`), so that is our `rope.original_max_position`; the model is
  meant to run past it, so the imported `max_seq_len` is `factor ×` it.
* `yarn` with no `attention_factor` but DeepSeek-style `mscale`/`mscale_all_dim` derives the
  factor from them; we store the derived value.
"""

from __future__ import annotations

import math
from typing import Any

from jaxlm.layers.rotary import RopeConfig

HF_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def read_rope_fields(hf: dict) -> dict:
    """The flat RoPE dict of a config.json (v5 `rope_parameters` or 4.57 `rope_scaling`), with
    `rope_type`, `rope_theta` and (if given anywhere) `partial_rotary_factor` filled in."""
    params = hf.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        params = hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json rope_scaling={params!r}: expected a dict or null")
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_from_hf(hf: dict, fraction: float) -> tuple[dict, int]:
    """(RopeConfig fields as a dict, max_seq_len) from a config.json dict."""
    params = read_rope_fields(hf)
    kind = params["rope_type"]
    if kind not in HF_TYPES:
        raise ValueError(f"config.json rope_scaling.rope_type={kind!r}: expected one of "
                         f"{list(HF_TYPES)}")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    rope: dict[str, Any] = {"theta": float(params["rope_theta"]), "fraction": float(fraction)}
    if kind == "default":
        return rope, max_pos

    def need(key):
        if params.get(key) is None:
            raise ValueError(f"config.json rope_scaling.{key}: missing, required by "
                             f"rope_type={kind!r}")
        return params[key]

    original = int(params.get("original_max_position_embeddings") or
                   hf.get("original_max_position_embeddings") or max_pos)
    rope["scaling"] = kind
    if kind in ("linear", "dynamic", "llama3"):
        rope["factor"] = float(need("factor"))
    if kind == "linear":
        return rope, max_pos
    if kind == "dynamic":
        rope["original_max_position"] = max_pos
        return rope, int(max_pos * rope["factor"])
    rope["original_max_position"] = original
    if kind == "llama3":
        rope["low_freq_factor"] = float(need("low_freq_factor"))
        rope["high_freq_factor"] = float(need("high_freq_factor"))
        return rope, max_pos
    # yarn
    factor = params.get("factor")
    rope["factor"] = float(factor if factor is not None else max_pos / original)
    rope["beta_fast"] = float(params.get("beta_fast") or 32.0)
    rope["beta_slow"] = float(params.get("beta_slow") or 1.0)
    rope["truncate"] = bool(params.get("truncate", True))
    attention_factor = params.get("attention_factor")
    if attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
        attention_factor = (_yarn_mscale(rope["factor"], params["mscale"])
                            / _yarn_mscale(rope["factor"], params["mscale_all_dim"]))
    if attention_factor is not None:
        rope["attention_factor"] = float(attention_factor)
    return rope, max_pos


def rope_to_hf(rope: RopeConfig, max_seq_len: int, partial: bool) -> dict:
    """config.json fields for `rope` (both the 4.57 and the v5 spelling).

    `partial`: write `partial_rotary_factor` (StableLM); families without it must have
    fraction 1, which the caller checks.
    """
    scaling: dict[str, Any] = {}
    max_pos = max_seq_len
    if rope.scaling != "none":
        scaling = {"rope_type": rope.scaling, "factor": rope.factor}
    if rope.scaling == "dynamic":
        max_pos = rope.original_max_position
    elif rope.scaling == "llama3":
        scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                       original_max_position_embeddings=rope.original_max_position)
    elif rope.scaling == "yarn":
        scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                       original_max_position_embeddings=rope.original_max_position,
                       truncate=rope.truncate)
        if rope.attention_factor is not None:
            scaling["attention_factor"] = rope.attention_factor
    out: dict[str, Any] = {"rope_theta": rope.theta, "max_position_embeddings": max_pos,
                           "rope_scaling": dict(scaling) if scaling else None}
    v5 = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": rope.theta, **scaling}
    if partial:
        out["partial_rotary_factor"] = rope.fraction
        v5["partial_rotary_factor"] = rope.fraction
    out["rope_parameters"] = v5
    return out
