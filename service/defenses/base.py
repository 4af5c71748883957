"""The four roles a defense component can play in a pipeline (see DESIGN.md).

  Detector   batch -> one score per image per detector; reject where score > threshold
  Purifier   batch -> batch of the same shape
  Adapter    (batch, classifier) -> the classifier to use for that batch
  Decider    (batch, classify) -> label or abstention, optional certified radius

A defense module (`service/defenses/<name>.py`) exposes
    build(options: dict, env: DefenseEnv) -> list[Component]
    PUBLIC_OPTIONS / public_settings(components) for GET /pipelines (never secrets)
and may return several components (MagNet is a detector set and a reformer).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from models.bundle import Bundle, Classifier

Classify = Callable[[torch.Tensor], torch.Tensor]  # pixels in [0, 1] -> logits


class DeadlineExceeded(Exception):
    """The request's deadline passed, or its client went away, while work was running."""


def exact_bytes(x: torch.Tensor) -> list[bytes]:
    """Each image's identity as an exact copy: its 8-bit pixels where it lies on the 8-bit grid
    (a gray digit as a gray, RGB or palette PNG, or as /v2 UINT8, decodes to the same pixels a
    float32 last bit apart), its exact float32 values otherwise (/v2 FP32 queries a fraction of
    a level apart are different queries to the model). The query monitor's exact-repeat digest
    and smoothing's per-image noise both use it: what the monitor takes for one image (a retry,
    never evidence) is answered from one noise, so a resend in another format draws nothing new."""
    return exact_rows(x.detach().to("cpu", torch.float32).reshape(x.shape[0], -1).numpy())


def image_seeds(key: bytes, x: torch.Tensor, asked: tuple[Any, ...]) -> list[int]:
    """One 63-bit seed per image of `x`: a keyed hash of its identity (exact_bytes: a resend of
    the same pixels in another lossless format is one image, never a fresh draw) and of `asked`,
    what the noise depends on besides the image (smoothing: sigma and f; Defense-GAN: its tag and
    projection settings). The same image gets the same noise whatever its batch company, position
    or how often it is sent; without the key the seeds cannot be predicted."""
    tail = repr(asked).encode()
    return [int.from_bytes(hashlib.blake2b(row + tail, key=key, digest_size=8).digest(), "big") >> 1
            for row in exact_bytes(x)]


def exact_rows(a: np.ndarray) -> list[bytes]:
    """exact_bytes of images already flattened to float32 rows (B, N)."""
    scaled = a * np.float32(255.0)
    eight = np.rint(scaled)
    grid = (np.abs(scaled - eight) <= 1e-3).all(axis=1) & (eight >= 0).all(axis=1) & (eight <= 255).all(axis=1)
    return [b"8" + e.astype(np.uint8).tobytes() if g else b"f" + row.tobytes() for e, row, g in zip(eight, a, grid)]


@dataclass
class RunContext:
    """What one pipeline run may use besides the batch: device, randomness, deadline."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    deadline: float | None = None  # time.monotonic() value
    cancelled: Callable[[], bool] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # per-request knobs (e.g. smoothing n)
    # what check() also runs between steps: GET /certify lets the batches queued behind it run
    # there (service/compute.py); None for batch runs
    between: Callable[[], None] | None = None
    # what a component computed that a later component of the same run reuses (Defense-GAN's
    # detector and purifier share one projection): it lives and dies with this run, so no
    # other request can ever read it
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    # a secret of the serving process: with it, smoothing's noise and Defense-GAN's restarts are
    # drawn per image from a keyed hash of it (image_seeds), not from `seed`, so a resent image
    # gets the same answer: retrying cannot shop for a certificate that holds only with
    # probability 1 - alpha per draw. None: `seed` (evaluation, tests)
    noise_key: bytes | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def generator(self) -> torch.Generator:
        """A generator seeded from `seed` on the run's device, so a run can be reproduced."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def check(self) -> None:
        """Long loops call this between steps; it raises once the work is no longer wanted."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("deadline exceeded")
        if self.cancelled is not None and self.cancelled():
            raise DeadlineExceeded("client disconnected")
        if self.between is not None:
            self.between()


def _trace_for_inference(module: torch.nn.Module, probe: torch.Tensor) -> Any:
    """TorchScript trace + `torch.jit.freeze` + `torch.jit.optimize_for_inference`."""
    with torch.no_grad():
        traced = torch.jit.trace(module, probe[:8], check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _probe(shape: tuple[int, ...], n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *shape), generator=g) + 0.5 * torch.randn((n, *shape), generator=g)


def _on_cpu(m: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))


def _compiled_if_equal(f: Classify, build: Callable[[torch.nn.Module], torch.nn.Module], shape: tuple[int, ...],
                       check: int, same: Callable[[torch.Tensor, Any], bool]) -> Any | None:
    """`build(f)` traced, frozen and optimised for inference on the CPU, if `same(f(probe),
    compiled(probe))` holds on `check` random noisy inputs; None for anything that is not a
    CPU nn.Module, cannot be traced, or differs."""
    if not isinstance(f, torch.nn.Module):
        return None
    try:
        if not _on_cpu(f):
            return None
        f.eval()
        probe = _probe(shape, check)
        fast = _trace_for_inference(build(f).eval(), probe)
        with torch.inference_mode():
            if not same(f(probe), fast(probe)):
                return None
    except Exception:  # noqa: BLE001 - an untraceable model is simply run as it is
        return None
    return fast


def _same_logits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-3, rtol=1e-3) and torch.equal(a.argmax(1), b.argmax(1))


def optimize_for_cpu(f: Classify, shape: tuple[int, ...], check: int = 64) -> Classify:
    """An inference-only copy of `f` for the CPU: TorchScript trace, `torch.jit.freeze` (weights
    become constants) and `torch.jit.optimize_for_inference` (oneDNN/MKL-DNN convolutions,
    folded ops). The same function up to float rounding: it is used only if its logits match
    f's (atol 1e-3) and its argmax agrees on `check` random noisy inputs; otherwise f itself is
    returned, as it is for anything that is not an nn.Module."""
    fast = _compiled_if_equal(f, lambda m: m, shape, check, _same_logits)
    return f if fast is None else fast


class ArgmaxHead(torch.nn.Module):
    """The default decision as one module: pixels -> (probabilities, confidence, label)."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.classifier(x).float(), dim=1)
        conf, labels = probs.max(dim=1)
        return probs, conf, labels


