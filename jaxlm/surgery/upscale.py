"""Depth up-scaling: a new, deeper model whose layer i is a copy of source layer map[i].

    new_cfg, new_params = upscale(cfg, params, solar(32, 8))      # 48 layers (SOLAR 10.7B)
    new_cfg, new_params = upscale(cfg, params, yi(32))            # 48 layers (Yi-9B)
    new_cfg, new_params = upscale(cfg, params, [(0, 24), (8, 32)])  # mergekit passthrough slices

A layer map is a list of source layer indices or of mergekit-style half-open `(start, stop)`
slices (SPEC §F). Because block parameters are stacked over the repeats of the layer pattern,
layer l is slot l % P of repeat l // P (P = len(layer_pattern)), and the up-scaled stack of slot
s is a gather of its sources along that axis. A map is valid only if every new layer takes a
source layer of the same kind (attention / Mamba) and the new depth is a multiple of P, so the
result is again the pattern repeated. Embeddings, final norm and head are copied from the base.

The optimizer state is not carried over (the caller re-initialises it). Other collections
stacked the same way (e.g. the MoE `router_state`) up-scale with `gather_layers`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np

from jaxlm.models.config import LAYER_KINDS, ModelConfig
from jaxlm.schema import replace

LayerMap = Sequence[Union[int, Sequence[int]]]


def solar(num_layers: int, drop: int) -> list[tuple[int, int]]:
    """SOLAR: two copies of the model, the first without its last `drop` layers and the second
    without its first `drop` layers (L=32, drop=8 -> [(0, 24), (8, 32)], 48 layers)."""
    if not 0 < drop < num_layers:
        raise ValueError(f"solar drop={drop}: expected 0 < drop < num_layers={num_layers}")
    return [(0, num_layers - drop), (drop, num_layers)]


def yi(num_layers: int, start: int | None = None, stop: int | None = None) -> list[tuple[int, int]]:
    """Yi-9B: layers [start, stop) appear twice: [(0, stop), (start, num_layers)].

    Defaults scale Yi's choice for 32 layers (start 12, stop 28: 0–27, 12–27, 28–31 -> 48) to
    other depths: start = round(3L/8), stop = round(7L/8).
    """
    start = round(3 * num_layers / 8) if start is None else start
    stop = round(7 * num_layers / 8) if stop is None else stop
    if not 0 <= start < stop <= num_layers:
        raise ValueError(f"yi start={start}, stop={stop}: expected 0 <= start < stop <= "
                         f"num_layers={num_layers}")
    return [(0, stop), (start, num_layers)]


def from_mergekit(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Slices of a mergekit passthrough config dict
    (`{"slices": [{"sources": [{"model": M, "layer_range": [a, b]}]}, ...]}`), one model."""
    if config.get("merge_method", "passthrough") != "passthrough":
        raise ValueError(f"mergekit merge_method={config.get('merge_method')!r}: expected "
                         "'passthrough' for depth up-scaling")
    slices, models = [], set()
    for i, piece in enumerate(config.get("slices") or []):
        sources = piece.get("sources") or []
        if len(sources) != 1 or len(sources[0].get("layer_range") or ()) != 2:
            raise ValueError(f"mergekit slices[{i}]: expected one source with a layer_range "
                             "[start, stop]")
        models.add(sources[0].get("model"))
        slices.append(tuple(int(x) for x in sources[0]["layer_range"]))
    if not slices:
        raise ValueError("mergekit config: expected a non-empty 'slices' list")
    if len(models) > 1:
        raise ValueError(f"mergekit slices use models {sorted(map(str, models))}: expected one")
    return slices


def expand_layer_map(layer_map: LayerMap, num_layers: int) -> list[int]:
    """Source layer of each new layer; raises a one-line error naming a bad entry."""
    layer_map = list(layer_map)
    if not layer_map:
        raise ValueError("layer_map=[]: expected source layer indices or (start, stop) slices")
    sources: list[int] = []
    is_index = [isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in layer_map]
    if all(is_index):
        for i, src in enumerate(layer_map):
            if not 0 <= src < num_layers:
                raise ValueError(f"layer_map[{i}]={src}: expected a source layer index in "
                                 f"[0, {num_layers})")
            sources.append(int(src))
        return sources
    for i, piece in enumerate(layer_map):
        ok = (not is_index[i] and isinstance(piece, Sequence) and len(piece) == 2
              and all(isinstance(x, (int, np.integer)) for x in piece))
        if not ok:
            raise ValueError(f"layer_map[{i}]={piece!r}: expected all entries to be layer "
                             "indices or all to be (start, stop) slices")
        start, stop = int(piece[0]), int(piece[1])
        if not 0 <= start < stop <= num_layers:
            raise ValueError(f"layer_map[{i}]=({start}, {stop}): expected a half-open slice with "
                             f"0 <= start < stop <= {num_layers}")
        sources.extend(range(start, stop))
    return sources


def check_pattern(cfg: ModelConfig, sources: Sequence[int]) -> None:
    """The up-scaled model must again repeat cfg.layer_pattern, kind for kind."""
    pattern, period = cfg.layer_pattern, len(cfg.layer_pattern)
    if len(sources) % period:
        raise ValueError(f"layer_map gives {len(sources)} layers: expected a multiple of "
                         f"len(layer_pattern)={period} (pattern {pattern!r})")
    for i, src in enumerate(sources):
        new_kind, src_kind = pattern[i % period], pattern[src % period]
        if new_kind != src_kind:
            raise ValueError(f"layer_map new layer {i} <- source layer {src}: new layer {i} is "
                             f"{LAYER_KINDS[new_kind]} (pattern {pattern!r}) but the source is "
                             f"{LAYER_KINDS[src_kind]}")


def gather_layers(collection: Mapping[str, Any], sources: Sequence[int],
                  period: int) -> dict[str, Any]:
    """A collection with stacked `blocks/slot_s/...` leaves -> the same with new layer i taken
    from source layer sources[i]; everything outside `blocks` is copied."""
    blocks = _as_numpy(collection["blocks"])  # one host copy of device arrays, not one per pick

    def leaf(slot: int, path: tuple[str, ...]):
        node = blocks[f"slot_{slot}"]
        for key in path:
            node = node[key]
        return node

    def build(template: Mapping[str, Any], slot: int, path: tuple[str, ...]):
        out = {}
        for key, value in template.items():
            if isinstance(value, Mapping):
                out[key] = build(value, slot, path + (key,))
                continue
            picks = [leaf(src % period, path + (key,))[src // period]
                     for src in sources[slot::period]]
            out[key] = np.stack(picks)
        return out

    new = {key: _copy(value) for key, value in collection.items() if key != "blocks"}
    new["blocks"] = {f"slot_{s}": build(blocks[f"slot_{s}"], s, ()) for s in range(period)}
    return new


def _as_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _copy(tree):
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return np.array(tree)


def upscale(cfg: ModelConfig, params: Mapping[str, Any],
            layer_map: LayerMap) -> tuple[ModelConfig, dict[str, Any]]:
    """(config with the new num_layers, params as NumPy arrays) of the up-scaled model."""
    sources = expand_layer_map(layer_map, cfg.num_layers)
    check_pattern(cfg, sources)
    new_cfg = replace(cfg, num_layers=len(sources))
    return new_cfg, gather_layers(params, sources, len(cfg.layer_pattern))
