"""Conversion tables: how each Hugging Face tensor maps onto a slice of a jaxlm parameter.

A family converter is data, not code paths: a `Family` names the HF architectures it reads, two
config translators, and a table of `Tensor` rows. Each row says

    HF tensor `hf` (shape `shape`)  --transpose(perm), reshape-->  jaxlm leaf `path`[index]

where `index` is the stacked-layer position (layer l of the model is slot l % len(pattern),
repeat l // len(pattern)), plus an expert/head position for rows with `count` (one HF tensor per
index, e.g. StableLM's per-head qk-norms or, later, Mixtral's per-expert weights). A row with
`part=(axis, start, stop)` owns that range of a fused HF tensor along `axis` (Granite's
`input_linear` = gate ‖ up, Mamba-2's `in_proj` = z ‖ x ‖ B ‖ C ‖ dt); the rows of one fused
tensor must tile the axis. The generic code in `hf.py` expands rows over layers,
checks them against the model's real parameter tree, and streams tensors through them in both
directions; a new family adds a module with its rows and registers it there.

Layout convention (SPEC): a PyTorch Linear weight is [out, in]; our kernels are [in, ...out...],
so linear rows use perm (1, 0) and the reshape splits/merges the head axes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from jaxlm.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    hf: str                            # HF name; may contain {layer} and {index}
    path: tuple[str, ...]              # jaxlm leaf (layer rows: below blocks/slot_s)
    shape: tuple[int, ...]             # HF shape of the whole stored tensor
    perm: Optional[tuple[int, ...]] = None  # HF axes in jaxlm order (before the reshape)
    count: int = 0                     # > 0: hf has {index} in range(count) -> leaf axis after layers
    part: Optional[tuple[int, int, int]] = None  # (HF axis, start, stop) of a fused tensor

    @property
    def piece_shape(self) -> tuple[int, ...]:
        if self.part is None:
            return self.shape
        axis, start, stop = self.part
        shape = list(self.shape)
        shape[axis] = stop - start
        return tuple(shape)

    @property
    def axes(self) -> tuple[int, ...]:
        return self.perm if self.perm is not None else tuple(range(len(self.shape)))


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family: its architectures, config translation and tensor table."""

    name: str                                  # ModelConfig.family
    architectures: tuple[str, ...]             # HF `architectures` entries it reads
    export_architecture: str                   # what export writes
    config_from_hf: Callable[[dict], dict]     # config.json -> ModelConfig fields
    config_to_hf: Callable[[ModelConfig], dict]  # raises ValueError if not representable
    global_tensors: Callable[[ModelConfig], list[Tensor]]
    layer_tensors: Callable[[ModelConfig, str], list[Tensor]]  # (cfg, layer kind) -> rows
    head_name: str = "lm_head.weight"          # skipped on import when embeddings are tied


# ---- row builders shared by the families ------------------------------------------------------

def linear(hf: str, path: tuple[str, ...], out_features: int, in_features: int) -> Tensor:
    """nn.Linear weight [out, in] -> kernel [in, out] (reshaped to the kernel's head axes)."""
    return Tensor(hf, path, (out_features, in_features), perm=(1, 0))


def vector(hf: str, path: tuple[str, ...], size: int, count: int = 0) -> Tensor:
    return Tensor(hf, path, (size,), count=count)


def norm(hf_prefix: str, path: tuple[str, ...], size: int, bias: bool) -> list[Tensor]:
    rows = [vector(f"{hf_prefix}.weight", path + ("scale",), size)]
    if bias:
        rows.append(vector(f"{hf_prefix}.bias", path + ("bias",), size))
    return rows


def attention(cfg: ModelConfig, prefix: str) -> list[Tensor]:
    """q/k/v/o projections (+ biases) of a LLaMA-style `self_attn` block."""
    d, h, g, k = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
    rows = []
    for name, heads in (("q_proj", h), ("k_proj", g), ("v_proj", g)):
        rows.append(linear(f"{prefix}.{name}.weight", ("attention", name, "kernel"), heads * k, d))
        if cfg.qkv_bias:
            rows.append(vector(f"{prefix}.{name}.bias", ("attention", name, "bias"), heads * k))
    rows.append(linear(f"{prefix}.o_proj.weight", ("attention", "o_proj", "kernel"), d, h * k))
    if cfg.out_bias:
        rows.append(vector(f"{prefix}.o_proj.bias", ("attention", "o_proj", "bias"), d))
    return rows


def swiglu(cfg: ModelConfig, prefix: str) -> list[Tensor]:
    """gate/up/down projections (+ biases) of a SwiGLU `mlp` block."""
    d, f = cfg.embed_dim, cfg.mlp_dim
    rows = []
    for name, out_features, in_features in (("gate_proj", f, d), ("up_proj", f, d),
                                            ("down_proj", d, f)):
        rows.append(linear(f"{prefix}.{name}.weight", ("mlp", name, "kernel"), out_features,
                           in_features))
        if cfg.mlp_bias:
            rows.append(vector(f"{prefix}.{name}.bias", ("mlp", name, "bias"), out_features))
    return rows


def embeddings(cfg: ModelConfig, embed: str = "model.embed_tokens.weight",
               head: str = "lm_head.weight") -> list[Tensor]:
    rows = [Tensor(embed, ("embed", "embedding"), (cfg.vocab_size, cfg.embed_dim))]
    if not cfg.tie_embeddings:
        rows.append(linear(head, ("lm_head", "kernel"), cfg.vocab_size, cfg.embed_dim))
    return rows


# ---- config helpers ---------------------------------------------------------------------------

def hf_field(hf: dict, key: str, default=dataclasses.MISSING):
    """A config.json field, with a one-line error naming it when it is required and absent."""
    if hf.get(key) is None:
        if default is dataclasses.MISSING:
            raise ValueError(f"config.json: missing field {key!r}")
        return default
    return hf[key]


def require(cfg: ModelConfig, field: str, allowed, architecture: str) -> None:
    """Export check: `model.<field>` must be one of `allowed` for `architecture`."""
    value = cfg
    for part in field.split("."):
        value = getattr(value, part)
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in allowed:
        shown = allowed[0] if len(allowed) == 1 else list(allowed)
        raise ValueError(f"model.{field}={value!r}: {architecture} can only express {shown!r}")