ArgmaxDecision = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def optimize_argmax_decision(f: Classify, shape: tuple[int, ...], check: int = 64) -> ArgmaxDecision | None:
    """The argmax decision over `f` (softmax, then the most probable class) compiled with the
    classifier into one TorchScript function (as `optimize_for_cpu` compiles the classifier).

    Why one function: a batch's decision then crosses from Python into torch once. Every torch
    call from the inference thread lets go of the GIL and must win it back from the event loop,
    which holds it for up to `sys.getswitchinterval()` at a time; the five calls of the eager
    decision (forward, float, softmax, max, zeros_like) cost several such waits per batch under
    load (docs/operations.md, "The serving hot path"). None if `f` cannot be traced or the result differs
    from the eager decision (probabilities within 1e-3, the same labels) on `check` random
    noisy inputs."""
    def same(logits: torch.Tensor, got: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
        want = torch.softmax(logits.float(), dim=1)
        probs, conf, labels = got
        return probs.shape == want.shape and torch.allclose(probs, want, atol=1e-3, rtol=1e-3) \
            and torch.equal(labels, want.argmax(1)) \
            and torch.allclose(conf, want.max(1).values, atol=1e-3, rtol=1e-3)

    return _compiled_if_equal(f, ArgmaxHead, shape, check, same)


@dataclass
class DefenseEnv:
    """What a defense's `build` gets: the loaded bundle, the base classifier, settings."""

    bundle: "Bundle"
    classifier: "Classifier"
    device: torch.device
    settings: Any = None
    # an inference-only copy of `classifier` (TorchScript-frozen on CPU) for no-gradient decisions,
    # or None: the pipelines then decide with `classifier` itself
    inference_classifier: Any = None
    # the argmax decision over the classifier as one TorchScript call (optimize_argmax_decision),
    # or None
    argmax_decision: Any = None


@dataclass
class Detection:
    """One detector's scores on a batch and the threshold it was calibrated to."""

    detector: str
    scores: torch.Tensor  # (B,)
    threshold: float

    @property
    def rejected(self) -> torch.Tensor:
        return self.scores > self.threshold


@dataclass
class Purified:
    x: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image numbers for the stage report


@dataclass
class Decision:
    labels: torch.Tensor                 # (B,) int64; -1 where abstained
    confidence: torch.Tensor             # (B,) float
    probabilities: torch.Tensor          # (B, K)
    abstained: torch.Tensor              # (B,) bool
    radius: torch.Tensor | None = None   # (B,) float, when the decider certifies
    details: dict[str, Any] = field(default_factory=dict)


class Component:
    """Base for every pipeline component: the defense it belongs to and its role."""

    role: ClassVar[str] = ""
    defense: str = ""

    def public_settings(self) -> dict[str, Any]:
        """Settings safe to show on GET /pipelines. Never a secret."""
        return {}


@runtime_checkable
class Detector(Protocol):
    role: ClassVar[str]  # "detector"
    defense: str

    def detect(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> list[Detection]: ...


@runtime_checkable
class Purifier(Protocol):
    role: ClassVar[str]  # "purifier"
    defense: str

    def purify(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Purified: ...


@runtime_checkable
class Adapter(Protocol):
    role: ClassVar[str]  # "adapter"
    defense: str

    def adapt(self, x: torch.Tensor, classifier: "Classifier", ctx: RunContext) -> Classify: ...


@runtime_checkable
class Decider(Protocol):
    role: ClassVar[str]  # "decider"
    defense: str
    certifies: bool

    def decide(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Decision: ...


class ArgmaxDecider(Component):
    """The default decision: the most probable class, never abstains, no certificate."""

    role = "decider"
    defense = "argmax"
    certifies = False

    def decide(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Decision:
        with torch.no_grad():
            probs = torch.softmax(classify(x).float(), dim=1)
        conf, labels = probs.max(dim=1)
        return Decision(labels=labels, confidence=conf, probabilities=probs,
                        abstained=torch.zeros_like(labels, dtype=torch.bool))
