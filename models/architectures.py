"""Network architectures shipped with shieldserve, and how a bundle names an architecture.

A bundle's manifest describes each network as an *architecture spec*, one of
  {"kind": "builtin", "name": "mnist_cnn", "kwargs": {...}}      a network defined here
  {"kind": "import", "factory": "pkg.module:fn", "kwargs": {...}} the user's own code
  {"kind": "torchscript"}                                          a TorchScript file (no weights file)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class MnistCNN(nn.Module):
    """The base classifier: two conv blocks and two dense layers (the Carlini-Wagner MNIST shape).

    `features` returns the penultimate activations, which RMC indexes for nearest neighbours.
    Works for any input size and channel count: the flattened width is measured at build time.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 32, hidden: int = 200, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.body(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.out = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class TinyCNN(nn.Module):
    """A very small classifier for tests and for shapes other than MNIST's (e.g. 3x32x32)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8 * width, 32), nn.ReLU())
        self.out = nn.Linear(32, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "tiny_cnn": TinyCNN,
}


def register_builtin(name: str, factory: Callable[..., nn.Module]) -> None:
    """Defense modules add their own networks (autoencoders, generators, ...) here."""
    BUILTIN[name] = factory


def builtin_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"kind": "builtin", "name": name, "kwargs": kwargs}


def import_factory(path: str) -> Callable[..., nn.Module]:
    """Resolve "package.module:factory" to a callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:factory', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} for {path!r} ({exc}): run shieldserve from the directory "
                         f"that holds it, or put that directory on PYTHONPATH (the service needs it too)") from exc
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def build_architecture(spec: dict[str, Any]) -> nn.Module:
    """Instantiate an (untrained) network from an architecture spec."""
    kind = spec.get("kind", "builtin")
    kwargs = dict(spec.get("kwargs", {}))
    if kind == "builtin":
        name = spec["name"]
        if name not in BUILTIN:
            _import_defense_architectures()
        if name not in BUILTIN:
            raise ValueError(f"unknown builtin architecture {name!r}; known: {sorted(BUILTIN)}")
        return BUILTIN[name](**kwargs)
    if kind == "import":
        return import_factory(spec["factory"])(**kwargs)
    raise ValueError(f"architecture kind {kind!r} cannot be built from a spec")


def _import_defense_architectures() -> None:
    # Networks that belong to one defense (autoencoders, generators) live in models.recipes.*
    # and register themselves on import.
    import pkgutil

    import models.recipes as recipes

    for info in pkgutil.iter_modules(recipes.__path__):
        importlib.import_module(f"models.recipes.{info.name}")
