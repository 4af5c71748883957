"""Defenses, one module each. A pipeline names them by module name (`magnet`, `smoothing`, ...).

Each module exposes `build(options: dict, env: DefenseEnv) -> list[Component]`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from service.defenses.base import Component, DefenseEnv

_NOT_DEFENSES = {"base"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_DEFENSES and not m.name.startswith("_"))


def build_defense(name: str, options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    if name not in available():
        raise ValueError(f"unknown defense {name!r}; available: {available()}")
    module = importlib.import_module(f"service.defenses.{name}")
    components = module.build(dict(options), env)
    for c in components:
        c.defense = c.defense or name
    return components
