"""Mixture-of-experts FFN: router, routed + shared SwiGLU experts, dropless and capacity dispatch.

    logits = x·W_router (float32) -> route (top-k experts + weights per token)
    dropless: sort the T·k assignments by expert -> grouped matmuls -> gather back, Σ_k w·y
    capacity: GShard dispatch/combine one-hot einsums, C slots per expert and sequence
    y = routed + shared SwiGLU(x);  aux = load-balancing and z losses, expert load, drops

Choices worth knowing:
* Load-balancing loss: Switch normalisation (f_e = share of all T·k assignments), so a uniform
  router scores 1 for any k; Hugging Face's Mixtral/Granite loss is k × this (see
  `load_balancing_loss`). Padding tokens are routed and counted like any other (the layer does
  not see the loss mask).
* Grouped matmul: one function (`grouped_matmul`), `ragged_dot` on GPU/TPU and a blocked loop
  on CPU where `ragged_dot` is ~150x slower than a dense matmul; the dropless layout pads each
  expert's rows to the CPU block once and the three expert matmuls share it.
* Gathers whose gradients would be scatters (dispatch, combine) have custom VJPs that are
  gathers too: XLA's CPU scatter is a serial loop.
* Expert parallelism: when the rules in effect split `experts` over a mesh axis of size > 1,
  the dropless path dispatches by all-to-all inside a shard_map (`jaxlm.parallel.expert`), so
  expert weights stay where they live; this module only asks that module whether the current
  mesh splits experts and never names a mesh axis. The capacity path stays plain einsums,
  which GSPMD partitions.
* Decoding-sized calls (T·k ≤ E) gather the chosen experts' weights per assignment
  (`gathered_experts_ffn`) instead of looping over all E experts.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxlm.layers.mlp import Dense
from jaxlm.parallel import expert as expert_parallel
from jaxlm.schema import ConfigError, field, section


@section
class MoEConfig:
    num_experts: int = field(0, "routed experts per MoE layer (0: dense FFN)", min=0)
    top_k: int = field(2, "experts each token is routed to", min=1)
    mlp_dim: int = field(0, "hidden width of each routed expert", min=0)
    num_shared_experts: int = field(0, "always-on shared experts (DeepSeek / Granite)", min=0)
    shared_mlp_dim: int = field(0, "hidden width of each shared expert (0: mlp_dim)", min=0)
    router: str = field("softmax_topk", "routing rule: softmax then top-k (Mixtral), top-k of the "
                        "logits then softmax (Granite), sigmoid with a selection bias (DeepSeek-V3)",
                        choices=("softmax_topk", "topk_softmax", "sigmoid_bias"))
    renormalize: bool = field(True, "divide the top-k weights by their sum (softmax_topk/sigmoid)")
    routed_scaling: float = field(1.0, "multiplier on the routed output (DeepSeek-V3)", min=0.0)
    jitter: float = field(0.0, "multiplicative router-input noise in training", min=0.0)
    dispatch: str = field("dropless", "token dispatch: sort + grouped matmul, or GShard capacity",
                          choices=("dropless", "capacity"))
    capacity_factor: float = field(1.25, "capacity dispatch: slots per expert ÷ fair share",
                                   min=0.0, min_exclusive=True)
    aux_loss_coef: float = field(0.01, "Switch load-balancing loss coefficient", min=0.0)
    z_loss_coef: float = field(0.001, "router z-loss coefficient", min=0.0)
    bias_update_rate: float = field(0.001, "sigmoid_bias: γ of the aux-loss-free bias update",
                                    min=0.0)
    block_size: int = field(0, "dropless on CPU: rows per block of the grouped matmul; each "
                            "expert's rows are padded to a multiple of it (0: auto)", min=0)


def _check_runnable(cfg: MoEConfig) -> None:
    """The MoE layer itself needs experts (the section alone allows 0 = 'no MoE')."""
    if cfg.num_experts < 1:
        raise ConfigError(f"model.moe.num_experts={cfg.num_experts}: expected >= 1 with ffn='moe'")
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(f"model.moe.top_k={cfg.top_k}: expected <= "
                          f"model.moe.num_experts={cfg.num_experts}")
    if cfg.mlp_dim < 1:
        raise ConfigError(f"model.moe.mlp_dim={cfg.mlp_dim}: expected >= 1 with ffn='moe'")


# ---- router ----------------------------------------------------------------------------------

def route(logits_te, cfg: MoEConfig, selection_bias_e=None):
    """Float32 routing. Returns (weights [T, k], experts [T, k] int32, probs [T, E]).

    `probs` are the per-token expert probabilities the load-balancing loss uses: softmax of the
    logits for the two softmax routers, the sigmoid scores normalised over experts for
    `sigmoid_bias` (DeepSeek-V3's sequence-wise balance loss uses the same normalisation).
    """
    router_dtype = jnp.promote_types(logits_te.dtype, jnp.float32)
    logits_te = logits_te.astype(router_dtype)
    k = cfg.top_k
    if cfg.router == "softmax_topk":
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        weights_tk, experts_tk = lax.top_k(probs_te, k)
        if cfg.renormalize:
            weights_tk = weights_tk / jnp.sum(weights_tk, -1, keepdims=True)
    elif cfg.router == "topk_softmax":
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        top_logits_tk, experts_tk = lax.top_k(logits_te, k)
        weights_tk = jax.nn.softmax(top_logits_tk, axis=-1)
    elif cfg.router == "sigmoid_bias":
        scores_te = jax.nn.sigmoid(logits_te)
        probs_te = scores_te / jnp.sum(scores_te, -1, keepdims=True)
        bias_e = (jnp.zeros(logits_te.shape[-1], router_dtype) if selection_bias_e is None
                  else lax.stop_gradient(selection_bias_e.astype(router_dtype)))
        _, experts_tk = lax.top_k(scores_te + bias_e, k)  # the bias steers selection only
        weights_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
        if cfg.renormalize:
            weights_tk = weights_tk / jnp.sum(weights_tk, -1, keepdims=True)
    else:
        raise ConfigError(f"model.moe.router={cfg.router!r}: expected one of "
                          "['softmax_topk', 'topk_softmax', 'sigmoid_bias']")
    return weights_tk * cfg.routed_scaling, experts_tk.astype(jnp.int32), probs_te


def expert_counts(experts_tk, num_experts: int):
    """Assignments per expert [E] (int32) over all T·k choices."""
    return jnp.bincount(experts_tk.reshape(-1), length=num_experts).astype(jnp.int32)


def load_balancing_loss(probs_te, counts_e):
    """Switch/GShard L_aux = E · Σ_e f_e · P_e, f_e = share of the T·k assignments to e,
    P_e = mean router probability of e. Equals 1 when routing is uniform, for every k.

    Hugging Face's Mixtral / Granite loss sums f over the k choice slots separately, i.e. it is
    k × this value (and is computed over all layers' tokens at once rather than averaged over
    layers); multiply `aux_loss_coef` by top_k to match its scale.
    """
    num_experts = probs_te.shape[-1]
    dtype = jnp.promote_types(probs_te.dtype, jnp.float32)
    f_e = counts_e.astype(dtype) / jnp.maximum(jnp.sum(counts_e), 1)
    p_e = jnp.mean(probs_te.astype(dtype), axis=0)
    return num_experts * jnp.sum(f_e * p_e)


def router_z_loss(logits_te):
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)²."""
    logits_te = logits_te.astype(jnp.promote_types(logits_te.dtype, jnp.float32))
    return jnp.mean(jax.nn.logsumexp(logits_te, axis=-1) ** 2)


# ---- row gathers whose gradient is a gather, not a scatter ------------------------------------

@jax.custom_vjp
def gather_rows(x_nd, index_r, inverse_nm):
    """out[r] = x[index[r]], where index == N (one past the end) yields a zero row.

    `inverse[s]` lists every r with index[r] == s, padded with R (len(index)). The gradient is
    then dx[s] = Σ_m g[inverse[s, m]] — a gather — instead of the scatter-add autodiff would
    emit (XLA's CPU scatter is a serial loop). Dispatch and combine are both such gathers.
    """
    return _take_rows(x_nd, index_r)


def _take_rows(x_nd, index_r):
    zero_row = jnp.zeros((1,) + x_nd.shape[1:], x_nd.dtype)
    return jnp.concatenate([x_nd, zero_row]).at[index_r].get(mode="promise_in_bounds")


def _gather_rows_fwd(x_nd, index_r, inverse_nm):
    return _take_rows(x_nd, index_r), inverse_nm


def _gather_rows_bwd(inverse_nm, g_rd):
    n, m = inverse_nm.shape
    dx = _take_rows(g_rd, inverse_nm.reshape(-1)).reshape((n, m) + g_rd.shape[1:])
    return jnp.sum(dx, axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine_rows(y_rd, row_tk, weights_tk, assignment_of_row):
    """out[t] = Σ_j weights[t, j] · y[row[t, j]] without materialising the [T, k, d] gather.

    `assignment_of_row[r]` is the flat index t·k + j of the assignment that row r holds (T·k
    for padding). Backward: dy[r] = weight(r) · g[token(r)] and dweights[t, j] = g[t] ·
    y[row[t, j]], both gathers fused with their arithmetic (the autodiff version writes and
    reads two [T·k, d] buffers, ~70 MB each at 4096 tokens × top-8 × d=512).
    """
    return _combine_forward(y_rd, row_tk, weights_tk)


def _combine_forward(y_rd, row_tk, weights_tk):
    gathered_tkd = y_rd.at[row_tk].get(mode="promise_in_bounds")
    return jnp.sum(gathered_tkd * weights_tk[..., None].astype(y_rd.dtype), axis=1)


def _combine_rows_fwd(y_rd, row_tk, weights_tk, assignment_of_row):
    return (_combine_forward(y_rd, row_tk, weights_tk),
            (y_rd, row_tk, weights_tk, assignment_of_row))


def _combine_rows_bwd(residuals, g_td):
    y_rd, row_tk, weights_tk, assignment_of_row = residuals
    k = row_tk.shape[1]
    weight_of_row = _take_rows(weights_tk.reshape(-1), assignment_of_row)
    d_y = weight_of_row[:, None].astype(g_td.dtype) * _take_rows(g_td, assignment_of_row // k)
    d_weights = jnp.sum(y_rd.at[row_tk].get(mode="promise_in_bounds") * g_td[:, None, :], -1)
    return d_y.astype(y_rd.dtype), None, d_weights.astype(weights_tk.dtype), None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# ---- grouped matmul --------------------------------------------------------------------------

def _round_up(x, multiple):
    return (x + multiple - 1) // multiple * multiple


class PaddedLayout(NamedTuple):
    """Rows of groups laid out so that every group starts at a multiple of `block`.

    source_of_row [R]: source row feeding padded row r (N = padding, a zero row);
    row_of_source [N]: padded row of source row s (R if s is past the last group);
    padded_sizes [E]: group sizes rounded up to the block.
    """

    source_of_row: jax.Array
    row_of_source: jax.Array
    padded_sizes: jax.Array


def padded_rows(num_rows: int, num_groups: int, block: int) -> int:
    """Static bound on the padded row count: N + E·(block − 1), rounded up to the block."""
    return _round_up(num_rows + num_groups * (block - 1), block)


def padded_layout(group_sizes_e, num_rows: int, block: int) -> PaddedLayout:
    """Layout for `num_rows` rows sorted by group with sizes `group_sizes_e`."""
    num_groups = group_sizes_e.shape[0]
    sizes = group_sizes_e.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = _round_up(sizes, block)
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    total_rows = padded_rows(num_rows, num_groups, block)

    rows = jnp.arange(total_rows, dtype=jnp.int32)
    group_of_row = jnp.minimum(jnp.searchsorted(padded_ends, rows, side="right"), num_groups - 1)
    rank = rows - padded_starts[group_of_row]
    valid = (rank < sizes[group_of_row]) & (rows < padded_ends[-1])
    source_of_row = jnp.where(valid, starts[group_of_row] + rank, num_rows)

    src = jnp.arange(num_rows, dtype=jnp.int32)
    group_of_src = jnp.minimum(jnp.searchsorted(ends, src, side="right"), num_groups - 1)
    in_group = src < ends[-1]
    row_of_source = jnp.where(in_group, padded_starts[group_of_src] + src - starts[group_of_src],
                              total_rows)
    return PaddedLayout(source_of_row, row_of_source, padded)


def _accumulator(dtype):
    return jnp.promote_types(dtype, jnp.float32)


WIDE_ROWS = 512  # rows per matmul while an expert has that many left (bigger, faster GEMMs)


def _over_expert_rows(first_row, num_blocks, block: int, total_rows: int, body, carry):
    """Runs `body(row, rows, carry)` over one expert's `num_blocks` blocks from `first_row`:
    wide chunks of ~WIDE_ROWS rows while enough remain, then single blocks. The block sets the
    padding granularity (small: little padding); the wide chunks keep most matmuls large (the
    per-expert weight-gradient sums ran ~10% faster over 512-row chunks than over 128-row
    ones, and 32-row blocks alone were ~25% slower still)."""
    per_wide = max(1, min(WIDE_ROWS, total_rows) // block)
    num_wide = num_blocks // per_wide
    carry = lax.fori_loop(0, num_wide,
                          lambda i, c: body(first_row + i * per_wide * block, per_wide * block, c),
                          carry)
    return lax.fori_loop(num_wide * per_wide, num_blocks,
                         lambda i, c: body(first_row + i * block, block, c), carry)


def _expert_blocks(group_sizes_e, block: int):
    blocks_e = group_sizes_e // block
    return (jnp.cumsum(blocks_e) - blocks_e) * block, blocks_e


def _blocked_forward(lhs_md, rhs_edf, group_sizes_e, block: int, transpose_rhs: bool = False):
    """out[rows of group e] = lhs[rows] @ rhs[e] (or rhs[e]ᵀ), a chunk of rows at a time.

    Loops: experts outside (each expert's weights are sliced once), that expert's row chunks
    inside (a data-dependent trip count, so no work is spent on padding past its last block).
    Rows past the last group stay zero, as in `ragged_dot`.
    """
    acc = _accumulator(lhs_md.dtype)
    first_row_e, blocks_e = _expert_blocks(group_sizes_e, block)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    out_features = rhs_edf.shape[1] if transpose_rhs else rhs_edf.shape[2]

    def per_expert(e, out_mf):
        def chunk(row, rows, out_mf):
            # the expert's weights are sliced here, inside its row loop, so an expert without
            # rows costs nothing (hoisted out of the loop, the E weight copies dominated a
            # one-token decode step: 85 ms instead of ~1 ms for 32 experts of 512×256)
            x_cd = lax.dynamic_slice_in_dim(lhs_md, row, rows)
            y_cf = lax.dot_general(x_cd, rhs_edf[e], contract, preferred_element_type=acc)
            return lax.dynamic_update_slice_in_dim(out_mf, y_cf.astype(out_mf.dtype), row, 0)

        return _over_expert_rows(first_row_e[e], blocks_e[e], block, lhs_md.shape[0], chunk,
                                 out_mf)

    out_mf = jnp.zeros((lhs_md.shape[0], out_features), lhs_md.dtype)
    return lax.fori_loop(0, rhs_edf.shape[0], per_expert, out_mf)


def _blocked_weight_grad(lhs_md, g_mf, group_sizes_e, block: int, num_experts: int):
    """d rhs[e] = Σ over e's row chunks of lhs_chunkᵀ · g_chunk, accumulated per expert."""
    acc = _accumulator(lhs_md.dtype)
    first_row_e, blocks_e = _expert_blocks(group_sizes_e, block)

    def per_expert(_, e):
        def chunk(row, rows, sum_df):
            x_cd = lax.dynamic_slice_in_dim(lhs_md, row, rows)
            g_cf = lax.dynamic_slice_in_dim(g_mf, row, rows)
            return sum_df + lax.dot_general(x_cd, g_cf, (((0,), (0,)), ((), ())),
                                            preferred_element_type=acc)

        zero = jnp.zeros((lhs_md.shape[1], g_mf.shape[1]), acc)
        return None, _over_expert_rows(first_row_e[e], blocks_e[e], block, lhs_md.shape[0],
                                       chunk, zero)

    return lax.scan(per_expert, None, jnp.arange(num_experts))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_matmul(lhs_md, rhs_edf, group_sizes_e, block: int):
    return _blocked_forward(lhs_md, rhs_edf, group_sizes_e, block)


def _blocked_matmul_fwd(lhs_md, rhs_edf, group_sizes_e, block):
    return _blocked_forward(lhs_md, rhs_edf, group_sizes_e, block), (lhs_md, rhs_edf,
                                                                     group_sizes_e)


def _blocked_matmul_bwd(block, residuals, g_mf):
    lhs_md, rhs_edf, group_sizes_e = residuals
    d_lhs = _blocked_forward(g_mf, rhs_edf, group_sizes_e, block, transpose_rhs=True)
    d_rhs = _blocked_weight_grad(lhs_md, g_mf, group_sizes_e, block, rhs_edf.shape[0])
    return d_lhs, d_rhs.astype(rhs_edf.dtype), None


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


def default_grouped_matmul_impl() -> str:
    """'ragged' (jax.lax.ragged_dot) on GPU/TPU, 'blocked' on CPU."""
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def grouped_matmul(lhs_md, rhs_edf, group_sizes_e, *, block: int = 1, aligned: bool = False,
                   impl: Optional[str] = None):
    """`jax.lax.ragged_dot` semantics: rows sorted by group, out[rows of e] = lhs[rows] @ rhs[e];
    rows past Σ group_sizes are zero. Differentiable in lhs and rhs.

    impl='ragged' calls `ragged_dot` (XLA's grouped GEMM on GPU, Megablox-style on TPU).
    impl='blocked' is the CPU implementation: `ragged_dot` runs at ~2 GFLOP/s on the XLA CPU
    backend (≈150× slower than a dense matmul), so instead every group is padded to a multiple
    of `block` rows (≤ M + E·(block−1) rows in all, a static bound) and each block is one dense
    [block, D] × [D, F] matmul inside a two-level loop (experts, then that expert's blocks),
    with a custom VJP of the same form (d lhs: the loop over rhsᵀ; d rhs: per-expert sums of
    chunkᵀ·grad-chunk products). Chunks are ~WIDE_ROWS rows while an expert has that many.
    Measured on the 2-core dev box (64 experts, D=512, F=256, 33.8k rows, block 32; CPU ms):
    forward 66, d lhs 84, d rhs 94 — against 76, 100 and 62 for one dense matmul of the same
    [33.8k, 512] × [512, 256] shape, i.e. dense speed for this (narrow) shape overall, while
    `ragged_dot` ran at 1.5 GFLOP/s here (17 GFLOP/s with 8 experts of F=1152). A
    block-sparse einsum that gathers each block's weights ([blocks, D, F]) reached only
    ~20-40% of dense: the weight gather is memory-bound.

    aligned=True promises that every group size is a multiple of `block` (a caller that
    already laid its rows out with `padded_layout`); otherwise the blocked path pads and unpads
    internally with two row gathers.
    """
    impl = impl or default_grouped_matmul_impl()
    lhs_md, rhs_edf = jnp.asarray(lhs_md), jnp.asarray(rhs_edf)
    group_sizes_e = jnp.asarray(group_sizes_e)
    if impl == "ragged":
        return lax.ragged_dot(lhs_md, rhs_edf, group_sizes_e.astype(jnp.int32))
    if impl != "blocked":
        raise ValueError(f"grouped_matmul impl={impl!r}: expected 'ragged' or 'blocked'")
    if block < 1:
        raise ValueError(f"grouped_matmul block={block}: expected >= 1")
    group_sizes_e = group_sizes_e.astype(jnp.int32)
    if aligned:
        if lhs_md.shape[0] % block:
            raise ValueError(f"grouped_matmul: {lhs_md.shape[0]} rows is not a multiple of "
                             f"block={block} (aligned=True)")
        return _blocked_matmul(lhs_md, rhs_edf, group_sizes_e, block)
    layout = padded_layout(group_sizes_e, lhs_md.shape[0], block)
    lhs_rd = gather_rows(lhs_md, layout.source_of_row, layout.row_of_source[:, None])
    out_rf = _blocked_matmul(lhs_rd, rhs_edf, layout.padded_sizes, block)
    return gather_rows(out_rf, layout.row_of_source, layout.source_of_row[:, None])


def auto_block_size(num_assignments: int, num_experts: int) -> int:
    """A power of two near 1/16 of the mean rows per expert, in [8, 128]: padding then costs
    ~1/32 of the rows on average, and the matmuls still run on ~WIDE_ROWS rows while an expert
    has that many left (measured best for 8×top-2 and 64×top-8 at 4096 tokens)."""
    share = max(num_assignments / (16 * num_experts), 1.0)
    return int(min(max(2 ** round(math.log2(share)), 8), 128))


# ---- dispatch --------------------------------------------------------------------------------

@jax.checkpoint
def _gated(gate, up):
    """silu(gate) · up, recomputed in the backward pass instead of stored (one [rows, I]
    buffer less per layer; the recomputation is one elementwise pass)."""
    return jax.nn.silu(gate) * up


FUSE_GATE_UP = True


def swiglu_experts(matmul, x_rd, wi_gate_edi, wi_up_edi, wo_eid):
    """The experts' SwiGLU on grouped rows. With many rows, gate and up run as ONE grouped
    matmul over the concatenated [E, D, 2I] weight: the row buffer is read once instead of
    twice, each per-expert GEMM is twice as wide, and the backward's d x is one matmul
    contracting 2I instead of two contracting I plus an add. The concatenation copies all
    E·D·2I weights, so it is skipped when the rows are fewer than the weight rows it copies
    (decoding: a few rows, where the copy would cost more than the experts' matmuls).
    Measured at 4096 tokens, 64×top-8, D512, I256: ~3% off a layer's forward + backward."""
    num_experts, _, hidden = wi_gate_edi.shape
    if not FUSE_GATE_UP or x_rd.shape[0] < 2 * num_experts * hidden:
        return matmul(_gated(matmul(x_rd, wi_gate_edi), matmul(x_rd, wi_up_edi)), wo_eid)
    h_r2i = matmul(x_rd, jnp.concatenate([wi_gate_edi, wi_up_edi], axis=-1))
    return matmul(_gated(h_r2i[:, :hidden], h_r2i[:, hidden:]), wo_eid)


def gathered_experts_ffn(x_td, experts_tk, weights_tk, wi_gate_edi, wi_up_edi, wo_eid):
    """Few assignments (decoding: T·k ≤ E): each assignment gathers its expert's weights and
    runs batched matvecs. It reads exactly the chosen experts' weights — the least any
    dispatch can — where the grouped matmul's loop over all E experts costs ~E × (loop and
    buffer overhead) even for experts without rows (measured ~12 ms for 32 experts, 1 token)."""
    t, k = experts_tk.shape
    dtype = x_td.dtype
    experts_a = experts_tk.reshape(-1)
    x_ad = jnp.repeat(x_td, k, axis=0)
    gate_ai = jnp.einsum("ad,adi->ai", x_ad, wi_gate_edi[experts_a].astype(dtype))
    up_ai = jnp.einsum("ad,adi->ai", x_ad, wi_up_edi[experts_a].astype(dtype))
    y_ad = jnp.einsum("ai,aid->ad", _gated(gate_ai, up_ai), wo_eid[experts_a].astype(dtype))
    return jnp.sum(y_ad.reshape(t, k, -1) * weights_tk[..., None].astype(dtype), axis=1)


def dropless_ffn(x_td, experts_tk, weights_tk, wi_gate_edi, wi_up_edi, wo_eid, *,
                 block: int = 1, impl: Optional[str] = None):
    """Every assignment is computed: sort the T·k (token, expert) pairs by expert, lay them out
    with each expert's rows padded to the block, run the SwiGLU experts as grouped matmuls,
    gather each assignment's output back and take the weighted sum over its k experts.

    The padded layout is built once and shared by the three matmuls; block=1 is the compact
    sorted layout `ragged_dot` wants.
    """
    t, k = experts_tk.shape
    num_experts = wi_gate_edi.shape[0]
    n_assign = t * k
    experts_a = experts_tk.reshape(-1)
    if n_assign <= num_experts:
        return gathered_experts_ffn(x_td, experts_tk, weights_tk, wi_gate_edi, wi_up_edi, wo_eid)
    order_a = jnp.argsort(experts_a, stable=True)          # sorted position -> assignment
    rank_a = jnp.argsort(order_a)                           # assignment -> sorted position
    counts_e = jnp.bincount(experts_a, length=num_experts)
    layout = padded_layout(counts_e, n_assign, block)
    row_of_assignment = layout.row_of_source[rank_a]       # [A] in [0, R)
    valid_r = layout.source_of_row < n_assign
    assignment_of_row = jnp.where(valid_r, order_a[jnp.minimum(layout.source_of_row,
                                                                 n_assign - 1)], n_assign)
    token_of_row = assignment_of_row // k                  # padding rows -> t (zero row)

    x_rd = gather_rows(x_td, token_of_row, row_of_assignment.reshape(t, k))
    matmul = functools.partial(_grouped_experts_matmul, group_sizes_e=layout.padded_sizes,
                               block=block, impl=impl)
    y_rd = swiglu_experts(matmul, x_rd, wi_gate_edi, wi_up_edi, wo_eid)
    return combine_rows(y_rd, row_of_assignment.reshape(t, k), weights_tk, assignment_of_row)


def _grouped_experts_matmul(x, w, *, group_sizes_e, block, impl):
    return grouped_matmul(x, w.astype(x.dtype), group_sizes_e, block=block, aligned=True,
                          impl=impl)


def expert_capacity(group_size: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard: C = int(max(ceil(S·k/E)·cf, cf)), at most S (an expert takes a token at most once
    per group, so more slots could never fill)."""
    c = int(max(math.ceil(group_size * top_k / num_experts) * capacity_factor, capacity_factor))
    return max(1, min(c, group_size))


def capacity_ffn(x_gsd, experts_gsk, weights_gsk, wi_gate_edi, wi_up_edi, wo_eid,
                 capacity_factor: float):
    """GShard dispatch/combine over groups (here: each sequence of the batch is a group).

    An assignment's slot in its expert's queue is its rank by token position within the group
    (a cumsum of the one-hot choices in position order); slots ≥ C are dropped — the token gets
    nothing from that expert, and its other experts keep their weights. Returns (y, dropped
    fraction of the G·S·k assignments).
    """
    g, s, k = experts_gsk.shape
    num_experts = wi_gate_edi.shape[0]
    capacity = expert_capacity(s, k, num_experts, capacity_factor)
    dtype = x_gsd.dtype
    onehot_gske = jax.nn.one_hot(experts_gsk, num_experts, dtype=jnp.int32)
    queue_gxe = jnp.cumsum(onehot_gske.reshape(g, s * k, num_experts), axis=1) - 1
    slot_gsk = jnp.sum(queue_gxe.reshape(g, s, k, num_experts) * onehot_gske, axis=-1)
    kept_gsk = slot_gsk < capacity
    slot_gskc = jax.nn.one_hot(jnp.where(kept_gsk, slot_gsk, capacity), capacity, dtype=dtype)
    expert_gske = onehot_gske.astype(dtype)
    dispatch_gsec = jnp.einsum("gske,gskc->gsec", expert_gske, slot_gskc)
    combine_gsec = jnp.einsum("gske,gskc,gsk->gsec", expert_gske, slot_gskc,
                              weights_gsk.astype(dtype))

    x_gecd = jnp.einsum("gsec,gsd->gecd", dispatch_gsec, x_gsd)
    h_geci = (jax.nn.silu(jnp.einsum("gecd,edi->geci", x_gecd, wi_gate_edi.astype(dtype)))
              * jnp.einsum("gecd,edi->geci", x_gecd, wi_up_edi.astype(dtype)))
    y_gecd = jnp.einsum("geci,eid->gecd", h_geci, wo_eid.astype(dtype))
    y_gsd = jnp.einsum("gsec,gecd->gsd", combine_gsec, y_gecd)
    dropped = 1.0 - jnp.mean(kept_gsk.astype(jnp.float32))
    return y_gsd, dropped


# ---- the layer -------------------------------------------------------------------------------

class SharedExperts(nn.Module):
    """The always-on SwiGLU, on flattened tokens [T, d]. Same parameters as `SwiGLU`
    (gate_proj, up_proj [d, f], down_proj [f, d]); kept 2-D because XLA's CPU weight-gradient
    dot contracting over two token dims (b, t) runs ~1.6x slower than over one."""

    hidden_dim: int
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_td):
        def dense(name, features, axes, std):
            return Dense(features, axes, False, std, self.dtype, self.param_dtype, name=name)

        gate_tf = dense("gate_proj", self.hidden_dim, ("embed", "mlp"), self.init_std)(x_td)
        up_tf = dense("up_proj", self.hidden_dim, ("embed", "mlp"), self.init_std)(x_td)
        hidden_tf = jax.nn.silu(gate_tf) * up_tf
        return dense("down_proj", x_td.shape[-1], ("mlp", "embed"), self.out_init_std)(hidden_tf)


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts). `(x [b, t, d], deterministic)` ->
    `(y [b, t, d], aux)`, aux = {'losses': {'moe_aux', 'moe_z'} (× their coefficients),
    'metrics': {'expert_load' [E] (share of assignments), 'expert_load_max_over_uniform' (the
    busiest expert's share × E: 1 is perfectly balanced; a scalar so that the training log,
    which averages per-layer arrays, keeps it meaningful), 'dropped_fraction'}}.

    Parameters: router/kernel [D, E] (embed, None); wi_gate, wi_up [E, D, I] (experts, embed,
    mlp); wo [E, I, D] (experts, mlp, embed); shared/{gate,up,down}_proj when
    num_shared_experts ≥ 1 (one SwiGLU of width num_shared · shared width, named as `SwiGLU`'s).
    The sigmoid_bias router keeps `router_state/selection_bias` [E], which training updates in
    the forward pass (apply with mutable=['router_state']): b_e += γ·sign(mean load − load_e).
    """

    cfg: MoEConfig
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, deterministic: bool = True):
        cfg = self.cfg
        _check_runnable(cfg)
        b, t, d = x_btd.shape
        num_experts, k, hidden = cfg.num_experts, cfg.top_k, cfg.mlp_dim

        router_dtype = jnp.promote_types(self.dtype, jnp.float32)  # float32 (or float64)
        router_in_btd = x_btd.astype(router_dtype)
        if not deterministic and cfg.jitter > 0:
            noise = jax.random.uniform(self.make_rng("router"), router_in_btd.shape, router_dtype,
                                       1.0 - cfg.jitter, 1.0 + cfg.jitter)
            router_in_btd = router_in_btd * noise
        logits_te = Dense(num_experts, ("embed", None), init_std=self.init_std,
                          dtype=router_dtype, param_dtype=self.param_dtype,
                          name="router")(router_in_btd).reshape(b * t, num_experts)

        bias = None
        if cfg.router == "sigmoid_bias":
            bias = self.variable("router_state", "selection_bias", jnp.zeros, (num_experts,),
                                 jnp.float32)
        weights_tk, experts_tk, probs_te = route(logits_te, cfg,
                                                 None if bias is None else bias.value)
        counts_e = expert_counts(experts_tk, num_experts)
        if bias is not None and not deterministic and self.is_mutable_collection("router_state"):
            load_e = counts_e.astype(jnp.float32)
            bias.value = bias.value + cfg.bias_update_rate * jnp.sign(jnp.mean(load_e) - load_e)

        def expert_param(name, shape, axes, std):
            return self.param(name, nn.with_logical_partitioning(nn.initializers.normal(std),
                                                                 axes), shape, self.param_dtype)

        wi_gate = expert_param("wi_gate", (num_experts, d, hidden), ("experts", "embed", "mlp"),
                               self.init_std)
        wi_up = expert_param("wi_up", (num_experts, d, hidden), ("experts", "embed", "mlp"),
                             self.init_std)
        wo = expert_param("wo", (num_experts, hidden, d), ("experts", "mlp", "embed"),
                          self.out_init_std)

        x_btd = x_btd.astype(self.dtype)
        ep_axes = expert_parallel.expert_axes() if cfg.dispatch == "dropless" else None
        if ep_axes is not None:  # experts split over a mesh axis: all-to-all dispatch
            y_td = expert_parallel.dropless_ffn_ep(x_btd.reshape(b * t, d), experts_tk,
                                                   weights_tk, wi_gate, wi_up, wo, ep_axes,
                                                   block=cfg.block_size)
            y_btd = y_td.reshape(b, t, d)
            dropped = jnp.zeros((), jnp.float32)
        elif cfg.dispatch == "dropless":
            impl = default_grouped_matmul_impl()
            block = 1 if impl == "ragged" else (cfg.block_size
                                                or auto_block_size(b * t * k, num_experts))
            y_td = dropless_ffn(x_btd.reshape(b * t, d), experts_tk, weights_tk, wi_gate, wi_up,
                                wo, block=block, impl=impl)
            y_btd = y_td.reshape(b, t, d)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y_btd, dropped = capacity_ffn(x_btd, experts_tk.reshape(b, t, k),
                                          weights_tk.reshape(b, t, k), wi_gate, wi_up, wo,
                                          cfg.capacity_factor)

        if cfg.num_shared_experts:
            width = cfg.num_shared_experts * (cfg.shared_mlp_dim or cfg.mlp_dim)
            shared_td = SharedExperts(width, self.init_std, self.out_init_std, self.dtype,
                                      self.param_dtype, name="shared")(x_btd.reshape(b * t, d))
            y_btd = y_btd + shared_td.reshape(b, t, d)

        aux = {
            "losses": {"moe_aux": cfg.aux_loss_coef * load_balancing_loss(probs_te, counts_e),
                       "moe_z": cfg.z_loss_coef * router_z_loss(logits_te)},
            "metrics": {"expert_load": counts_e.astype(jnp.float32) / (b * t * k),
                        "expert_load_max_over_uniform": (jnp.max(counts_e).astype(jnp.float32)
                                                         * num_experts / (b * t * k)),
                        "dropped_fraction": dropped},
        }
        y_btd = nn.with_logical_constraint(y_btd.astype(self.dtype), ("batch", "length", "embed"))
        return y_btd, aux
