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


def get_config(variant: str | None = None):
    config = stablecode_fim.get_config()
    config.model.embed_dim = 64
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 176
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.train.steps = 300
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 30
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 8
    config.train.checkpoint_every = 300
    config.train.progress_bar = False
    return config


def get_sweep(variant: str | None = None):
    return {"grid": {"data.fim_rate": [0.0, 0.5]}, "seeds": [0, 1]}
