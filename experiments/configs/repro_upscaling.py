"""Reproductions 1 and 2: depth up-scaling (SOLAR 10.7B; Yi-9B) of a small trained model.

    python experiments/repro.py upscaling --out runs/repro_upscaling --parallel 2

The base (variant default) is a 4-layer byte-level LLaMA (D 64, 4 heads, SwiGLU 176, ~0.25M
parameters) trained 250 steps of 16×128 tokens. The `continue` variant is the continued
pretraining every arm gets after surgery: 150 steps at a re-warmed peak LR of 1e-3, fresh
AdamW state, and a data stream the base never saw (data.seed = 1000 + seed):
  base_continued  the base itself (identity layer map 0,1,2,3: same fresh optimizer/schedule)
  solar_middle    SOLAR: [(0, 3), (1, 4)] -> 6 layers; layers 1-2 (the middle) appear twice
  yi_late         Yi-9B: [(0, 4), (2, 4)] -> 6 layers; layers 2-3 (the last two) twice
"""

from experiments.configs._small_repro import short_run, small_model
from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict

ARMS = {"base_continued": "0,1,2,3", "solar_middle": "solar:1", "yi_late": "yi:2:4"}
CONTINUE_DATA_SEED = 1000


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("llama", "tiny"))
    small_model(config.model, kv_heads=4)
    config.data.sources = ("stdlib",)
    short_run(config, steps=250)
    if variant == "continue":
        config.train.steps = 150
        config.train.learning_rate = 1e-3
        config.train.warmup_steps = 15
        config.train.eval_every = 25
        config.train.checkpoint_every = 150
    elif variant:
        raise ValueError(f"variant {variant!r}: expected none or 'continue'")
    return config
