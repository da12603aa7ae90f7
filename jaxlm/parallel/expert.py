"""Expert parallelism: routed experts computed where their weights live, tokens moved by
all-to-all, so expert weights are never gathered.

The MoE layer (jaxlm/layers/moe.py) names its expert weights' axes `experts, embed, mlp` and
its tokens `batch`; the rules table maps them to mesh axes (experts -> expert, batch -> (data,
expert), mlp -> tensor). Under a mesh whose `experts` axis is split over more than one device,
left to GSPMD, the blocked grouped matmul's dynamic per-expert slices would make XLA gather
every expert's weights on every device. Instead `dropless_ffn_ep` runs the dispatch inside a
`shard_map`, per device (n = size of the experts' mesh axis, E_l = E / n local experts):

    1. sort this device's T·k assignments by expert; expert e lives on device e // E_l, so the
       sort also groups them by destination;
    2. lay them out in a send buffer [n, A, d] (A = T·k, each destination's rows first, the
       rest zero) and `all_to_all` it over the experts' axis: device j receives, from every
       source i, the rows routed to its experts [n, A, d], with their local expert ids;
    3. run its E_l experts on the received rows as grouped matmuls (`moe.grouped_matmul`, rows
       sorted and padded per expert; rows marked empty are skipped, not computed);
    4. `all_to_all` the outputs back into the sources' slots and take each token's weighted sum
       over its k experts (`moe.combine_rows`).

The buffers have room for the worst case (all of a device's assignments going to one
destination), which keeps the layer dropless with static shapes at the price of n× the
assignment rows in the all-to-all buffers. XLA:CPU has no `ragged_all_to_all` (it would send
only the filled rows); the padded form is what runs here. Rows past a destination's count are
zeros and cost bandwidth, not expert FLOPs.

When `mlp` is split over a tensor axis too, each device holds a slice of every local expert's
hidden width: the outputs are partial sums, added with one `psum` over that axis after the
combine (on [T, d], the smallest tensor of the path).

Nothing here names a mesh axis: the axes come from the logical-axis rules in effect
(`nn.logical_axis_rules`) and the mesh from `jax.set_mesh` (`jax.sharding.get_abstract_mesh`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlm.parallel.validate import ShardingError


class ExpertAxes(NamedTuple):
    """Mesh axes (tuples, possibly empty) the MoE's logical axes map to, and their sizes."""

    experts: tuple[str, ...]
    batch: tuple[str, ...]
    mlp: tuple[str, ...]
    expert_size: int
    batch_size: int


