"""Named model shapes of every family. Each family module has a `SIZES` table and
`config(size) -> ModelConfig`; the big sizes are meant for `jax.eval_shape` on this machine.

    presets.get("llama", "tiny")   # also: presets.names(), presets.sizes("llama")
"""

from __future__ import annotations

from types import ModuleType

from jaxlm.models import granite, llama, mamba2, mixtral, stablelm
from jaxlm.models.config import ModelConfig

# family name -> its module (each family lives in its own module under jaxlm/models/).
FAMILIES: dict[str, ModuleType] = {"llama": llama}
FAMILIES["stablelm"] = stablelm
FAMILIES["mixtral"] = mixtral
FAMILIES["granite_hybrid"] = granite
FAMILIES["mamba2"] = mamba2


def get(family: str, size: str) -> ModelConfig:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    if size not in FAMILIES[family].SIZES:
        raise ValueError(f"unknown {family} size {size!r}; expected one of {sizes(family)}")
    cfg = FAMILIES[family].config(size)
    cfg.validate()
    return cfg


def names() -> list[str]:
    return sorted(FAMILIES)


def sizes(family: str) -> list[str]:
    return sorted(FAMILIES[family].SIZES)
