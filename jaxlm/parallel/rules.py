"""The one table mapping logical axis names to mesh axes.

Modules name the axes of every parameter and of activations at block boundaries with words
from this vocabulary; nothing else in the library mentions a mesh axis:

    batch, length                   activations
    vocab, embed, heads, kv_heads,  parameters (and the matching activation dims)
    head_dim, mlp, experts,
    ssm_heads, state, conv, layers

Megatron layout: q/k/v/gate/up are split on their output (heads, mlp), o/down on their input,
embedding and unembedding on vocab, Mamba heads on tensor, experts on expert; the batch is
split over data and expert.
"""

from __future__ import annotations

from typing import Sequence

from jaxlm.parallel.mesh import MESH_AXES
from jaxlm.parallel.validate import ShardingError

Rules = tuple[tuple[str, object], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("ssm_heads", "tensor"),
    ("state", None),
    ("conv", None),
    ("layers", None),
)


def make_rules(overrides: Sequence[str] = ()) -> Rules:
    """DEFAULT_RULES with 'name=axis[,axis]' overrides ('name=' replicates that name)."""
    table = dict(DEFAULT_RULES)
    for entry in overrides:
        name, sep, axes = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ShardingError(f"parallel.rules entry {entry!r}: expected "
                                "'logical_name=mesh_axis[,mesh_axis]'")
        if name not in table:
            raise ShardingError(f"parallel.rules entry {entry!r}: unknown logical axis "
                                f"{name!r}; expected one of {list(table)}")
        parts = tuple(a.strip() for a in axes.split(",") if a.strip())
        for axis in parts:
            if axis not in MESH_AXES:
                raise ShardingError(f"parallel.rules entry {entry!r}: unknown mesh axis "
                                    f"{axis!r}; expected one of {list(MESH_AXES)}")
        table[name] = parts[0] if len(parts) == 1 else (parts or None)
    return tuple(table.items())
