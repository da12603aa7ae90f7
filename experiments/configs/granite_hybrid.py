"""A tiny Granite-4-style hybrid on the embedded code corpus, byte-level, a few minutes on a CPU:
pattern "MMMA" (three Mamba-2 layers, one NoPE attention layer), 16 experts top-4 + a shared
expert after every mixer, Granite's multipliers.

    python experiments/launch.py --config experiments/configs/granite_hybrid.py --workdir runs/gh

The variant is a `granite_hybrid` preset size (tiny; h-tiny only builds abstractly here).
"""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("granite_hybrid", variant or "tiny"))
    config.data.sources = ("stdlib",)
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.train.steps = 300
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 30
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 8
    config.train.checkpoint_every = 100
    config.generate.prompt = "def fibonacci(n):\n"
    config.generate.max_new_tokens = 96
    return config
