"""One device mesh with axes ('data', 'expert', 'tensor'); tensor is innermost so its
collectives stay between neighbouring devices."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "expert", "tensor")


def make_mesh(data: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all). `data=-1` takes the devices left over; a mesh
    smaller than the device count (its size dividing it) uses the first devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fixed = tensor * expert
    if data == -1:
        if n % fixed:
            raise ValueError(f"mesh tensor={tensor} × expert={expert} = {fixed} does not divide "
                             f"the {n} devices")
        data = n // fixed
    size = data * fixed
    if size > n or n % size:
        raise ValueError(f"mesh data={data} × expert={expert} × tensor={tensor} = {size} does "
                         f"not divide the {n} devices")
    return Mesh(np.asarray(devices[:size]).reshape(data, expert, tensor), MESH_AXES)


def mesh_from_config(parallel_cfg) -> Mesh:
    return make_mesh(parallel_cfg.data, parallel_cfg.tensor, parallel_cfg.expert)
