"""Batch-size ramp recipe: the quickstart's model on the standard library, LR constant after
warmup, the batch growing from 8 to 32 rows of 128 tokens (micro-batches of 4 rows; nothing
recompiles when it grows). A couple of minutes on a CPU.

    python experiments/launch.py --config experiments/configs/batch_ramp.py:plateau \
        --workdir runs/ramp

Variants pick the trigger: `schedule` (×2 at steps 50 and 100), `plateau` (default: the loss
EMA stops improving by 0.02 nats for 15 steps) or `noise_scale` (B_simple of McCandlish et al.
exceeds the batch). metrics.jsonl logs batch_size, accum_steps, tokens_seen, lr_scale and
b_simple every step logged; once at 8 micro-batches, a firing trigger halves the LR.
"""

from jaxlm.config import default_config

from experiments.configs.sft import small_model


def get_config(variant: str | None = None):
    config = default_config()
    config.model = small_model()
    config.data.sources = ("stdlib",)
    config.data.seq_len = 128
    config.data.batch_size = 8
    config.train.grad_accum_steps = 2  # starting accumulation: 2 micro-batches of 4 rows
    config.train.steps = 150
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 20
    config.train.schedule = "constant"
    config.train.log_every = 5
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.train.checkpoint_every = 50
    ramp = config.train.ramp
    ramp.trigger = variant or "plateau"
    ramp.max_accum_steps = 8
    ramp.factor = 2
    if ramp.trigger == "schedule":
        ramp.schedule = ((50, 4), (100, 8))
    ramp.patience = 15
    ramp.plateau_delta = 0.02
    ramp.ema_decay = 0.9
    config.generate.prompt = "def fibonacci(n):\n"
    config.generate.max_new_tokens = 64
    return config
