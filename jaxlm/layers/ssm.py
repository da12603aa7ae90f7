"""Mamba-2 mixer and the three scans of its recurrence (chunked SSD, associative, sequential).

Per head h (P-dim input x_t, N-dim B_t and C_t shared by the heads of a group), with
a_t = Δt_t·A_h ≤ 0 and X̃_t = Δt_t·x_t:

    S_t = exp(a_t)·S_{t−1} + X̃_t ⊗ B_t        (S ∈ R^{P×N})
    y_t = S_t·C_t + D_h·x_t

`ssd` computes this three ways that must agree to rounding:

* ``sequential``: `lax.scan` over time; the reference, O(L) steps.
* ``associative``: `lax.associative_scan` over (exp(a_t), X̃_t ⊗ B_t) pairs. O(log L) depth but
  it materialises B·L·Hm·P·N state elements and does no matmuls, so it is memory-bound.
* ``chunked``: Mamba-2's SSD. Inside a chunk of Q steps the output is a masked quadratic
  (attention-like) form; chunk-final states are passed between chunks by a small
  [chunks+1, chunks+1] decay matrix. Nearly all work is batched matmuls and the memory is
  (L/Q)·Hm·P·N + L·Q·Hm, so this is the default. Its quadratic part has a hand-written
  backward (`_intra_chunk_bwd`) that is all matmuls plus O(L) work; see there for why.

Decay math is float32 (float64 if the inputs are); exponents are masked to −∞ *before* exp, so
no inf·0 NaN reaches the forward or backward pass. Head h reads group h // (Hm/G): heads are
reshaped to [G, Hm/G] rather than repeating B and C.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.schema import ConfigError, field, section

SCANS = ("chunked", "associative", "sequential")


@section
class SSMConfig:
    num_heads: int = field(8, "Mamba-2 heads Hm", min=1)
    head_dim: int = field(64, "Mamba-2 head dim P (d_inner = Hm·P)", min=1)
    state_dim: int = field(64, "SSM state size N", min=1)
    num_groups: int = field(1, "B/C groups G (head h uses group h // (Hm/G))", min=1)
    conv_width: int = field(4, "causal depthwise conv width K", min=1)
    chunk_size: int = field(256, "SSD chunk length Q", min=1)
    scan: str = field("chunked", "scan algorithm: SSD chunks, lax.associative_scan, or lax.scan",
                      choices=SCANS)
    conv_bias: bool = field(True, "bias on the depthwise conv")
    proj_bias: bool = field(False, "bias on in_proj / out_proj")
    dt_min: float = field(0.001, "init: smallest Δt", min=0.0, min_exclusive=True)
    dt_max: float = field(0.1, "init: largest Δt", min=0.0, min_exclusive=True)
    dt_limit_min: float = field(0.0, "clamp Δt from below after softplus", min=0.0)
    dt_limit_max: float = field(float("inf"), "clamp Δt from above after softplus", min=0.0)

    def validate(self):
        if self.num_heads % self.num_groups:
            raise ConfigError(f"model.ssm.num_groups={self.num_groups}: expected a divisor of "
                              f"model.ssm.num_heads={self.num_heads}")
        if self.chunk_size < 1:
            raise ConfigError(f"model.ssm.chunk_size={self.chunk_size}: expected >= 1")
        if self.dt_max < self.dt_min:
            raise ConfigError(f"model.ssm.dt_max={self.dt_max}: expected >= "
                              f"model.ssm.dt_min={self.dt_min}")
        if self.dt_limit_max <= self.dt_limit_min:
            raise ConfigError(f"model.ssm.dt_limit_max={self.dt_limit_max}: expected > "
                              f"model.ssm.dt_limit_min={self.dt_limit_min}")


# ---- the recurrence ---------------------------------------------------------------------------

def _compute_dtype(dtype):
    """float32, or float64 when the inputs are float64 (tests run the scans in x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_shapes(x_blhp, dt_blh, A_h, B_blgn, C_blgn):
    b, l, h, p = x_blhp.shape
    g, n = B_blgn.shape[2:]
    if dt_blh.shape != (b, l, h) or A_h.shape != (h,):
        raise ValueError(f"ssd: dt {dt_blh.shape} / A {A_h.shape}: expected {(b, l, h)} / {(h,)}")
    if B_blgn.shape != (b, l, g, n) or C_blgn.shape != (b, l, g, n) or h % g:
        raise ValueError(f"ssd: B {B_blgn.shape} / C {C_blgn.shape}: expected [{b}, {l}, G, N] "
                         f"with G dividing the {h} heads")


def _masked_cumsum_segsum(a_xn, strict: bool = False):
    """[..., n] -> [..., n, n]: out[l, s] = a_{s+1} + ... + a_l for s ≤ l (s < l if strict),
    −∞ elsewhere, as a masked cumulative sum (each entry sums exactly its own range: no
    cancellation). XLA:CPU runs the cumsum over an [n, n] matrix as a multi-pass tree, so keep
    n small."""
    n = a_xn.shape[-1]
    a_xls = jnp.broadcast_to(a_xn[..., :, None], a_xn.shape + (n,))  # row l holds a_l
    strictly_lower = jnp.tril(jnp.ones((n, n), bool), -1)
    sums_xls = jnp.cumsum(jnp.where(strictly_lower, a_xls, 0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((n, n), bool), -1 if strict else 0), sums_xls, -jnp.inf)


def _sub_block(q: int) -> int:
    """The divisor of q nearest √q (16 for q = 256; 1 for a prime q)."""
    return min((k for k in range(1, q + 1) if q % k == 0), key=lambda k: abs(k * k - q))


def decay_matrix(a_xq, strict: bool = False):
    """[..., Q] -> [..., Q, Q]: out[l, s] = exp(a_{s+1} + ... + a_l) for s ≤ l, 0 for s > l
    (and 0 on the diagonal, where it would be 1, if `strict`).

    Needs a ≤ 0 (always true here: Δt ≥ 0, A < 0). Written to be both stable and cheap:

    * No exp(cumsum[l] − cumsum[s]): that loses eps·|cumsum| to cancellation when a chunk
      starts with strong decay. Every exponent below sums exactly its own range of a.
    * No exp over Q×Q entries: exp is the costliest elementwise op on XLA:CPU. Q is cut into
      blocks of k ≈ √Q steps. For l in block L and s in an earlier block S the range splits
      into three disjoint parts, (start of L .. l), (blocks S+1 .. L−1), (s+1 .. end of S), so
      the entry is a product of three exps of small arrays, each in (0, 1] (no overflow, and a
      product only underflows where the true value does). Diagonal blocks (L = S) and the block
      sums use the masked cumulative sum on k×k and (Q/k)×(Q/k) matrices.
    * Exponents above the diagonal are −∞ *before* exp, so those entries are an exact 0 with a
      0 gradient (no 0·inf = NaN).

    The result is a broadcast product that XLA fuses with whatever consumes it (the C·B
    product in the chunked scan) into a single pass.
    """
    q = a_xq.shape[-1]
    k = _sub_block(q)
    nb = q // k
    lead = a_xq.shape[:-1]
    a_xbk = a_xq.reshape(lead + (nb, k))
    head_xbk = jnp.cumsum(a_xbk, axis=-1)  # block start .. l (inclusive)
    after_xbk = jnp.concatenate([a_xbk[..., 1:], jnp.zeros_like(a_xbk[..., :1])], axis=-1)
    tail_xbk = jnp.flip(jnp.cumsum(jnp.flip(after_xbk, -1), axis=-1), -1)  # s+1 .. block end
    blocks_xLS = _masked_cumsum_segsum(head_xbk[..., -1])  # Σ block totals S+1 .. L
    # between[L, S] = Σ totals S+1 .. L−1 = blocks[L−1, S]; −∞ (so a 0 factor) when L ≤ S.
    between_xLS = jnp.concatenate([jnp.full_like(blocks_xLS[..., :1, :], -jnp.inf),
                                   blocks_xLS[..., :-1, :]], axis=-2)
    off_xLlSs = (jnp.exp(head_xbk)[..., :, :, None, None]
                 * jnp.exp(between_xLS)[..., :, None, :, None]
                 * jnp.exp(tail_xbk)[..., None, None, :, :])
    diag_xLls = jnp.exp(_masked_cumsum_segsum(a_xbk, strict))
    same_block = jnp.eye(nb, dtype=bool)[:, None, :, None]
    out = jnp.where(same_block, diag_xLls[..., :, :, None, :], off_xLlSs)
    return out.reshape(lead + (q, q))


def _split_heads(t_blh, groups):
    """[..., Hm, ...] with heads on axis 2 -> [..., G, Hm/G, ...] (head h = g·(Hm/G) + r)."""
    shape = t_blh.shape
    return t_blh.reshape(shape[:2] + (groups, shape[2] // groups) + shape[3:])


def _scan_sequential(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn):
    g = B_blgn.shape[2]

    def step(state_bgrpn, inputs):
        a_bh, xdt_bhp, B_bgn, C_bgn = inputs
        decay_bgr = jnp.exp(a_bh).reshape(state_bgrpn.shape[:3])
        xdt_bgrp = xdt_bhp.reshape(state_bgrpn.shape[:4])
        state_bgrpn = (decay_bgr[..., None, None] * state_bgrpn
                       + xdt_bgrp[..., None] * B_bgn[:, :, None, None, :])
        y_bgrp = jnp.einsum("bgrpn,bgn->bgrp", state_bgrpn, C_bgn)
        return state_bgrpn, y_bgrp

    b, l, h, p = xdt_blhp.shape
    time_major = [jnp.moveaxis(t, 1, 0) for t in (a_blh, xdt_blhp, B_blgn, C_blgn)]
    state_bgrpn = state_bhpn.reshape(b, g, h // g, *state_bhpn.shape[2:])
    final_bgrpn, y_lbgrp = jax.lax.scan(step, state_bgrpn, time_major)
    return jnp.moveaxis(y_lbgrp, 0, 1).reshape(b, l, h, p), final_bgrpn.reshape(state_bhpn.shape)


def _scan_associative(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn):
    b, l, h, p = xdt_blhp.shape
    g = B_blgn.shape[2]
    decay_blh = jnp.exp(a_blh)
    update_blgrpn = (_split_heads(xdt_blhp, g)[..., None]
                     * B_blgn[:, :, :, None, None, :])
    update_blhpn = update_blgrpn.reshape(b, l, h, p, -1)
    # Fold the initial state into the first element: S_0 = α_0·S_init + β_0.
    update_blhpn = update_blhpn.at[:, 0].add(decay_blh[:, 0, :, None, None] * state_bhpn)

    def combine(earlier, later):
        decay_e, update_e = earlier
        decay_l, update_l = later
        return decay_l * decay_e, decay_l[..., None, None] * update_e + update_l

    _, states_blhpn = jax.lax.associative_scan(combine, (decay_blh, update_blhpn), axis=1)
    y_blgrp = jnp.einsum("blgrpn,blgn->blgrp", _split_heads(states_blhpn, g), C_blgn)
    return y_blgrp.reshape(b, l, h, p), states_blhpn[:, -1]


def _intra_chunk_parts(a_bcgrq, C_bcgqn, B_bcgqn):
    """Strictly lower M[l, s] = decay[l, s]·(C_l·B_s), s < l, [b, c, g, r, Q, Q]; its decay
    factor; and the diagonal C_l·B_l [b, c, g, Q] (where the decay is exactly 1)."""
    decay_bcgrls = decay_matrix(a_bcgrq, strict=True)
    cb_bcgls = jnp.einsum("bcgln,bcgsn->bcgls", C_bcgqn, B_bcgqn)
    cb_diag_bcgq = jnp.einsum("bcgqn,bcgqn->bcgq", C_bcgqn, B_bcgqn)
    return decay_bcgrls * cb_bcgls[:, :, :, None], decay_bcgrls, cb_diag_bcgq


@jax.custom_vjp
def _intra_chunk(a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp):
    """Y[l] = Σ_{s≤l} decay[l, s] (C_l·B_s) X̃_s within each chunk: the quadratic SSD form."""
    return _intra_chunk_fwd(a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp)[0]


def _intra_chunk_fwd(a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp):
    m_bcgrls, _, cb_diag_bcgq = _intra_chunk_parts(a_bcgrq, C_bcgqn, B_bcgqn)
    below_bcgrlp = jnp.einsum("bcgrls,bcgrsp->bcgrlp", m_bcgrls, x_bcgrqp)
    y_bcgrlp = below_bcgrlp + cb_diag_bcgq[:, :, :, None, :, None] * x_bcgrqp
    return y_bcgrlp, (a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp, below_bcgrlp)


def _intra_chunk_bwd(residuals, dy_bcgrlp):
    """Hand-written so that no Q×Q tensor is reduced over heads or rows (XLA:CPU ran autodiff's
    version ~4× slower than the matmuls). M is recomputed (as flash attention does) rather
    than kept, so training memory holds no [Q, Q] per head between the passes.

    With W = dM ⊙ M, the decay gradient is da_i = Σ_{l≥i} Σ_{s<i} W[l, s] (the exponent of
    entry [l, s] holds a_i for s < i ≤ l), i.e. the reverse cumsum of W's row sums minus its
    column sums, and those need no Q×Q pass: rowsum_l = ⟨dY_l, (M X̃)_l⟩, colsum_s =
    ⟨X̃_s, (Mᵀ dY)_s⟩. The diagonal (l = s) carries no a_i and is by far the largest term
    when the decay is strong, so it is kept out of M altogether (handled as C_l·B_l X̃_l):
    otherwise its rounding would swamp the small difference of row and column sums.
    """
    a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp, below_bcgrlp = residuals
    m_bcgrls, decay_bcgrls, cb_diag_bcgq = _intra_chunk_parts(a_bcgrq, C_bcgqn, B_bcgqn)
    above_bcgrsp = jnp.einsum("bcgrls,bcgrlp->bcgrsp", m_bcgrls, dy_bcgrlp)  # Mᵀ dY
    dx_bcgrsp = above_bcgrsp + cb_diag_bcgq[:, :, :, None, :, None] * dy_bcgrlp
    dcb_bcgrls = jnp.einsum("bcgrlp,bcgrsp->bcgrls", dy_bcgrlp, x_bcgrqp) * decay_bcgrls
    dcb_diag_bcgq = jnp.einsum("bcgrqp,bcgrqp->bcgq", dy_bcgrlp, x_bcgrqp)
    r = a_bcgrq.shape[3]
    C_bcgrqn = jnp.broadcast_to(C_bcgqn[:, :, :, None], C_bcgqn.shape[:3] + (r,)
                                + C_bcgqn.shape[3:])
    dC_bcgqn = (jnp.einsum("bcgrls,bcgsn->bcgrln", dcb_bcgrls, B_bcgqn).sum(axis=3)
                + dcb_diag_bcgq[..., None] * B_bcgqn)
    dB_bcgqn = (jnp.einsum("bcgrls,bcgrln->bcgrsn", dcb_bcgrls, C_bcgrqn).sum(axis=3)
                + dcb_diag_bcgq[..., None] * C_bcgqn)
    rows_minus_cols = (jnp.sum(dy_bcgrlp * below_bcgrlp, axis=-1)
                       - jnp.sum(x_bcgrqp * above_bcgrsp, axis=-1))
    da_bcgrq = jnp.flip(jnp.cumsum(jnp.flip(rows_minus_cols, -1), axis=-1), -1)
    return da_bcgrq, dC_bcgqn, dB_bcgqn, dx_bcgrsp


_intra_chunk.defvjp(_intra_chunk_fwd, _intra_chunk_bwd)


def _scan_chunked(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn, chunk_size):
    b, l, h, p = xdt_blhp.shape
    g, n = B_blgn.shape[2:]
    r = h // g
    q = chunk_size
    pad = (-l) % q
    if pad:  # after discretisation: padded steps have a = 0 (no decay) and X̃ = 0 (no update)
        a_blh, xdt_blhp, B_blgn, C_blgn = (
            jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
            for t in (a_blh, xdt_blhp, B_blgn, C_blgn))
    c = (l + pad) // q
    # Per-chunk layout [b, c, g, r, q, ...]: batch dims first, so every einsum below is a plain
    # batched matmul for XLA:CPU (a layout with q in the middle ran ~7× slower).
    a_bcgrq = a_blh.reshape(b, c, q, g, r).transpose(0, 1, 3, 4, 2)
    x_bcgrqp = xdt_blhp.reshape(b, c, q, g, r, p).transpose(0, 1, 3, 4, 2, 5)
    B_bcgqn = B_blgn.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)
    C_bcgqn = C_blgn.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)
    from_start_bcgrq = jnp.cumsum(a_bcgrq, axis=-1)  # Λ_l: chunk start .. l
    after_bcgrq = jnp.concatenate([a_bcgrq[..., 1:], jnp.zeros_like(a_bcgrq[..., :1])], -1)
    to_end_bcgrq = jnp.flip(jnp.cumsum(jnp.flip(after_bcgrq, -1), axis=-1), -1)  # s+1 .. end

    # 1. Within a chunk: Y[l] = Σ_{s≤l} decay[l, s] (C_l·B_s) X̃_s, a masked matmul.
    y_bcgrlp = _intra_chunk(a_bcgrq, C_bcgqn, B_bcgqn, x_bcgrqp)

    # 2. Each chunk's own final state (from a zero start): Σ_s exp(Λ_{s+1..end}) X̃_s ⊗ B_s.
    xw_bcgrqp = x_bcgrqp * jnp.exp(to_end_bcgrq)[..., None]
    chunk_states_bcgrpn = jnp.einsum("bcgsn,bcgrsp->bcgrpn", B_bcgqn, xw_bcgrqp)

    # 3. Pass states across chunks: the state entering chunk z is Σ_{c<z} (decay c→z)·S_c, with
    #    the initial state as chunk −1. One [c+1, c+1] lower-triangular decay matrix per head.
    states_bcgrpn = jnp.concatenate([state_bhpn.reshape(b, 1, g, r, p, n), chunk_states_bcgrpn],
                                    axis=1)
    totals_bgrc = jnp.pad(from_start_bcgrq[..., -1].transpose(0, 2, 3, 1),
                          [(0, 0)] * 3 + [(1, 0)])
    chunk_decay_bgrzc = decay_matrix(totals_bgrc)
    entering_bzgrpn = jnp.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay_bgrzc, states_bcgrpn)
    final_bhpn = entering_bzgrpn[:, -1].reshape(b, h, p, n)

    # 4. Contribution of the entering state: exp(Λ_l)·(S̄_z C_l).
    y_off_bcgrlp = jnp.einsum("bcgln,bcgrpn->bcgrlp", C_bcgqn, entering_bzgrpn[:, :-1])
    y_bcgrlp = y_bcgrlp + y_off_bcgrlp * jnp.exp(from_start_bcgrq)[..., None]
    y_blhp = y_bcgrlp.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)
    return y_blhp[:, :l], final_bhpn


