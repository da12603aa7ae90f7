"""What a sweep runs: a base config, settings (a grid or a list of override sets) and seeds.

    grid = parse_grid(["model.rope.fraction=0.25,1.0", "train.learning_rate=1e-3,3e-3"])
    settings = grid_settings(grid)                 # 4 (name, overrides) pairs
    runs = make_runs("cfg.py", settings, seeds=[0, 1], out="runs/x")
    validate_runs("cfg.py", runs)                  # ConfigError before anything runs

Overrides stay the strings a user would type after `--config.KEY=` (launch.py parses them
with ml_collections, by the type of the field), so a run here is exactly the command line
`launch.py --config CFG --workdir OUT/SETTING/seedK --config.KEY=VALUE ...`. Validation goes
through the same parser and then `jaxlm.config.parse_config`, so a sweep fails on a bad field
or value before its first run, with the same one-line message launch.py would print.

A sweep definition (a `--sweep_file` JSON, or `get_sweep(variant)` in the config file) is a
dict with any of
    "grid": {"KEY": [v1, v2], ...}               the product of the values
    "runs": [{"KEY": v, ...} | {"name": N, "overrides": {...}}, ...]   explicit settings
    "set":  {"KEY": v, ...}                       applied to every run
    "seeds": [0, 1]                               (a bare list is taken as "runs")
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

from jaxlm.schema import ConfigError, unknown_key_error

Overrides = tuple[tuple[str, str], ...]
SEED_FIELDS = ("train.seed", "data.seed")


@dataclasses.dataclass(frozen=True)
class Run:
    """One launch: a setting at one seed, in its own workdir."""

    setting: str
    seed: int
    setting_overrides: Overrides     # what distinguishes the setting
    overrides: Overrides             # everything passed: common, setting, seed, steps
    workdir: str

    def launch_args(self, config: str) -> list[str]:
        return (["--config", config, "--workdir", self.workdir]
                + [f"--config.{key}={value}" for key, value in self.overrides])

    def to_json(self) -> dict:
        return {"setting": self.setting, "seed": self.seed, "workdir": self.workdir,
                "setting_overrides": [list(kv) for kv in self.setting_overrides],
                "overrides": [list(kv) for kv in self.overrides]}

    @classmethod
    def from_json(cls, d: dict) -> "Run":
        return cls(d["setting"], int(d["seed"]), tuple(map(tuple, d["setting_overrides"])),
                   tuple(map(tuple, d["overrides"])), d["workdir"])


def split_values(text: str) -> list[str]:
    """Splits on commas outside brackets and quotes: "1,2" -> ["1", "2"],
    "('a','b'),('c',)" -> ["('a','b')", "('c',)"]."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    """'a.b=v' -> ('a.b', 'v'); a leading '--config.' is accepted."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"{what} {text!r}: expected KEY=VALUE with a dotted config field, "
                          "e.g. train.learning_rate=1e-3")
    return key, value.strip()


def parse_grid(texts: Sequence[str]) -> dict[str, list[str]]:
    """--grid 'KEY=v1,v2' flags -> {KEY: [v1, v2]} (insertion ordered)."""
    grid: dict[str, list[str]] = {}
    for text in texts:
        key, values = parse_assignment(text, "--grid")
        values_list = split_values(values)
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; expected each field once")
        if not values_list or any(v == "" for v in values_list):
            raise ConfigError(f"--grid {text!r}: expected comma-separated non-empty values")
        grid[key] = values_list
    return grid


def value_text(value: Any) -> str:
    """A JSON / Python value as launch.py's override text (lists become tuples)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(repr(tuple(v)) if isinstance(v, list) else repr(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def _short(key: str, keys: Iterable[str]) -> str:
    """The last component of a dotted key, unless another key shares it."""
    last = key.rsplit(".", 1)[-1]
    clashes = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    return last if len(clashes) <= 1 else key


def setting_name(overrides: Overrides, keys: Iterable[str] | None = None) -> str:
    """A directory-safe name: 'fraction=0.25__learning_rate=1e-3' ('base' when empty)."""
    keys = list(dict.fromkeys(keys if keys is not None else [k for k, _ in overrides]))

    def clean(value: str) -> str:
        return re.sub(r"[^\w.+\-,]", "", value.replace("/", "-")).strip(",")
    return "__".join(f"{_short(k, keys)}={clean(v)}" for k, v in overrides) or "base"


def grid_settings(grid: dict[str, list[str]]) -> list[tuple[str, Overrides]]:
    keys = list(grid)
    settings = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = tuple(zip(keys, combo))
        settings.append((setting_name(overrides, keys), overrides))
    return settings


def list_settings(entries: Sequence[Any], where: str) -> list[tuple[str, Overrides]]:
    """The list form: each entry {KEY: value} or {"name": N, "overrides": {KEY: value}}."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(f"{where}: expected a non-empty list of override sets")
    settings = []
    all_keys = [k for e in entries if isinstance(e, dict)
                for k in (e.get("overrides") if "overrides" in e else e)]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}[{i}]={entry!r}: expected an object of overrides")
        name = entry.get("name") if "overrides" in entry else None
        body = entry["overrides"] if "overrides" in entry else entry
        if not isinstance(body, dict):
            raise ConfigError(f"{where}[{i}].overrides: expected an object of overrides")
        overrides = tuple((parse_assignment(f"{k}=x", where)[0], value_text(v))
                          for k, v in body.items())
        settings.append((str(name) if name else setting_name(overrides, all_keys), overrides))
    return settings


