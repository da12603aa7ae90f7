"""Mixtral-style MoE on the embedded code corpus (this interpreter's standard library),
byte-level, a few minutes on a CPU:

    python experiments/launch.py --config experiments/configs/mixtral.py --workdir runs/mixtral
    python experiments/launch.py --config experiments/configs/mixtral.py:fine-grained-tiny ...

The variant is a `mixtral` preset size (tiny: 8 experts top-2; fine-grained-tiny: 64 experts
top-8 + 1 shared; 8x7b / fine-grained-7b only build abstractly here). The load-balancing loss
(model.moe.aux_loss_coef) is logged as aux/moe_aux, the per-layer load as model/expert_load
and its most loaded expert over the uniform share as model/expert_load_max_over_uniform.
"""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("mixtral", variant or "tiny"))
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
