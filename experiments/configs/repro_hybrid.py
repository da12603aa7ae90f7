"""Reproduction 5: a Granite-4-style hybrid vs a transformer at equal parameters and tokens,
and Stable Code's partial rotary (0.25 of each head's dims) vs full rotary.

    python experiments/sweep.py --config experiments/configs/repro_hybrid.py \
        --out runs/repro_hybrid --parallel 2

Three settings × 2 seeds, byte-level, seq 128, batch 16, 300 steps (614k tokens each):
  llama_rope1.0     4 attention layers (RoPE on every dim), SwiGLU 176        250,432 params
  llama_rope0.25    the same with rotary on the first 25% of each head (4 of 16 dims)
  hybrid_MMMA_nope  layer pattern MMMA: 3 Mamba-2 layers (4 heads × 16, state 32,
                    expand 1) and 1 attention layer without positional encoding (NoPE),
                    the same SwiGLU after each mixer                           253,348 params
Only the mixers differ; the parameter counts are within 1.2%.
"""

from experiments.configs._small_repro import short_run, small_model
from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("llama", "tiny"))
    small_model(config.model, kv_heads=4)
    config.model.ssm.num_heads = 4
    config.model.ssm.head_dim = 16
    config.model.ssm.state_dim = 32
    config.model.ssm.chunk_size = 64
    config.data.sources = ("stdlib",)
    short_run(config, steps=300)
    return config


def get_sweep(variant: str | None = None):
    return {"runs": [
        {"name": "llama_rope1.0", "overrides": {"model.rope.fraction": 1.0}},
        {"name": "llama_rope0.25", "overrides": {"model.rope.fraction": 0.25}},
        {"name": "hybrid_MMMA_nope", "overrides": {"model.family": "granite_hybrid",
                                                   "model.layer_pattern": "MMMA",
                                                   "model.position_embedding": "none"}},
    ], "seeds": [0, 1]}
