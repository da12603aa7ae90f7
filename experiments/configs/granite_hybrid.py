"""A tiny Granite-4-style hybrid on the embedded code corpus, byte-level, a few minutes on a CPU:
pattern "MMMA" (three Mamba-2 layers, one NoPE attention layer), 16 experts top-4 + a shared
expert after every mixer, Granite's multipliers.

    python experiments/launch.py --config experiments/configs/granite_hybrid.py --workdir runs/gh

The variant is a `granite_hybrid` preset size (tiny; h-tiny only builds abstractly here).
"""

from experiments.configs.quickstart import stdlib_code_config
from jaxlm.models import presets


def get_config(variant: str | None = None):
    return stdlib_code_config(presets.get("granite_hybrid", variant or "tiny"))
