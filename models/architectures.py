"""Network architectures shipped with shieldserve, and how a bundle names an architecture.

Every network a bundle can name as a builtin is defined here, the defenses' own included
(MagNet's autoencoder, Defense-GAN's generator, critic and encoder, randomized smoothing's
classifiers and DnCNN denoiser): loading a bundle never imports a training recipe
(models/recipes/, which imports these classes from here to train them).

A bundle's manifest describes each network as an *architecture spec*, one of
  {"kind": "builtin", "name": "mnist_cnn", "kwargs": {...}}      a network defined here
  {"kind": "import", "factory": "pkg.module:fn", "kwargs": {...}} the user's own code
  {"kind": "torchscript"}                                          a TorchScript file (no weights file)

An `import` spec runs the named Python code when the bundle is loaded, so a bundle with one is
code, not data: `Bundle.load` refuses it unless the operator trusts the module
(`import_trusted`; the `trusted_imports` setting, `train --trust-import`).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
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


# ------------------------------------------------------- MagNet's autoencoder
class MagnetAutoencoder(nn.Module):
    """The reference's DAE: 3x3 convs (sigmoid in the reference, ReLU by our default), pooling mirrored by
    upsampling, and a final 3x3 conv with a sigmoid back to the input's channels."""

    def __init__(self, in_channels: int = 1, structure: list[int | str] | None = None,
                 activation: str = "sigmoid") -> None:
        super().__init__()
        act: type[nn.Module] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
        structure = list(structure if structure is not None else [3, "average", 3])
        layers: list[nn.Module] = []
        c = in_channels
        for layer in structure:
            if isinstance(layer, int):
                layers += [nn.Conv2d(c, layer, 3, padding=1), act()]
                c = layer
            elif layer in ("average", "max"):
                layers.append(nn.AvgPool2d(2) if layer == "average" else nn.MaxPool2d(2))
            else:
                raise ValueError(f"unknown autoencoder layer {layer!r}")
        for layer in reversed(structure):
            if isinstance(layer, int):
                layers += [nn.Conv2d(c, layer, 3, padding=1), act()]
                c = layer
            else:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.Conv2d(c, in_channels, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------- Defense-GAN's networks
class Generator(nn.Module):
    """Three stride-2 transposed convolutions from a `start` x `start` seed: 4x4 up to side 32
    (MNIST: 4 -> 8, cropped to 7 -> 14 -> 28), side/8 above; the output is cropped to `image_size`."""

    def __init__(self, latent_dim: int = 128, width: int = 64, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if not 4 <= image_size <= 256:
            raise ValueError(f"the Defense-GAN generator makes images of side 4 to 256, not {image_size}")
        self.latent_dim, self.width, self.image_size = latent_dim, width, image_size
        self.crop = math.ceil(image_size / 4)  # after the first upsampling
        self.start = max(4, math.ceil(self.crop / 2))
        self.fc = nn.Linear(latent_dim, self.start * self.start * 4 * width)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=2, padding=2, output_padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 5, stride=2, padding=2, output_padding=1)
        self.up3 = nn.ConvTranspose2d(width, channels, 5, stride=2, padding=2, output_padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, 4 * self.width, self.start, self.start)
        h = F.relu(self.up1(h))[:, :, :self.crop, :self.crop]  # 8x8 -> 7x7 for MNIST
        h = F.relu(self.up2(h))
        return torch.sigmoid(self.up3(h))[:, :, :self.image_size, :self.image_size]

    @torch.no_grad()
    def reconstruction_grad(self, z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G(z), per-row mean squared error against `target`, its gradient with respect to z):
        what each step of Defense-GAN's projection needs, with the backward pass written out.

        The projection runs thousands of these on a handful of rows, where autograd's graph
        and oneDNN's per-call set-up cost more than the arithmetic. The adjoint of a transposed
        convolution is the plain convolution with the same weights and stride; a crop's adjoint
        pads with zeros; ReLU's passes the gradient where its input was positive. Up to
        NATIVE_MAX_ROWS rows on a CPU the convolutions run on ATen's direct (im2col + GEMM)
        kernels, which have no per-call set-up; larger batches and GPUs use the default ones.
        tests/test_defensegan.py checks it against autograd."""
        native = z.device.type == "cpu" and z.shape[0] <= self.NATIVE_MAX_ROWS
        a0 = F.linear(z, self.fc.weight, self.fc.bias)
        a1 = _up(a0.clamp_min(0).view(-1, 4 * self.width, self.start, self.start), self.up1, native)
        a1c = a1[:, :, :self.crop, :self.crop]
        a2 = _up(a1c.clamp_min(0), self.up2, native)
        a3 = _up(a2.clamp_min(0), self.up3, native)
        out = torch.sigmoid(a3)[:, :, :self.image_size, :self.image_size]
        diff = out - target
        loss = diff.pow(2).flatten(1).mean(1)
        g = diff * (2.0 / diff[0].numel()) * out * (1 - out)                       # d/d a3 (cropped)
        g = _down(_pad_to(g, a3), self.up3, native) * (a2 > 0)                        # d/d a2
        g = _down(g, self.up2, native) * (a1c > 0)                                     # d/d a1 (cropped)
        g = _down(_pad_to(g, a1), self.up1, native).reshape(len(z), -1) * (a0 > 0)    # d/d a0
        return out, loss, g @ self.fc.weight

    NATIVE_MAX_ROWS = 8  # where the direct kernels measured faster on 2 cores (not from ~16 rows)


def _up(x: torch.Tensor, layer: nn.ConvTranspose2d, native: bool) -> torch.Tensor:
    if native:
        return torch.ops.aten.slow_conv_transpose2d(x, layer.weight, list(layer.kernel_size), layer.bias,
                                                    list(layer.stride), list(layer.padding),
                                                    list(layer.output_padding), list(layer.dilation))
    return layer(x)


def _down(g: torch.Tensor, layer: nn.ConvTranspose2d, native: bool) -> torch.Tensor:
    """The adjoint of `layer` (a transposed convolution) applied to the gradient g."""
    if native:
        return torch.ops.aten.thnn_conv2d(g, layer.weight, list(layer.kernel_size), None, list(layer.stride),
                                          list(layer.padding))
    return F.conv2d(g, layer.weight, None, layer.stride, layer.padding, layer.dilation)


def _pad_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A crop's adjoint: g (the top-left corner of `like`) zero-padded to like's size."""
    dh, dw = like.shape[2] - g.shape[2], like.shape[3] - g.shape[3]
    return F.pad(g, (0, dw, 0, dh)) if dh or dw else g


class _ConvBody(nn.Sequential):
    def __init__(self, width: int, channels: int, image_size: int) -> None:
        super().__init__(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        side = math.ceil(math.ceil(math.ceil(image_size / 2) / 2) / 2)
        self.flat = 4 * width * side * side


class Critic(nn.Module):
    def __init__(self, width: int = 64, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.body = _ConvBody(width, channels, image_size)
        self.out = nn.Linear(self.body.flat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).squeeze(1)


class Encoder(nn.Module):
    """x -> z: a warm start for the projection (trained to invert the generator).

    With `sphere`, z is put on the sphere of radius sqrt(latent), where N(0, I) puts its mass
    and where the projection searches (ProjectionSettings.min_norm = max_norm = 1)."""

    def __init__(self, latent_dim: int = 128, width: int = 64, channels: int = 1, image_size: int = 28,
                 sphere: bool = False) -> None:
        super().__init__()
        self.sphere = sphere
        self.body = _ConvBody(width, channels, image_size)
        self.out = nn.Linear(self.body.flat, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(self.body(x))
        if self.sphere:
            z = z * (z.shape[1] ** 0.5 / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return z


# ---------------------------- randomized smoothing's classifiers and denoiser
class SmoothingMLP(nn.Module):
    """Flatten, two hidden ReLU layers, logits. Fast under many noise samples on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        d = in_channels * image_size * image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class SmoothingCNN(nn.Module):
    """Two strided convolutions and a dense layer: ~5 MFLOP per digit at width 32 (1.7 at 16),
    stronger than the MLP under noise and still mostly large matrix multiplications."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.body(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _small_mlp(**kwargs: Any) -> SmoothingMLP:
    return SmoothingMLP(**{**kwargs, "hidden": 128})


class DnCNN(nn.Module):
    """Zhang et al. 2017's denoiser, small: predicts the noise and subtracts it."""

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, in_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)


# ------------------------------------------------- the names a bundle's spec uses
BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "tiny_cnn": TinyCNN,
    "magnet_autoencoder": MagnetAutoencoder,
    "defensegan_generator": Generator,
    "defensegan_critic": Critic,
    "defensegan_encoder": Encoder,
    "smoothing_mlp": SmoothingMLP,
    "smoothing_mlp_small": _small_mlp,
    "smoothing_cnn": SmoothingCNN,
    "dncnn": DnCNN,
}


def register_builtin(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a network under a builtin name (e.g. from a plugin or a test); shieldserve's own are in BUILTIN."""
    BUILTIN[name] = factory


def builtin_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"kind": "builtin", "name": name, "kwargs": kwargs}


def import_trusted(factory: str, trusted: Iterable[str]) -> bool:
    """May a bundle's `import` architecture run `factory` ("pkg.module:fn")? Only where the
    operator named it: an entry "pkg" trusts the module pkg and every module under it (pkg.nets,
    not pkgfoo), an entry "pkg.module:fn" that one factory."""
    module = factory.partition(":")[0]
    for entry in trusted:
        entry = entry.strip()
        if not entry or entry.lower().startswith("torchscript:"):  # trusts one TorchScript file, no module
            continue
        if ":" in entry:
            if factory == entry:
                return True
        elif module == entry or module.startswith(entry + "."):
            return True
    return False


def import_factory(path: str, trusted: Iterable[str] | None = None) -> Callable[..., nn.Module]:
    """Resolve "package.module:factory" to a callable: one public name of the module, no
    attribute path (with "pkg.mod:torch.os.system" a bundle trusted for pkg.mod's own networks
    reached any code pkg.mod imports). With `trusted` (a bundle's spec, Bundle.load checked the
    module), the object must also be defined in trusted code: named exactly by a "pkg.mod:fn"
    entry, or from a module a module entry covers (not, say, `system` imported from os)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not _PUBLIC_NAME.match(attr):
        raise ValueError(f"factory must look like 'package.module:factory' (one public name of the module), "
                         f"got {path!r}")
    if trusted is not None and not import_trusted(path, trusted):
        raise ValueError(f"{path!r} is not among the trusted imports")
    try:
        module: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} for {path!r} ({exc}): run shieldserve from the directory "
                         f"that holds it, or put that directory on PYTHONPATH (the service needs it too)") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    if trusted is not None:
        defined_in = getattr(obj, "__module__", None)
        factories = [entry for entry in trusted if ":" in entry]
        modules = [entry for entry in trusted if ":" not in entry]
        if not import_trusted(path, factories) and not (
                isinstance(defined_in, str) and import_trusted(f"{defined_in}:{attr}", modules)):
            raise ValueError(f"{path!r} is defined in {defined_in!r}, which is not among the trusted imports")
    return obj


_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def build_architecture(spec: dict[str, Any], trusted_imports: Iterable[str] | None = None) -> nn.Module:
    """Instantiate an (untrained) network from an architecture spec. `trusted_imports`: for a
    spec read from a bundle, what its `import` factory may be (import_factory); None for the
    specs shieldserve and the user's own `--classifier` write."""
    kind = spec.get("kind", "builtin")
    kwargs = dict(spec.get("kwargs", {}))
    if kind == "builtin":
        name = spec["name"]
        if name not in BUILTIN:
            raise ValueError(f"unknown builtin architecture {name!r}; known: {sorted(BUILTIN)}")
        return BUILTIN[name](**kwargs)
    if kind == "import":
        net = import_factory(spec["factory"], trusted_imports)(**kwargs)
        if not isinstance(net, nn.Module):
            raise ValueError(f"{spec['factory']!r} returned a {type(net).__name__}, not a torch.nn.Module")
        return net
    raise ValueError(f"architecture kind {kind!r} cannot be built from a spec")

