"""Launch modes: one module each, defining its own absl flags and `run(ctx)`.

A mode module must not import JAX at import time (flag errors should never wait for it).
`ctx.config()` returns the validated config (from --config, else the workdir's config.json),
`ctx.workdir` the run directory, `ctx.flags` the parsed flags, `ctx.fail(msg)` exits with a
one-line error. A mode that needs no run directory sets `NEEDS_WORKDIR = False`.
"""

from experiments.modes import evaluate, generate, train, train_tokenizer
from experiments.modes import convert, merge, upscale
from experiments.modes import dpo, sft

MODES = {"train": train, "eval": evaluate, "generate": generate,
         "train_tokenizer": train_tokenizer}
MODES.update(convert=convert, upscale=upscale, merge=merge)
MODES.update(sft=sft, dpo=dpo)
