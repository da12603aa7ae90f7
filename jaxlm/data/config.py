"""Data pipeline settings."""

from __future__ import annotations

from jaxlm.schema import ConfigError, field, section


@section
class DataConfig:
    sources: tuple[str, ...] = field(
        ("stdlib",), "document sources: 'stdlib' (this interpreter's standard library .py "
        "files), 'pydocs' (the plain-text Python documentation), 'text:<glob>', "
        "'jsonl:<glob>[:field]', 'arrayrecord:<glob>'")
    weights: tuple[float, ...] = field((), "mixture weight per source from step 0, as the "
                                       "fraction of packed rows it supplies (empty: uniform)")
    stages: tuple[tuple[float, ...], ...] = field(
        (), "later mixture stages ((start_step, w_0, ..., w_n-1), ...): from start_step on, "
        "rows are drawn with these weights (data.weights hold before the first stage)")
    tokenizer: str = field("byte", "tokenizer backend: byte-level, a BPE trained here on "
                           "data.sources (on first use if tokenizer_path does not exist), or any "
                           "tokenizer.json file", choices=("byte", "bpe", "file"))
    tokenizer_path: str = field("", "file: the tokenizer.json; bpe: where the trained BPE is "
                                "cached (empty: ~/.cache/jaxlm/tokenizers/<hash of the BPE's "
                                "data fields>.json)")
    bpe_vocab_size: int = field(4096, "bpe: vocabulary size to train, special tokens included",
                                min=261)
    bpe_train_chars: int = field(20_000_000, "bpe: characters of training-split text the BPE "
                                 "is trained on", min=1)
    fim_rate: float = field(0.0, "probability that a document piece in a packed row is "
                            "fill-in-the-middle transformed (StarCoder: 0.5)", min=0.0, max=1.0)
    fim_spm_rate: float = field(0.5, "probability that a FIM piece uses SPM order instead of "
                                "PSM", min=0.0, max=1.0)
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
        previous = 0
        for i, stage in enumerate(self.stages):
            if not stage or stage[0] != int(stage[0]):
                raise ConfigError(f"data.stages[{i}]={stage}: expected (start_step, "
                                  f"{', '.join(f'w_{j}' for j in range(len(self.sources)))}) "
                                  "with an integer start_step")
            start, weights = int(stage[0]), tuple(stage[1:])
            if start <= previous:
                raise ConfigError(f"data.stages[{i}].start_step={start}: expected > {previous} "
                                  "(stages start after step 0, in increasing order)")
            if len(weights) != len(self.sources):
                raise ConfigError(f"data.stages[{i}].weights={weights}: expected "
                                  f"{len(self.sources)} weights, one per source")
            if min(weights) < 0 or sum(weights) <= 0:
                raise ConfigError(f"data.stages[{i}].weights={weights}: expected non-negative "
                                  "weights with a positive sum")
            previous = start
        if self.tokenizer == "file" and not self.tokenizer_path:
            raise ConfigError(f"data.tokenizer_path='': expected a tokenizer.json path with "
                              f"data.tokenizer={self.tokenizer!r}")

    def schedule(self) -> tuple[tuple[int, tuple[float, ...]], ...]:
        """The full stage schedule ((0, weights), (start_step, weights), ...), weights
        normalised to sum to 1."""
        first = self.weights or (1.0,) * len(self.sources)
        stages = ((0, first), *((int(stage[0]), stage[1:]) for stage in self.stages))
        return tuple((start, tuple(w / sum(weights) for w in weights))
                     for start, weights in stages)