def ssd(x_blhp, dt_blh, A_h, B_blgn, C_blgn, D_h=None, *, method: str = "chunked",
        chunk_size: int = 256, initial_state_bhpn=None):
    """The Mamba-2 recurrence over a whole sequence.

    Args: x [b, l, Hm, P], dt [b, l, Hm] (already softplus'ed and clamped), A [Hm] (< 0),
    B, C [b, l, G, N], D [Hm] or None, initial_state [b, Hm, P, N] or None (zeros).
    Returns (y [b, l, Hm, P] in x's dtype, final_state [b, Hm, P, N] float32 (float64 for
    float64 inputs)).

    Everything inside runs in float32 whatever the input dtype: on the CPU bfloat16 matmuls
    are slower, and the decay products need float32 anyway. An accelerator path would feed
    the two big einsums of `_intra_chunk` bfloat16 operands with float32 accumulation.
    """
    _check_shapes(x_blhp, dt_blh, A_h, B_blgn, C_blgn)
    if method not in SCANS:
        raise ValueError(f"ssd: method={method!r}: expected one of {list(SCANS)}")
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size={chunk_size}: expected >= 1")
    b, _, h, p = x_blhp.shape
    n = B_blgn.shape[-1]
    f = _compute_dtype(x_blhp.dtype)
    x_blhp32 = x_blhp.astype(f)
    dt_blh = dt_blh.astype(f)
    a_blh = dt_blh * A_h.astype(f)
    xdt_blhp = x_blhp32 * dt_blh[..., None]
    B_blgn, C_blgn = B_blgn.astype(f), C_blgn.astype(f)
    state_bhpn = (jnp.zeros((b, h, p, n), f) if initial_state_bhpn is None
                  else initial_state_bhpn.astype(f))
    if method == "sequential":
        y_blhp, final_bhpn = _scan_sequential(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn)
    elif method == "associative":
        y_blhp, final_bhpn = _scan_associative(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn)
    else:
        y_blhp, final_bhpn = _scan_chunked(a_blh, xdt_blhp, B_blgn, C_blgn, state_bhpn,
                                           chunk_size)
    if D_h is not None:
        y_blhp = y_blhp + D_h.astype(f)[:, None] * x_blhp32
    return y_blhp.astype(x_blhp.dtype), final_bhpn


