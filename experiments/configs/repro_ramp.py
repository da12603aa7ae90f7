"""Reproduction 3: Smith et al. 2017, "Don't decay the learning rate, increase the batch size".

    python experiments/sweep.py --config experiments/configs/repro_ramp.py \
        --out runs/repro_ramp --parallel 2

The reproduction-5 transformer (byte-level LLaMA, D 64, 4 layers, ~0.25M parameters), seq 128,
micro-batches of 16 rows, the same 200 micro-batches (409,600 tokens) in both arms:
  lr_decay    16 rows per step for 200 steps; LR 3e-3 after a 20-step warmup, cosine decay to
              0.25× (the noise scale g = LR·N/B falls 4×)
  batch_ramp  LR held at 3e-3 after the same warmup; the batch grows instead, by accumulating
              1 micro-batch per step for steps 0-39, 2 for steps 40-79 and 4 for steps 80-99
              (jaxlm/train/ramp.py, schedule trigger): g also falls 4×, in 100 steps
"""

from experiments.configs import repro_hybrid


def get_config(variant: str | None = None):
    config = repro_hybrid.get_config()
    config.model.rope.fraction = 1.0
    config.train.steps = 200
    config.train.warmup_steps = 20
    config.train.eval_every = 20
    config.train.checkpoint_every = 200
    return config


def get_sweep(variant: str | None = None):
    return {"runs": [
        {"name": "lr_decay", "overrides": {"train.schedule": "cosine",
                                           "train.min_lr_ratio": 0.25}},
        {"name": "batch_ramp", "overrides": {"train.schedule": "constant", "train.steps": 100,
                                             "train.ramp.trigger": "schedule",
                                             "train.ramp.max_accum_steps": 4,
                                             "train.ramp.schedule": [[40, 2], [80, 4]]}},
    ], "seeds": [0, 1]}
