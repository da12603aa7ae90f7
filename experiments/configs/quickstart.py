"""The quickstart: a ~6M-parameter LLaMA code model, byte-level, trained on this interpreter's
standard library for a few minutes on a CPU.

    python experiments/launch.py --config experiments/configs/quickstart.py --workdir runs/quickstart
"""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def stdlib_code_config(model):
    """The quickstart's data, schedule and sample around any ModelConfig (the family recipes
    mixtral.py, granite_hybrid.py and mamba2.py share it)."""
    config = default_config()
    config.model = to_config_dict(model)
    config.data.sources = ("stdlib",)
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.train.steps = 200
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 20
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 8
    config.train.checkpoint_every = 100
    config.generate.prompt = "def fibonacci(n):\n"
    config.generate.max_new_tokens = 96
    return config


def get_config(variant: str | None = None):
    return stdlib_code_config(presets.get("llama", "tiny"))
