"""Mesh shape, ZeRO stage and logical-axis rule overrides."""

from __future__ import annotations

from jaxlm.schema import ConfigError, field, section


@section
class ParallelConfig:
    data: int = field(-1, "data-parallel mesh axis size (-1: the devices left over)", min=-1)
    tensor: int = field(1, "tensor-parallel mesh axis size (Megatron layout)", min=1)
    expert: int = field(1, "expert-parallel mesh axis size", min=1)
    zero: int = field(0, "0: replicate optimizer state; 1: shard it over data; 3: shard "
                      "parameters too (FSDP)", choices=(0, 1, 3))
    rules: tuple[str, ...] = field((), "logical-axis rule overrides 'name=axis[,axis]' "
                                   "('name=' replicates), applied over the defaults")

    def validate(self) -> None:
        if self.data == 0:
            raise ConfigError("parallel.data=0: expected -1 or a positive size")
        for rule in self.rules:
            if "=" not in rule:
                raise ConfigError(f"parallel.rules entry {rule!r}: expected 'logical_name=mesh_axis'")