def ssd_step(state_bhpn, x_bhp, dt_bh, A_h, B_bgn, C_bgn, D_h=None):
    """One recurrent step for decoding: returns (y [b, Hm, P], new state [b, Hm, P, N])."""
    b, h, p = x_bhp.shape
    g = B_bgn.shape[1]
    f = state_bhpn.dtype
    dt_bh = dt_bh.astype(f)
    x_bgrp = x_bhp.astype(f).reshape(b, g, h // g, p)
    decay_bgr = jnp.exp(dt_bh * A_h.astype(f)).reshape(b, g, h // g)
    state_bgrpn = state_bhpn.reshape(b, g, h // g, p, -1)
    state_bgrpn = (decay_bgr[..., None, None] * state_bgrpn
                   + (x_bgrp * dt_bh.reshape(b, g, h // g, 1))[..., None]
                   * B_bgn.astype(f)[:, :, None, None, :])
    y_bgrp = jnp.einsum("bgrpn,bgn->bgrp", state_bgrpn, C_bgn.astype(f))
    y_bhp = y_bgrp.reshape(b, h, p)
    if D_h is not None:
        y_bhp = y_bhp + D_h.astype(f)[:, None] * x_bhp.astype(f)
    return y_bhp.astype(x_bhp.dtype), state_bgrpn.reshape(state_bhpn.shape)


# ---- the mixer --------------------------------------------------------------------------------

def init_ssm_cache(cfg: SSMConfig, batch: int, dtype=jnp.float32) -> dict:
    """Zero decoding state of one Mamba2 layer.

    conv_x [b, K, Hm, P], conv_B / conv_C [b, K, G, N]: the last K *pre-conv* inputs, oldest
    first (time on axis 1; HF keeps [b, conv_dim, K] — transpose the channels onto axis 1).
    ssm [b, Hm, P, N] float32: the recurrent state.
    """
    k, h, p, g, n = (cfg.conv_width, cfg.num_heads, cfg.head_dim, cfg.num_groups,
                     cfg.state_dim)
    return {"conv_x": jnp.zeros((batch, k, h, p), dtype),
            "conv_B": jnp.zeros((batch, k, g, n), dtype),
            "conv_C": jnp.zeros((batch, k, g, n), dtype),
            "ssm": jnp.zeros((batch, h, p, n), jnp.float32)}


def dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
    """Mamba-2: Δt ~ log-uniform[dt_min, dt_max] (floored), bias = softplus⁻¹(Δt)."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def a_log_init(key, shape, dtype=jnp.float32):
    """Mamba-2: A = −exp(A_log) with A_log = log(uniform[1, 16])."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Projection(nn.Module):
    """x [b, t, *in] -> [b, t, *out_shape]; kernel [*in, *out_shape] (+ bias [*out_shape]).

    `axes` names every kernel dim (input dims first), so a projection onto heads keeps the head
    axis visible to the sharding rules instead of flattening it away.
    """

    out_shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    use_bias: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_in = len(self.axes) - len(self.out_shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), self.axes),
            x.shape[x.ndim - n_in:] + tuple(self.out_shape), self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[n_in:]), tuple(self.out_shape), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class CausalConv(nn.Module):
    """Depthwise causal conv + silu over the time axis of u [b, t, *channels].

    kernel [K, *channels] (kernel[K−1] multiplies the current input, as PyTorch's Conv1d with
    left padding K−1 does, no flip), bias [*channels]. The K steps before the sequence come from
    `window` [b, K, *channels] (zeros without one); returns (silu(conv), last K inputs).
    """

    width: int
    axes: tuple[Optional[str], ...]  # logical names of the channel dims
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, u_btc, window_bkc=None):
        k, channels = self.width, u_btc.shape[2:]
        init = symmetric_uniform(1.0 / math.sqrt(k))  # PyTorch's default, fan_in = K
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("conv",) + self.axes),
                            (k,) + channels, self.param_dtype).astype(self.dtype)
        if window_bkc is None:
            window_bkc = jnp.zeros((u_btc.shape[0], k) + channels, self.dtype)
        seq_bsc = jnp.concatenate([window_bkc.astype(self.dtype), u_btc.astype(self.dtype)], 1)
        t = u_btc.shape[1]
        # Output t reads seq[t+1 .. t+K]; seq[K+t] is input t.
        out_btc = sum(seq_bsc[:, i + 1:i + 1 + t] * kernel[i] for i in range(k))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(init, self.axes), channels,
                              self.param_dtype)
            out_btc = out_btc + bias.astype(self.dtype)
        return jax.nn.silu(out_btc), seq_bsc[:, -k:]