def from_definition(definition: Any, where: str) -> dict:
    """A sweep definition (see the module docstring) -> {settings, common, seeds}."""
    if isinstance(definition, (list, tuple)):
        definition = {"runs": definition}
    if not isinstance(definition, dict):
        raise ConfigError(f"{where}: expected an object with 'grid', 'runs', 'set', 'seeds'")
    unknown = set(definition) - {"grid", "runs", "set", "seeds"}
    if unknown:
        raise unknown_key_error(sorted(unknown)[0], ["grid", "runs", "set", "seeds"],
                                f"{where}.")
    settings: list[tuple[str, Overrides]] = []
    if "grid" in definition:
        grid = definition["grid"]
        if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) and v
                                                 for v in grid.values()):
            raise ConfigError(f"{where}.grid: expected {{KEY: [values, ...]}}")
        settings += grid_settings({parse_assignment(f"{k}=x", where)[0]:
                                   [value_text(v) for v in vals] for k, vals in grid.items()})
    if "runs" in definition:
        settings += list_settings(definition["runs"], f"{where}.runs")
    common = tuple((parse_assignment(f"{k}=x", where)[0], value_text(v))
                   for k, v in (definition.get("set") or {}).items())
    seeds = definition.get("seeds")
    if seeds is not None and (not isinstance(seeds, (list, tuple))
                              or not all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}.seeds={seeds!r}: expected a list of non-negative ints")
    return {"settings": settings, "common": common, "seeds": list(seeds) if seeds else None}


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={text!r}: expected distinct non-negative ints like 0,1,2")
    return seeds


def config_path(config: str) -> tuple[str, str | None]:
    path, _, variant = config.partition(":")
    return path, (variant or None)


def load_config_module(config: str):
    """The config file as a module (to look for `get_sweep`)."""
    path, _ = config_path(config)
    if not os.path.isfile(path):
        raise ConfigError(f"--config={config!r}: no such file")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_sweep(config: str) -> dict | None:
    """`get_sweep(variant)` of the config file, parsed, or None if it defines none."""
    module = load_config_module(config)
    if not hasattr(module, "get_sweep"):
        return None
    return from_definition(module.get_sweep(config_path(config)[1]), f"{config} get_sweep()")


def make_runs(settings: Sequence[tuple[str, Overrides]], seeds: Sequence[int], out: str, *,
              common: Overrides = (), steps: int | None = None,
              seed_fields: Sequence[str] = SEED_FIELDS) -> list[Run]:
    """One Run per (setting, seed), in <out>/<setting>/seed<k>. Later overrides win: common,
    then the setting's, then the seed fields and --steps."""
    names = [name for name, _ in settings]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"setting {duplicate!r} appears twice; expected distinct settings "
                          "(give list entries a 'name')")
    runs = []
    for name, overrides in settings:
        for seed in seeds:
            merged = dict(common)
            merged.update(overrides)
            merged.update({f: str(seed) for f in seed_fields})
            if steps is not None:
                merged["train.steps"] = str(steps)
            runs.append(Run(name, seed, tuple(overrides), tuple(merged.items()),
                            os.path.join(out, name, f"seed{seed}")))
    return runs


# ---- validation --------------------------------------------------------------------------

def _load_with_overrides(config: str, overrides: Overrides):
    """The ConfigDict launch.py would build (same parser: ml_collections config_flags)."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["sweep", f"--config={config}"] + [f"--config.{k}={v}" for k, v in overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
    error = getattr(holder.value, "_error", None)
    if error is not None:
        raise ConfigError(f"--config={config}: {error}")
    return holder.value


def _check_keys(base, overrides: Overrides) -> None:
    for key, _ in overrides:
        node, parts = base, key.split(".")
        for depth, part in enumerate(parts):
            known = list(node.keys()) if hasattr(node, "keys") else []
            if part not in known:
                prefix = ".".join(parts[:depth])
                raise unknown_key_error(part, known, prefix + "." if prefix else "")
            node = node[part]


def validate_overrides(config: str, overrides: Overrides):
    """The parsed, validated config of one run; ConfigError (one line) otherwise."""
    from jaxlm.config import parse_config
    base = _load_with_overrides(config, ())
    _check_keys(base, overrides)
    cd = _load_with_overrides(config, overrides)
    try:
        return parse_config(cd)
    except ConfigError as e:
        where = ", ".join(f"{k}={v}" for k, v in overrides if k not in SEED_FIELDS)
        raise ConfigError(f"{e} (in the run with {where})" if where else str(e)) from None


def validate_runs(config: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Validates every run's overrides; returns {workdir: parsed config}."""
    if not runs:
        raise ConfigError("the sweep has no runs: expected --grid, --sweep_file or a config "
                          "with get_sweep()")
    checked = {}
    base = _load_with_overrides(config, ())
    for run in runs:
        _check_keys(base, run.overrides)
    for run in runs:
        checked[run.workdir] = validate_overrides(config, run.overrides)
    return checked


def read_sweep_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--sweep_file={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            definition = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--sweep_file={path!r}: not valid JSON ({e.msg} at line "
                              f"{e.lineno})") from None
    return from_definition(definition, path)
