"""Optimizer, schedule, loop and checkpoint settings."""

from __future__ import annotations

from jaxlm.schema import ConfigError, field, section
from jaxlm.train.dpo import DPOConfig
from jaxlm.train.ramp import RampConfig


@section
class TrainConfig:
    steps: int = field(1000, "optimizer steps", min=1)
    learning_rate: float = field(3e-4, "peak learning rate", min=0.0)
    warmup_steps: int = field(100, "linear warmup from 0 to the peak", min=0)
    schedule: str = field("cosine", "after warmup: cosine decay to min_lr_ratio·peak, linear "
                          "decay to it, or constant", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = field(0.1, "final learning rate ÷ peak", min=0.0, max=1.0)
    b1: float = field(0.9, "AdamW β1", min=0.0, max=1.0)
    b2: float = field(0.95, "AdamW β2", min=0.0, max=1.0)
    eps: float = field(1e-8, "AdamW ε", min=0.0)
    weight_decay: float = field(0.1, "decoupled weight decay (not on norms, biases, SSM "
                                "A_log/D/dt_bias)", min=0.0)
    grad_clip: float = field(1.0, "global-norm gradient clip (0: off)", min=0.0)
    grad_accum_steps: int = field(1, "micro-batches per optimizer step (divides "
                                  "data.batch_size)", min=1)
    z_loss: float = field(0.0, "coefficient of the output z-loss mean(logsumexp(logits)²)",
                          min=0.0)
    seed: int = field(0, "seed of parameter init and per-step randomness", min=0)
    log_every: int = field(10, "steps between training-metric logs", min=1)
    eval_every: int = field(100, "steps between held-out evaluations (0: only at the end)",
                            min=0)
    eval_batches: int = field(8, "held-out batches per evaluation", min=1)
    checkpoint_every: int = field(200, "steps between checkpoints (the last step is always "
                                  "saved)", min=1)
    keep_checkpoints: int = field(3, "newest checkpoints kept on disk", min=1)
    async_checkpoint: bool = field(True, "write checkpoints in the background")
    progress_bar: bool = field(True, "show a tqdm progress bar")
    max_nonfinite_steps: int = field(10, "stop the run after this many consecutive steps with "
                                     "a non-finite loss or gradient norm (0: never stop)", min=0)
    objective: str = field("lm", "what is trained: lm (next token on data.sources), sft "
                           "(completion tokens of align.path's prompt/completion rows) or dpo "
                           "(align.path's chosen/rejected pairs)", choices=("lm", "sft", "dpo"))
    dpo: DPOConfig = field(DPOConfig(), "direct preference optimisation (objective='dpo')")
    ramp: RampConfig = field(RampConfig(), "batch-size ramp: accumulate more micro-batches "
                             "per step as training goes (objective 'lm' or 'sft')")

    def validate(self) -> None:
        if self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: expected <= "
                              f"train.steps={self.steps}")
        self.ramp.check(self.grad_accum_steps)
        if self.ramp.trigger != "off" and self.objective == "dpo":
            raise ConfigError(f"train.ramp.trigger={self.ramp.trigger!r}: expected 'off' with "
                              "train.objective='dpo' (the ramp drives the LM / SFT step)")