def _as_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def expert_axes() -> Optional[ExpertAxes]:
    """The current mesh's axes for experts / batch / mlp, or None when experts are not split
    (no mesh, no rules, or an experts axis of size 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    rules = nn.get_logical_axis_rules()
    if not rules:
        return None
    present = set(mesh.axis_names)
    # one name at a time: flax gives each mesh axis to one dim of a spec only
    experts, batch, mlp = (tuple(a for a in _as_tuple(nn.logical_to_mesh_axes((name,), rules)[0])
                                 if a in present) for name in ("experts", "batch", "mlp"))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    expert_size = 1
    for axis in experts:
        expert_size *= sizes[axis]
    if expert_size == 1:
        return None
    batch_size = 1
    for axis in batch:
        batch_size *= sizes[axis]
    return ExpertAxes(experts, batch, mlp, expert_size, batch_size)


def check_expert_axes(axes: ExpertAxes, num_experts: int, num_tokens: int) -> None:
    """One-line errors for shapes the expert-parallel dispatch cannot split."""
    over = " × ".join(axes.experts)
    if num_experts % axes.expert_size:
        raise ShardingError(f"model.moe.num_experts={num_experts}: expected a multiple of the "
                            f"expert-parallel mesh size {axes.expert_size} (mesh axis {over}, "
                            "parallel.expert)")
    if not set(axes.experts) <= set(axes.batch):
        raise ShardingError(f"expert parallelism: the experts' mesh axis {over} must also split "
                            "the batch (rules: batch=data,expert), so that each device sends "
                            "its own tokens")
    if num_tokens % axes.batch_size:
        raise ShardingError(f"MoE input of {num_tokens} rows: expected a multiple of the batch "
                            f"mesh size {axes.batch_size} (data × expert)")


def _sort_into_destinations(experts_a, num_dest: int, local_experts: int):
    """Slots of the send buffer [num_dest · A]: for each slot the assignment it holds (A if
    empty) and its expert id local to the destination (local_experts if empty); for each
    assignment its slot."""
    n_assign = experts_a.shape[0]
    order = jnp.argsort(experts_a, stable=True)                    # sorted pos -> assignment
    dest_sorted = experts_a[order] // local_experts
    counts = jnp.bincount(dest_sorted, length=num_dest)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(n_assign, dtype=jnp.int32)
    slot_sorted = dest_sorted * n_assign + (pos - starts[dest_sorted])
    slot_of_assignment = jnp.zeros(n_assign, jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    assignment_of_slot = jnp.full(num_dest * n_assign, n_assign, jnp.int32).at[slot_sorted].set(
        order.astype(jnp.int32))
    valid = assignment_of_slot < n_assign
    local_of_slot = jnp.where(
        valid, experts_a[jnp.minimum(assignment_of_slot, n_assign - 1)] % local_experts,
        local_experts)
    return assignment_of_slot, slot_of_assignment, local_of_slot.astype(jnp.int32)


def _local_experts_ffn(x_rd, local_expert_r, wi_gate, wi_up, wo, *, block: int, impl):
    """SwiGLU expert `local_expert_r[r]` on row r; rows with id == E_l are empty (zero out,
    no FLOPs): the rows are sorted by expert, padded per expert to the block, and run through
    the grouped matmuls."""
    from jaxlm.layers import moe  # layers <- parallel would be a cycle at import time

    num_rows = x_rd.shape[0]
    num_local = wi_gate.shape[0]
    order = jnp.argsort(local_expert_r, stable=True).astype(jnp.int32)   # sorted -> row
    counts = jnp.bincount(local_expert_r, length=num_local)               # drops id E_l
    layout = moe.padded_layout(counts, num_rows, block)
    padded_total = layout.source_of_row.shape[0]
    # padded row -> original row (num_rows: padding); original row -> padded row
    row_of_padded = jnp.where(layout.source_of_row < num_rows,
                              order[jnp.minimum(layout.source_of_row, num_rows - 1)], num_rows)
    padded_of_row = jnp.full(num_rows, padded_total, jnp.int32).at[order].set(
        layout.row_of_source)
    x_pd = moe.gather_rows(x_rd, row_of_padded, padded_of_row[:, None])
    matmul = functools.partial(moe.grouped_matmul, group_sizes_e=layout.padded_sizes,
                               block=block, aligned=True, impl=impl)
    dtype = x_rd.dtype
    y_pd = moe.swiglu_experts(matmul, x_pd, wi_gate.astype(dtype), wi_up.astype(dtype),
                              wo.astype(dtype))
    return moe.gather_rows(y_pd, padded_of_row, row_of_padded[:, None])


def dropless_ffn_ep(x_td, experts_tk, weights_tk, wi_gate_edi, wi_up_edi, wo_eid,
                    axes: ExpertAxes, *, impl: Optional[str] = None, block: int = 0):
    """Expert-parallel `moe.dropless_ffn`: same inputs (global shapes, sharded by the rules),
    same output [T, d]. See the module docstring for the dispatch."""
    from jaxlm.layers import moe

    num_experts = wi_gate_edi.shape[0]
    check_expert_axes(axes, num_experts, x_td.shape[0])
    impl = impl or moe.default_grouped_matmul_impl()
    n = axes.expert_size
    local = num_experts // n
    tokens_local = x_td.shape[0] // axes.batch_size
    k = experts_tk.shape[1]
    n_assign = tokens_local * k
    if impl == "ragged":
        block = 1
    elif not block:
        block = moe.auto_block_size(n_assign, local)
    ep = axes.experts if len(axes.experts) > 1 else axes.experts[0]
    tp = axes.mlp

    def per_device(x_td, experts_tk, weights_tk, wi_gate, wi_up, wo):
        t = x_td.shape[0]
        assignment_of_slot, slot_of_assignment, local_of_slot = _sort_into_destinations(
            experts_tk.reshape(-1), n, local)
        token_of_slot = jnp.where(assignment_of_slot < n_assign, assignment_of_slot // k, t)
        send_sd = moe.gather_rows(x_td, token_of_slot, slot_of_assignment.reshape(t, k))
        recv_sd = lax.all_to_all(send_sd, ep, 0, 0, tiled=True)
        recv_local_s = lax.all_to_all(local_of_slot, ep, 0, 0, tiled=True)
        y_sd = _local_experts_ffn(recv_sd, recv_local_s, wi_gate, wi_up, wo, block=block,
                                  impl=impl)
        back_sd = lax.all_to_all(y_sd, ep, 0, 0, tiled=True)
        y_td = moe.combine_rows(back_sd, slot_of_assignment.reshape(t, k), weights_tk,
                                assignment_of_slot)
        return lax.psum(y_td, tp) if tp else y_td

    batch = P(axes.batch)
    w_in = P(ep, None, tp or None)
    w_out = P(ep, tp or None, None)
    # check_vma=False: the grouped matmul's loops start from unvarying zeros; the equality of
    # loss and gradients with one device is what the tests check instead.
    return jax.shard_map(per_device, in_specs=(batch, batch, batch, w_in, w_in, w_out),
                         out_specs=batch, check_vma=False)(x_td, experts_tk, weights_tk, wi_gate_edi, wi_up_edi,
                                          wo_eid)
