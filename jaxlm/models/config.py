"""Model hyperparameters for every family: one frozen, hashable section passed to the modules.

Families differ only in field values (see `presets.py`): LLaMA is pattern "A" with RMSNorm and
full RoPE; Stable Code is "A" with LayerNorm and rotary_fraction 0.25; Granite-4 hybrids mix
"M" (Mamba-2) and "A" (NoPE attention) with an MoE + shared-expert FFN and Granite's
multipliers; Mixtral is "A" with a routed FFN; Mamba-2 is "M" with no FFN.
"""

from __future__ import annotations

from typing import Optional

from jaxlm.layers.moe import MoEConfig
from jaxlm.layers.rotary import RopeConfig
from jaxlm.layers.ssm import SSMConfig
from jaxlm.schema import ConfigError, field, section

LAYER_KINDS = {"A": "attention", "M": "mamba"}
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")


@section
class ModelConfig:
    family: str = field("llama", "family name (used by presets and HF interop)",
                        choices=("llama", "stablelm", "granite_hybrid", "mixtral", "mamba2"))
    vocab_size: int = field(512, "rows of the embedding / logits (≥ tokenizer vocab)", min=1)
    embed_dim: int = field(256, "model width D", min=1)
    num_layers: int = field(4, "decoder layers (a multiple of len(layer_pattern))", min=1)
    layer_pattern: str = field("A", "mixer per layer, repeated: A attention, M Mamba-2")
    num_heads: int = field(4, "query heads", min=1)
    num_kv_heads: Optional[int] = field(None, "key/value heads for GQA/MQA (None: num_heads)")
    head_dim: Optional[int] = field(None, "per-head dim (None: embed_dim // num_heads)")
    mlp_dim: int = field(1024, "SwiGLU hidden width of the dense FFN", min=0)
    ffn: str = field("mlp", "FFN after each mixer", choices=("mlp", "moe", "none"))
    norm: str = field("rms", "norm type", choices=("rms", "layer"))
    norm_eps: float = field(1e-5, "norm epsilon (inside the rsqrt)", min=0.0)
    position_embedding: str = field("rope", "rope, or none (NoPE)", choices=("rope", "none"))
    rope: RopeConfig = field(RopeConfig(), "rotary embedding")
    max_seq_len: int = field(2048, "longest sequence the model is configured for", min=1)
    qkv_bias: bool = field(False, "bias on q/k/v projections")
    out_bias: bool = field(False, "bias on the attention output projection")
    mlp_bias: bool = field(False, "bias on the dense FFN projections")
    qk_norm: bool = field(False, "per-head LayerNorm (no bias) on q and k before RoPE")
    parallel_residual: bool = field(False, "h + attn(LN(h)) + mlp(LN(h)) (GPT-J / some StableLM)")
    tie_embeddings: bool = field(False, "unembed with the embedding matrix")
    embedding_multiplier: float = field(1.0, "Granite: embeddings are scaled by this")
    residual_multiplier: float = field(1.0, "Granite: each branch is scaled by this before adding")
    attention_scale: Optional[float] = field(None, "softmax scale (None: head_dim^-0.5)")
    logits_divisor: float = field(1.0, "Granite logits_scaling: logits are divided by this",
                                  min=0.0, min_exclusive=True)
    moe: MoEConfig = field(MoEConfig(), "mixture of experts (ffn='moe')")
    ssm: SSMConfig = field(SSMConfig(), "Mamba-2 mixer (layer_pattern letter M)")
    init_std: float = field(0.02, "std of the normal init of weights", min=0.0)
    dtype: str = field("float32", "compute dtype (params stay float32)", choices=DTYPES)
    param_dtype: str = field("float32", "parameter dtype", choices=DTYPES)
    remat: str = field("none", "activation rematerialisation policy of each block",
                       choices=REMAT_POLICIES)

    # ---- derived values -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    @property
    def pattern(self) -> tuple[str, ...]:
        """Layer kinds of one repeat, e.g. ('mamba', 'mamba', 'attention')."""
        return tuple(LAYER_KINDS[c] for c in self.layer_pattern)

    @property
    def num_repeats(self) -> int:
        return self.num_layers // len(self.layer_pattern)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return self.pattern * self.num_repeats

    def validate(self) -> None:
        if not self.layer_pattern:
            raise ConfigError("model.layer_pattern='': expected at least one letter of "
                              f"{sorted(LAYER_KINDS)}")
        bad = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
        if bad:
            raise ConfigError(f"model.layer_pattern={self.layer_pattern!r}: unknown letter "
                              f"{bad[0]!r}; expected letters of {sorted(LAYER_KINDS)} "
                              "(A attention, M Mamba-2)")
        if self.num_layers % len(self.layer_pattern):
            raise ConfigError(f"model.num_layers={self.num_layers}: expected a multiple of "
                              f"len(layer_pattern)={len(self.layer_pattern)}")
        if "attention" in self.pattern:
            if self.num_kv_heads is not None and (self.num_kv_heads < 1 or
                                                  self.num_heads % self.num_kv_heads):
                raise ConfigError(f"model.num_kv_heads={self.num_kv_heads}: expected a divisor "
                                  f"of num_heads={self.num_heads}")
            if self.head_dim is None and self.embed_dim % self.num_heads:
                raise ConfigError(f"model.num_heads={self.num_heads}: expected a divisor of "
                                  f"embed_dim={self.embed_dim} (or set model.head_dim)")
            if self.head_dim is not None and self.head_dim < 1:
                raise ConfigError(f"model.head_dim={self.head_dim}: expected >= 1")
            rot = int(self.head_size * self.rope.fraction)
            if self.position_embedding == "rope" and (rot < 2 or rot % 2):
                raise ConfigError(f"model.rope.fraction={self.rope.fraction}: rotary dims "
                                  f"int(head_dim·fraction)={rot} must be even and >= 2")
        if self.ffn == "mlp" and self.mlp_dim < 1:
            raise ConfigError(f"model.mlp_dim={self.mlp_dim}: expected >= 1 with ffn='mlp'")
        if self.ffn == "moe":
            m = self.moe
            if m.num_experts < 1:
                raise ConfigError(f"model.moe.num_experts={m.num_experts}: expected >= 1 with "
                                  "ffn='moe'")
            if m.top_k > m.num_experts:
                raise ConfigError(f"model.moe.top_k={m.top_k}: expected <= "
                                  f"model.moe.num_experts={m.num_experts}")
            if m.mlp_dim < 1:
                raise ConfigError(f"model.moe.mlp_dim={m.mlp_dim}: expected >= 1 with ffn='moe'")
        if "mamba" in self.pattern:
            s = self.ssm
            if s.num_heads % s.num_groups:
                raise ConfigError(f"model.ssm.num_groups={s.num_groups}: expected a divisor of "
                                  f"model.ssm.num_heads={s.num_heads}")
            if s.dt_limit_max <= s.dt_limit_min:
                raise ConfigError(f"model.ssm.dt_limit_max={s.dt_limit_max}: expected > "
                                  f"dt_limit_min={s.dt_limit_min}")
        if self.tie_embeddings and self.logits_divisor <= 0:
            raise ConfigError(f"model.logits_divisor={self.logits_divisor}: expected > 0")
