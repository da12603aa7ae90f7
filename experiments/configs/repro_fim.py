"""Reproduction 4: "FIM for free" (Bavarian et al. 2022) — does training with
fill-in-the-middle (rate 0.5) cost left-to-right loss at equal tokens?

    python experiments/sweep.py --config experiments/configs/repro_fim.py \
        --out runs/repro_fim --parallel 2

A small Stable Code model (LayerNorm, partial rotary 0.25; D 64, 4 layers, 4 heads) with the
FIM recipe's 2048-token BPE (experiments/configs/stablecode_fim.py, cached after first use),
seq 128, batch 16, 300 steps (614k tokens), data.fim_rate 0 vs 0.5 (PSM/SPM 50/50), 2 seeds.
eval/loss is the left-to-right held-out loss; runs with FIM also report eval/fim_loss (the
middle tokens of PSM-infilled held-out documents).
"""

from experiments.configs import stablecode_fim
from experiments.configs._small_repro import short_run, small_model


def get_config(variant: str | None = None):
    config = stablecode_fim.get_config()
    small_model(config.model)
    short_run(config, steps=300)
    return config


def get_sweep(variant: str | None = None):
    return {"grid": {"data.fim_rate": [0.0, 0.5]}, "seeds": [0, 1]}
