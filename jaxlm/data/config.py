"""Data pipeline settings."""

from __future__ import annotations

from jaxlm.schema import ConfigError, field, section


@section
class DataConfig:
    sources: tuple[str, ...] = field(
        ("stdlib",), "document sources: 'stdlib' (this interpreter's standard library .py "
        "files), 'text:<glob>', 'jsonl:<glob>[:field]', 'arrayrecord:<glob>'")
    weights: tuple[float, ...] = field((), "mixture weight per source (empty: proportional to "
                                       "a single source / uniform)")
    tokenizer: str = field("byte", "tokenizer backend: byte-level, a trained BPE, or a "
                           "tokenizer.json file", choices=("byte", "bpe", "file"))
    tokenizer_path: str = field("", "bpe / file: path of the tokenizer.json")
    seq_len: int = field(256, "tokens per training row (inputs; targets are shifted by one)",
                         min=1)
    batch_size: int = field(16, "global batch in rows per optimizer step", min=1)
    heldout_fraction: float = field(0.05, "fraction of documents held out for evaluation "
                                    "(split by a hash of each document's name)", min=0.0, max=0.5)
    document_masking: bool = field(False, "attend only within a document in packed rows "
                                   "(positions restart per document)")
    seed: int = field(0, "shuffle seed of the document order", min=0)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources=(): expected at least one source")
        if self.weights and len(self.weights) != len(self.sources):
            raise ConfigError(f"data.weights={self.weights}: expected {len(self.sources)} "
                              "weights, one per source")
        if self.weights and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ConfigError(f"data.weights={self.weights}: expected non-negative weights with "
                              "a positive sum")
        if self.tokenizer in ("bpe", "file") and not self.tokenizer_path:
            raise ConfigError(f"data.tokenizer_path='': expected a tokenizer.json path with "
                              f"data.tokenizer={self.tokenizer!r}")
