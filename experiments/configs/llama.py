"""LLaMA shapes on the embedded code corpus: `--config experiments/configs/llama.py:<size>`
with size one of tiny, bench-small, 1b, 7b (the last two only build abstractly on a CPU)."""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("llama", variant or "tiny"))
    if variant == "bench-small":
        config.data.seq_len = 512
        config.data.batch_size = 8
    return config
