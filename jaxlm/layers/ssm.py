"""Mamba-2 mixer and the three scans of its recurrence (chunked SSD, associative, sequential)."""

from __future__ import annotations

from typing import Optional

from jaxlm.schema import field, section


@section
class SSMConfig:
    num_heads: int = field(8, "Mamba-2 heads Hm", min=1)
    head_dim: int = field(64, "Mamba-2 head dim P (d_inner = Hm·P)", min=1)
    state_dim: int = field(64, "SSM state size N", min=1)
    num_groups: int = field(1, "B/C groups G (head h uses group h // (Hm/G))", min=1)
    conv_width: int = field(4, "causal depthwise conv width K", min=1)
    chunk_size: int = field(256, "SSD chunk length Q", min=1)
    scan: str = field("chunked", "scan algorithm: SSD chunks, lax.associative_scan, or lax.scan",
                      choices=("chunked", "associative", "sequential"))
    conv_bias: bool = field(True, "bias on the depthwise conv")
    proj_bias: bool = field(False, "bias on in_proj / out_proj")
    dt_min: float = field(0.001, "init: smallest Δt", min=0.0, min_exclusive=True)
    dt_max: float = field(0.1, "init: largest Δt", min=0.0, min_exclusive=True)
    dt_limit_min: float = field(0.0, "clamp Δt from below after softplus", min=0.0)
    dt_limit_max: float = field(float("inf"), "clamp Δt from above after softplus", min=0.0)
