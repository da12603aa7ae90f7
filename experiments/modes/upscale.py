"""--mode upscale: depth up-scale a run into a new run directory (step 0, fresh optimizer).

    launch.py --mode upscale --from_workdir runs/base --workdir runs/solar --layer_map solar:8

--layer_map is one of
    solar:M        two copies of the L-layer stack, without the last M / the first M layers
                   (`solar` alone: M = L/4, SOLAR 10.7B's 8 of 32)
    yi[:A:B]       layers [A, B) twice: 0..B-1, A..L-1 (default A, B = 3L/8, 7L/8: Yi-9B's 12, 28)
    0,1,2,3,2,3    source layer of each new layer
    0:24,8:32      half-open slices, concatenated (mergekit passthrough)
    FILE.yaml      a mergekit passthrough config (`slices: [{sources: [{layer_range: ...}]}]`)
The new run keeps the source's config except model.num_layers (with --config: all of that
file's sections but the model); embeddings, final norm and head come from the source.
"""

from __future__ import annotations

import json
import os

from absl import flags

flags.DEFINE_string("from_workdir", None, "upscale: the run directory to up-scale")
flags.DEFINE_string("layer_map", None, "upscale: solar:M | yi[:A:B] | indices 0,1,2 | slices "
                    "0:24,8:32 | a mergekit YAML file")


def parse_layer_map(text: str, num_layers: int) -> list:
    """The `--layer_map` text as a layer map of `jaxlm.surgery.upscale` (indices or slices)."""
    from jaxlm.surgery import upscale as ups
    text = (text or "").strip()
    where = f"--layer_map={text!r}"
    if text.endswith((".yaml", ".yml")) or os.path.isfile(text):
        import yaml
        if not os.path.isfile(text):
            raise ValueError(f"{where}: no such mergekit YAML file")
        with open(text, encoding="utf-8") as f:
            try:
                config = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") \
                    from None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: expected a mergekit config mapping with 'slices'")
        return ups.from_mergekit(config)
    name, _, rest = text.partition(":")
    try:
        if name == "solar":
            return ups.solar(num_layers, int(rest) if rest else num_layers // 4)
        if name == "yi":
            if not rest:
                return ups.yi(num_layers)
            start, stop = (int(x) for x in rest.split(":"))
            return ups.yi(num_layers, start, stop)
        pieces = [p.strip() for p in text.split(",")]
        if all(":" in p for p in pieces):
            return [tuple(int(x) for x in p.split(":")) for p in pieces]
        return [int(p) for p in pieces]
    except ValueError as e:
        if "expected" in str(e):  # the presets' own range errors
            raise
        raise ValueError(f"{where}: expected solar:M, yi[:A:B], indices like 0,1,2, slices like "
                         "0:24,8:32, or a mergekit .yaml file") from None


def run(ctx) -> None:
    f = ctx.flags
    if not f.from_workdir or not f.layer_map:
        ctx.fail("--mode upscale needs --from_workdir (source run) and --layer_map")
    from jaxlm.surgery import rundir
    from jaxlm.surgery.upscale import (check_pattern, expand_layer_map, gather_layers,
                                       upscale)
    rundir.check_new_workdir(ctx.workdir)  # fail before reading anything big
    source = rundir.read_run(f.from_workdir)
    model = source.cfg.model
    layer_map = parse_layer_map(f.layer_map, model.num_layers)
    sources = expand_layer_map(layer_map, model.num_layers)
    check_pattern(model, sources)
    new_model, params = upscale(model, source.params, layer_map)
    period = len(model.layer_pattern)
    model_state = {name: gather_layers(collection, sources, period) if "blocks" in collection
                   else collection for name, collection in source.model_state.items()}
    base = ctx.config() if ctx.config_given else source.cfg
    cfg = rundir.with_model(base, new_model)
    origin = {"mode": "upscale", "from_workdir": os.path.abspath(f.from_workdir),
              "from_step": source.step, "layer_map": f.layer_map, "sources": sources}
    path = rundir.write_run(ctx.workdir, cfg, params, model_state, origin=origin)
    print(json.dumps({"workdir": path, "num_layers": new_model.num_layers,
                      "from_layers": model.num_layers, "sources": sources}))
