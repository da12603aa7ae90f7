"""The experiment config: one section per room, built and validated by `jaxlm.schema`.

    config = default_config()          # ml_collections.ConfigDict, what config files edit
    cfg = parse_config(config)         # frozen, validated; what the code runs on

Every field has a default and a one-line help (`describe_config()` lists them all).
"""

from __future__ import annotations

from jaxlm.data.config import DataConfig
from jaxlm.data.preference import AlignDataConfig
from jaxlm.infer.config import GenerateConfig
from jaxlm.models.config import ModelConfig
from jaxlm.parallel.config import ParallelConfig
from jaxlm.schema import (ConfigError, describe, field, from_config_dict, section,
                          to_config_dict)
from jaxlm.train.config import TrainConfig


@section
class Config:
    model: ModelConfig = field(ModelConfig(), "the network")
    data: DataConfig = field(DataConfig(), "documents, tokenizer, batches")
    train: TrainConfig = field(TrainConfig(), "optimizer, schedule, loop, checkpoints")
    parallel: ParallelConfig = field(ParallelConfig(), "mesh and sharding")
    generate: GenerateConfig = field(GenerateConfig(), "sampling")
    align: AlignDataConfig = field(AlignDataConfig(), "SFT / DPO rows (train.objective 'sft' "
                                   "or 'dpo'); batches take data.seq_len, data.batch_size and "
                                   "data.tokenizer")

    def validate(self) -> None:
        if self.data.batch_size % self.train.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.train.grad_accum_steps}: expected "
                              f"a divisor of data.batch_size={self.data.batch_size}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len}: expected <= "
                              f"model.max_seq_len={self.model.max_seq_len}")
        if self.train.objective != "lm":
            if not self.align.path:
                raise ConfigError(f"align.path='': expected a JSONL file with "
                                  f"train.objective={self.train.objective!r}")
            self.align.check(self.data.seq_len)


def default_config():
    return to_config_dict(Config())


def parse_config(config) -> Config:
    return from_config_dict(Config, config)


def describe_config() -> list[tuple[str, object, str]]:
    return describe(Config)
