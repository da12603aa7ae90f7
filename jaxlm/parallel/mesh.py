"""One device mesh with axes ('data', 'expert', 'tensor'); tensor is innermost so its
collectives stay between neighbouring devices (and, on several hosts, inside one host)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.parallel.validate import ShardingError

MESH_AXES = ("data", "expert", "tensor")


def make_mesh(data: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all). `data=-1` takes the devices left over; a mesh
    smaller than the device count (its size dividing it) uses the first devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    for name, size in (("data", data), ("tensor", tensor), ("expert", expert)):
        if size < 1 and not (name == "data" and size == -1):
            raise ShardingError(f"parallel.{name}={size}: expected a positive mesh axis size"
                                + (" (or -1 for the devices left over)" if name == "data" else ""))
    fixed = tensor * expert
    if data == -1:
        if n % fixed:
            raise ShardingError(f"parallel.tensor={tensor} × parallel.expert={expert} = {fixed}: "
                                f"expected a divisor of the {n} devices")
        data = n // fixed
    size = data * fixed
    if size > n or n % size:
        raise ShardingError(f"parallel.data={data} × parallel.expert={expert} × "
                            f"parallel.tensor={tensor} = {size} devices: expected a divisor of "
                            f"the {n} devices")
    return Mesh(np.asarray(devices[:size]).reshape(data, expert, tensor), MESH_AXES)


def mesh_from_config(parallel_cfg) -> Mesh:
    return make_mesh(parallel_cfg.data, parallel_cfg.tensor, parallel_cfg.expert)
