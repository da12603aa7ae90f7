"""The FIM recipe: a ~4M-parameter Stable Code model (LayerNorm, partial rotary 0.25) trained
with fill-in-the-middle on this interpreter's standard library, with a byte-level BPE.

    python experiments/launch.py --config experiments/configs/stablecode_fim.py --workdir runs/fim

One command: the BPE (2048 tokens, `<|endoftext|>` and the four FIM sentinels first) is trained
on the training split the first time the config is used (~2 s) and cached under
~/.cache/jaxlm/tokenizers/ by a hash of the fields it depends on; change a field such as
`--config.data.bpe_vocab_size=4096 --config.model.vocab_size=4096` and a new one is trained.
Half of the document pieces in every row are FIM-transformed (PSM or SPM, StarCoder's rates).
Every evaluation logs the left-to-right held-out loss (`eval/loss`) and the infilling loss on
the middle tokens of PSM-transformed held-out documents (`eval/fim_loss`).
"""

from jaxlm.config import default_config
from jaxlm.models import presets
from jaxlm.schema import to_config_dict


def get_config(variant: str | None = None):
    config = default_config()
    config.model = to_config_dict(presets.get("stablelm", "tiny"))
    config.data.sources = ("stdlib",)
    config.data.tokenizer = "bpe"
    config.data.bpe_vocab_size = config.model.vocab_size  # 2048
    config.data.bpe_train_chars = 8_000_000
    config.data.fim_rate = 0.5
    config.data.fim_spm_rate = 0.5
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
    config.generate.max_new_tokens = 48
    return config
