"""DPO recipe: prefer the real order of two lines of a standard-library function over the same
lines swapped (experiments/data/dpo_stdlib.jsonl). About a minute on a CPU.

    python experiments/launch.py --mode dpo --config experiments/configs/dpo.py --workdir runs/dpo

Variants: `dpo.py:ipo`, `dpo.py:hinge`, `dpo.py:smooth` (label smoothing 0.1), and
`dpo.py:from_sft`, which takes runs/sft (the SFT recipe's run) as the frozen reference and
starting point.
"""

import os

from jaxlm.config import default_config

from experiments.configs.sft import DATA, small_model


def get_config(variant: str | None = None):
    config = default_config()
    config.model = small_model()
    config.train.objective = "dpo"
    config.align.path = os.path.join(DATA, "dpo_stdlib.jsonl")
    config.align.heldout_fraction = 0.05
    config.data.seq_len = 128
    config.data.batch_size = 8  # pairs
    config.train.steps = 100
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 10
    config.train.schedule = "constant"
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.train.checkpoint_every = 50
    config.train.dpo.beta = 0.1
    if variant in ("ipo", "hinge"):
        config.train.dpo.loss = variant
    elif variant == "smooth":
        config.train.dpo.label_smoothing = 0.1
    elif variant == "from_sft":
        config.train.dpo.reference_workdir = "runs/sft"
    elif variant:
        raise ValueError(f"unknown dpo variant {variant!r}: expected ipo, hinge, smooth or "
                         "from_sft")
    return config
