"""Penultimate features of any classifier, found from the network itself.

RMC indexes images by the base network's penultimate activations, and fine-tunes the layer
after them. shieldserve's own networks have a `features` method; a user's network need not:

  method "features"  the network's own `features(x)` (eager, or `@torch.jit.export` in TorchScript)
  method "hook"      an eager network: the input of the last `nn.Linear` that runs in a forward
                     pass (found by running one), or with `layer` the output of that submodule
  method "chain"     a TorchScript network whose forward is a chain of its submodules (what
                     `torch.jit.trace` makes of an `nn.Sequential`): the chain is run up to the
                     last `Linear`, or up to and including `layer`; checked against the
                     network's own output before it is used

`head` is an eager copy of the last Linear when it alone maps the features to the logits
(checked on random inputs): RMC then fine-tunes just that layer (`trainable: last`).
"""

from __future__ import annotations

import io
import threading
from typing import Any

import torch
from torch import nn


class FeatureError(ValueError):
    """The network's penultimate features cannot be found (say which layer with --feature-layer)."""


class _Captured(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward pass is not needed."""


def _probe(shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *shape), generator=g)


def _is_script(m: nn.Module) -> bool:
    return isinstance(m, torch.jit.ScriptModule)


def _kind(m: nn.Module) -> str:
    return str(getattr(m, "original_name", type(m).__name__))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * (1 + float(b.abs().max()))))


def _chain(module: nn.Module, x: torch.Tensor, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """The leaves whose composition is `module` (checked on x), expanding every child that is
    itself such a chain; None when running the children in order does not give the module's output."""
    children = list(module.named_children())
    if not children:
        return None
    with torch.no_grad():
        want = module(x)
        h, steps = x, []
        try:
            for name, child in children:
                steps.append((name, child, h))
                h = child(h)
        except Exception:
            return None
        if not isinstance(h, torch.Tensor) or not _close(h, want):
            return None
    out: list[tuple[str, nn.Module]] = []
    for name, child, inp in steps:
        full = f"{prefix}{name}"
        sub = _chain(child, inp, full + ".")
        out.extend(sub if sub is not None else [(full, child)])
    return out


class FeatureExtractor:
    """features(x) of `network` (which takes the prepared input), found as the module doc says."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], layer: str | None = None) -> None:
        self.network = network
        self.layer = layer
        self.head: nn.Linear | None = None
        self._local = threading.local()  # each thread captures its own batch's features
        param = next(iter(network.parameters()), None)
        probe = _probe(input_shape).to(param.device if param is not None else "cpu")
        if layer is None and hasattr(network, "features"):
            self.method, self.layer = "features", "features"
            self._fn = network.features
            out = getattr(network, "out", None)  # the builtin networks' last layer
            self._last_linear = out if isinstance(out, nn.Linear) else None
        elif _is_script(network):
            self._init_chain(probe, layer)
        else:
            self._init_hook(probe, layer)
        self._check_head(probe)

    # ------------------------------------------------------------------ eager: hooks
    def _init_hook(self, probe: torch.Tensor, layer: str | None) -> None:
        modules = dict(self.network.named_modules())
        self.method = "hook"
        if layer is not None:
            if layer not in modules or not layer:
                raise FeatureError(f"--feature-layer {layer!r}: the network has no such submodule; "
                                   f"it has {[n for n in modules if n][:20]}")
            self._target = modules[layer]
            self._target.register_forward_hook(self._capture_output)
            self._last_linear = None
        else:
            order: list[str] = []
            handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
                       for n, m in modules.items() if isinstance(m, nn.Linear)]
            try:
                with torch.no_grad():
                    self.network(probe)
            finally:
                for h in handles:
                    h.remove()
            if not order:
                raise FeatureError("the network has no nn.Linear layer to take features before; give "
                                   "--feature-layer NAME (a submodule whose output are the features) "
                                   "or a `features(x)` method")
            self.layer = order[-1]
            self._target = modules[self.layer]
            self._target.register_forward_pre_hook(self._capture_input)
            self._last_linear = self._target
        self._fn = self._hooked

    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if getattr(self._local, "active", False):
            self._local.value = args[0]
            raise _Captured

    def _capture_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if getattr(self._local, "active", False):
            self._local.value = output
            raise _Captured

    def _hooked(self, x: torch.Tensor) -> torch.Tensor:
        self._local.active, self._local.value = True, None
        try:
            self.network(x)
        except _Captured:
            pass
        finally:
            self._local.active = False
        value, self._local.value = self._local.value, None
        if value is None:
            raise FeatureError(f"layer {self.layer!r} did not run in the forward pass")
        return value

    # ------------------------------------------------------------------ TorchScript: a chain
    def _init_chain(self, probe: torch.Tensor, layer: str | None) -> None:
        self.method = "chain"
        chain = _chain(self.network, probe)
        if chain is None and isinstance(self.network, torch.jit.TopLevelTracedModule):
            # a module traced in this process: its submodules cannot be called until it is
            # saved and loaded (what every bundle's TorchScript file is)
            buf = io.BytesIO()
            torch.jit.save(self.network, buf)
            buf.seek(0)
            chain = _chain(torch.jit.load(buf, map_location=probe.device).eval(), probe)
        if chain is None:
            # a TorchScript module takes no hooks, so a named layer is reachable only along a chain
            what = (f"--feature-layer {layer!r} cannot be used: a TorchScript classifier's layers are reached only "
                    f"along a chain of its submodules, and this one's forward is not one"
                    if layer is not None else
                    "this TorchScript classifier's forward is not a chain of its submodules, so its penultimate "
                    "features cannot be found")
            raise FeatureError(
                f"{what}; export an nn.Sequential (torch.jit.trace of one is a chain), "
                "add a `features(x)` method marked @torch.jit.export, or bring it with import:")
        names = [n for n, _ in chain]
        if layer is not None:
            if layer not in names:
                raise FeatureError(f"--feature-layer {layer!r}: not a layer of the chain {names}")
            stop = names.index(layer) + 1
            self._last_linear = None
        else:
            linear = [i for i, (_, m) in enumerate(chain) if _kind(m) == "Linear"]
            if not linear:
                raise FeatureError(f"no Linear layer in the chain {names}; give --feature-layer NAME")
            stop = linear[-1]
            self.layer = names[stop]
            self._last_linear = chain[stop][1]
        self._steps = [m for _, m in chain[:stop]]
        self._fn = self._run_chain

    def _run_chain(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._steps:
            x = m(x)
        return x

    # ------------------------------------------------------------------ the last layer
    def _check_head(self, probe: torch.Tensor) -> None:
        last = getattr(self, "_last_linear", None)
        if last is None:
            return
        w = last.weight.detach()
        b = last.bias.detach() if getattr(last, "bias", None) is not None else None
        head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            head.weight.copy_(w)
            if b is not None:
                head.bias.copy_(b)
            f = self(probe).flatten(1)
            if f.shape[1] == w.shape[1] and _close(head(f), self.network(probe)):
                self.head = head.to(w.device).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "last_linear_is_output": self.head is not None}
