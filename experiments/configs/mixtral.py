"""Mixtral-style MoE on the embedded code corpus (this interpreter's standard library),
byte-level, a few minutes on a CPU:

    python experiments/launch.py --config experiments/configs/mixtral.py --workdir runs/mixtral
    python experiments/launch.py --config experiments/configs/mixtral.py:fine-grained-tiny ...

The variant is a `mixtral` preset size (tiny: 8 experts top-2; fine-grained-tiny: 64 experts
top-8 + 1 shared; 8x7b / fine-grained-7b only build abstractly here). The load-balancing loss
(model.moe.aux_loss_coef) is logged as aux/moe_aux, the per-layer load as model/expert_load
and its most loaded expert over the uniform share as model/expert_load_max_over_uniform.
"""

from experiments.configs.quickstart import stdlib_code_config
from jaxlm.models import presets


def get_config(variant: str | None = None):
    return stdlib_code_config(presets.get("mixtral", variant or "tiny"))