class GatedRMSNorm(nn.Module):
    """norm_before_gate=False: g = y·silu(z) in float32, RMS-normalised within each of `groups`
    groups of heads, scale [Hm, P] applied after the cast back to `dtype`."""

    groups: int = 1
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y_bthp, z_bthp):
        b, t, h, p = y_bthp.shape
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.ones, ("ssm_heads", "head_dim")), (h, p), self.param_dtype)
        g_btgf = (y_bthp.astype(jnp.float32)
                  * jax.nn.silu(z_bthp.astype(jnp.float32))).reshape(b, t, self.groups, -1)
        g_btgf = g_btgf * jax.lax.rsqrt(jnp.mean(jnp.square(g_btgf), -1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * g_btgf.reshape(b, t, h, p).astype(self.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer (SPEC §C): x [b, t, D] -> y [b, t, D].

    Parameters (d_in = Hm·P; separate kernels so the `ssm_heads` axis can shard over `tensor`):

        in_proj_z, in_proj_x   kernel [D, Hm, P]   ("embed", "ssm_heads", "head_dim")
        in_proj_B, in_proj_C   kernel [D, G, N]    ("embed", None, "state")
        in_proj_dt             kernel [D, Hm]      ("embed", "ssm_heads")
                               (+ bias of the output shape when cfg.proj_bias)
        conv_x                 kernel [K, Hm, P], bias [Hm, P]   ("conv", "ssm_heads", "head_dim")
        conv_B, conv_C         kernel [K, G, N],  bias [G, N]    ("conv", None, "state")
        dt_bias, A_log, D      [Hm]                ("ssm_heads",)
        norm                   scale [Hm, P]       ("ssm_heads", "head_dim")
        out_proj               kernel [Hm, P, D]   ("ssm_heads", "head_dim", "embed") (+ bias [D])

    From Hugging Face (mamba2, granitemoehybrid): W = in_proj.weight [2·d_in + 2GN + Hm, D] has
    rows [z (d_in) | xBC (d_in + 2GN) | dt (Hm)], and the xBC rows (also the conv1d channels)
    are x (channel h·P+p), then B (g·N+n), then C. So, with e = 2·d_in + G·N:

        in_proj_z.kernel  = W[:d_in].T.reshape(D, Hm, P)
        in_proj_x.kernel  = W[d_in:2·d_in].T.reshape(D, Hm, P)
        in_proj_B.kernel  = W[2·d_in:e].T.reshape(D, G, N)
        in_proj_C.kernel  = W[e:e+G·N].T.reshape(D, G, N)
        in_proj_dt.kernel = W[e+G·N:].T                    (biases: the same row slices)
        conv_x.kernel     = conv1d.weight[:d_in, 0, :].T.reshape(K, Hm, P)   (no flip)
        conv_B / conv_C   = channels [d_in:d_in+GN] / [d_in+GN:], .T.reshape(K, G, N)
        conv_*.bias       = conv1d.bias over the same channels, reshaped
        norm.scale        = norm.weight.reshape(Hm, P)
        out_proj.kernel   = out_proj.weight.T.reshape(Hm, P, D)
        dt_bias, A_log, D as they are.

    The gated RMSNorm normalises each group of Hm/G heads separately (mamba_ssm's group_size =
    d_in / G, as transformers v5 does; 4.57 used all of d_in — the same for G = 1).

    Padding: where segment_ids == 0 the pre-conv x/B/C and Δt are zeroed, so such a step
    neither decays nor updates the state and a left-padded prompt gives the unpadded state and
    outputs. Packed documents (different non-zero ids) are *not* isolated: state and conv
    window flow from one into the next, as in transformers without `seq_idx`.

    Decoding: pass `cache` (see `init_ssm_cache`) to get `(y, new_cache)`. One token runs the
    recurrent step; more tokens run the configured scan from the cached state (prefill).
    """

    cfg: SSMConfig
    norm_eps: float = 1e-5
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, segment_ids_bt=None, cache: Optional[dict] = None):
        cfg = self.cfg
        h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.state_dim
        if h % g:
            raise ConfigError(f"model.ssm.num_groups={g}: expected a divisor of "
                              f"model.ssm.num_heads={h}")
        t, d = x_btd.shape[1:]
        x_btd = x_btd.astype(self.dtype)

        def project(name, shape, axes, std=self.init_std):
            return Projection(shape, axes, cfg.proj_bias, std, self.dtype, self.param_dtype,
                              name=name)

        heads = ("ssm_heads", "head_dim")
        z_bthp = project("in_proj_z", (h, p), ("embed",) + heads)(x_btd)
        u_bthp = project("in_proj_x", (h, p), ("embed",) + heads)(x_btd)
        B_btgn = project("in_proj_B", (g, n), ("embed", None, "state"))(x_btd)
        C_btgn = project("in_proj_C", (g, n), ("embed", None, "state"))(x_btd)
        dt_raw_bth = project("in_proj_dt", (h,), ("embed", "ssm_heads"))(x_btd)

        keep_bt = None if segment_ids_bt is None else segment_ids_bt != 0
        if keep_bt is not None:
            u_bthp, B_btgn, C_btgn = (jnp.where(keep_bt[:, :, None, None], v, 0)
                                      for v in (u_bthp, B_btgn, C_btgn))

        windows = cache or {}

        def conv(name, v, axes):
            return CausalConv(cfg.conv_width, axes, cfg.conv_bias, self.dtype, self.param_dtype,
                              name=name)(v, windows.get(name))

        u_bthp, conv_x = conv("conv_x", u_bthp, heads)
        B_btgn, conv_B = conv("conv_B", B_btgn, (None, "state"))
        C_btgn, conv_C = conv("conv_C", C_btgn, (None, "state"))
        u_bthp = nn.with_logical_constraint(u_bthp, ("batch", "length") + heads)

        def head_param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("ssm_heads",)), (h,),
                              self.param_dtype).astype(jnp.float32)

        dt_bias = head_param("dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max))
        A_h = -jnp.exp(head_param("A_log", a_log_init))
        D_h = head_param("D", nn.initializers.ones)
        dt_bth = jnp.clip(jax.nn.softplus(dt_raw_bth.astype(jnp.float32) + dt_bias),
                          cfg.dt_limit_min, cfg.dt_limit_max)
        if keep_bt is not None:
            dt_bth = jnp.where(keep_bt[:, :, None], dt_bth, 0.0)

        state_bhpn = None if cache is None else cache["ssm"]
        if state_bhpn is not None and t == 1:
            y_bhp, state_bhpn = ssd_step(state_bhpn.astype(jnp.float32), u_bthp[:, 0],
                                         dt_bth[:, 0], A_h, B_btgn[:, 0], C_btgn[:, 0], D_h)
            y_bthp = y_bhp[:, None]
        else:
            y_bthp, state_bhpn = ssd(u_bthp, dt_bth, A_h, B_btgn, C_btgn, D_h, method=cfg.scan,
                                     chunk_size=cfg.chunk_size, initial_state_bhpn=state_bhpn)

        y_bthp = GatedRMSNorm(g, self.norm_eps, self.dtype, self.param_dtype,
                              name="norm")(y_bthp, z_bthp)
        y_btd = Projection((d,), heads + ("embed",), cfg.proj_bias, self.out_init_std,
                           self.dtype, self.param_dtype, name="out_proj")(y_bthp)
        y_btd = nn.with_logical_constraint(y_btd, ("batch", "length", "embed"))
        if cache is None:
            return y_btd
        return y_btd, {"conv_x": conv_x, "conv_B": conv_B, "conv_C": conv_C,
                       "ssm": state_bhpn.astype(jnp.float32)}
