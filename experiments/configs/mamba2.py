"""A tiny pure Mamba-2 model (pattern "M", no FFN, chunked SSD scan) on the embedded code
corpus, byte-level, a few minutes on a CPU:

    python experiments/launch.py --config experiments/configs/mamba2.py --workdir runs/mamba2

The variant is a `mamba2` preset size (tiny; 130m / 370m only build abstractly here).
"""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("mamba2", variant or "tiny"))
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
