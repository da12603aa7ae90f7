"""A tiny pure Mamba-2 model (pattern "M", no FFN, chunked SSD scan) on the embedded code
corpus, byte-level, a few minutes on a CPU:

    python experiments/launch.py --config experiments/configs/mamba2.py --workdir runs/mamba2

The variant is a `mamba2` preset size (tiny; 130m / 370m only build abstractly here).
"""

from experiments.configs.quickstart import stdlib_code_config
from jaxlm.models import presets


def get_config(variant: str | None = None):
    return stdlib_code_config(presets.get("mamba2", variant or "tiny"))
