"""Text generation settings."""

from __future__ import annotations

from jaxlm.schema import field, section


@section
class GenerateConfig:
    prompt: str = field("def fibonacci(n):\n", "prompt for --mode generate (and the sample "
                        "printed at the end of training)")
    max_new_tokens: int = field(64, "tokens to generate", min=1)
    temperature: float = field(0.0, "sampling temperature (0: greedy)", min=0.0)
    top_k: int = field(0, "sample from the k most likely tokens (0: all)", min=0)
    top_p: float = field(1.0, "nucleus sampling mass (1: all)", min=0.0, max=1.0,
                         min_exclusive=True)
    seed: int = field(0, "sampling seed", min=0)
