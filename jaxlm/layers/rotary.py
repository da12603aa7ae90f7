"""Rotary position embedding in Hugging Face's rotate-half layout, with partial rotary and the
context-extension scalings of SPEC §A (linear, dynamic NTK, llama3, YaRN).

Dimension j of the rotated part pairs with j + d_rot/2 (not 2j with 2j+1 as in Meta's original
checkpoints). Only the first `d_rot = int(head_dim * fraction)` dims of each head rotate; the
rest pass through untouched (Stable Code rotates 25%).
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxlm.schema import field, section


@section
class RopeConfig:
    theta: float = field(10000.0, "RoPE base θ", min=1.0)
    fraction: float = field(1.0, "fraction of each head's dims that rotate (Stable Code: 0.25)",
                            min=0.0, max=1.0, min_exclusive=True)
    scaling: str = field("none", "context-extension scaling of the frequencies",
                         choices=("none", "linear", "dynamic", "llama3", "yarn"))
    factor: float = field(1.0, "scaling factor (linear / dynamic / llama3 / yarn)", min=1.0)
    original_max_position: int = field(2048, "pre-extension context length (dynamic, llama3, yarn)",
                                       min=1)
    low_freq_factor: float = field(1.0, "llama3: low-frequency wavelength divisor", min=0.0,
                                   min_exclusive=True)
    high_freq_factor: float = field(4.0, "llama3: high-frequency wavelength divisor", min=0.0,
                                    min_exclusive=True)
    beta_fast: float = field(32.0, "yarn: rotations above which dims keep their frequency", min=0.0)
    beta_slow: float = field(1.0, "yarn: rotations below which dims are fully interpolated",
                             min=0.0)
    attention_factor: Optional[float] = field(None, "yarn: cos/sin multiplier (None: 0.1·ln(factor)+1)")
    truncate: bool = field(True, "yarn: floor/ceil the correction range as HF does")



def rotary_dim(head_dim: int, fraction: float) -> int:
    return int(head_dim * fraction)


def _base_inverse_frequencies(rot_dim: int, theta) -> np.ndarray:
    # float32 throughout, in the same order of operations as transformers.
    exponent = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3(inv: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    low_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_attention_factor(cfg: RopeConfig) -> float:
    if cfg.attention_factor is not None:
        return cfg.attention_factor
    return 1.0 if cfg.factor <= 1 else 0.1 * math.log(cfg.factor) + 1.0


def _yarn(rot_dim: int, cfg: RopeConfig) -> np.ndarray:
    pos_freqs = np.float32(cfg.theta) ** (
        np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(cfg.factor) * pos_freqs)

    def correction_dim(rotations):
        return (rot_dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi))) / (
            2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extrapolation_weight)
            + extrapolation * extrapolation_weight).astype(np.float32)


def inverse_frequencies(cfg: RopeConfig, rot_dim: int) -> tuple[np.ndarray, float]:
    """Static inverse frequencies [rot_dim/2] (float32) and the cos/sin multiplier.

    `dynamic` depends on the sequence length and is computed in `rope_angles` instead; here it
    returns the unscaled frequencies.
    """
    inv = _base_inverse_frequencies(rot_dim, cfg.theta)
    if cfg.scaling == "linear":
        return (inv / np.float32(cfg.factor)).astype(np.float32), 1.0
    if cfg.scaling == "llama3":
        return _llama3(inv, cfg), 1.0
    if cfg.scaling == "yarn":
        return _yarn(rot_dim, cfg), yarn_attention_factor(cfg)
    return inv, 1.0


def rope_cos_sin(positions_bt: jnp.ndarray, cfg: RopeConfig, rot_dim: int, dtype):
    """cos, sin of shape [B, T, rot_dim] for integer positions [B, T]."""
    inv, scaling = inverse_frequencies(cfg, rot_dim)
    inv = jnp.asarray(inv)
    if cfg.scaling == "dynamic":
        # NTK-aware base for the current length L = max(max position + 1, original max).
        seq_len = jnp.maximum(jnp.max(positions_bt) + 1, cfg.original_max_position).astype(jnp.float32)
        base = cfg.theta * (cfg.factor * seq_len / cfg.original_max_position
                            - (cfg.factor - 1)) ** (rot_dim / (rot_dim - 2))
        exponent = jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim
        inv = 1.0 / (base ** exponent)
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv
    angles_btr = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    cos = (jnp.cos(angles_btr) * scaling).astype(dtype)
    sin = (jnp.sin(angles_btr) * scaling).astype(dtype)
    return cos, sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_bthk: jnp.ndarray, cos_btr: jnp.ndarray, sin_btr: jnp.ndarray) -> jnp.ndarray:
    """Rotates the first rot_dim = cos.shape[-1] dims of every head; the rest pass through."""
    rot_dim = cos_btr.shape[-1]
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    x_rot, x_pass = x_bthk[..., :rot_dim], x_bthk[..., rot_dim:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return rotated.astype(x_bthk.dtype)
    return jnp.concatenate([rotated, x_pass], axis=-1).astype(x_bthk.dtype)
