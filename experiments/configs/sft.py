"""SFT recipe: a small LLaMA learns to continue standard-library `def` lines with their next two
lines (experiments/data/sft_stdlib.jsonl), loss on the completion only. About a minute on a
CPU.

    python experiments/launch.py --mode sft --config experiments/configs/sft.py --workdir runs/sft

To fine-tune a pretrained run instead of a fresh model, seed the workdir from it first (e.g.
`--mode convert` / `--mode upscale` write step-0 run directories) or train from its config.
"""

import os

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def small_model():
    model = to_config_dict(presets.get("llama", "tiny"))
    model.embed_dim, model.num_layers, model.mlp_dim = 128, 4, 384
    model.max_seq_len = 256
    return model


def get_config(variant: str | None = None):
    config = default_config()
    config.model = small_model()
    config.train.objective = "sft"
    config.align.path = os.path.join(DATA, "sft_stdlib.jsonl")
    config.align.heldout_fraction = 0.05
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.train.steps = 150
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 15
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.train.checkpoint_every = 50
    config.generate.prompt = "def __init__(self, name):\n"
    config.generate.max_new_tokens = 64
    return config
