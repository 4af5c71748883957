"""The bundle: a directory with `manifest.json` and `*.safetensors` weights.

Loading verifies the sha256 of every file the manifest names before any of it is used, and
never unpickles: weights come from safetensors, architectures from the manifest's spec. The
exceptions are code: a network built by Python (`import` architectures) and a user's
TorchScript network, loaded with `torch.jit.load`. A TorchScript program can do what the
service can (`torch.from_file` reads and writes any file it may), and a sha256 in the manifest
says only that the file is the one the manifest names, not who wrote either; so both are
loaded only where the operator trusts them (`trusted_imports`: the module, or
`torchscript:SHA256` for one TorchScript file), and refused before anything is imported or
deserialised otherwise.

Manifest layout (format 1):
  format_version, name, version (derived from the artifact hashes), dataset, input
  {shape, value_range, mean, std, class_names}, artifacts {name: {file, sha256,
  architecture, training, metrics}}, defenses {name: {...calibration, settings...}},
  metrics {...}, build {command, seed, preset, steps[...]}.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from models.architectures import build_architecture, import_trusted
from models.features import FeatureError, FeatureExtractor

# The manifest's format. 2 (this release on): the version also covers the input section and the
# artifacts' build records (content_version). 1 is read as it was written; a bundle of format 1
# becomes format 2 the next time a step saves it, and a release that reads only 1 then says the
# bundle is newer instead of calling it hand-edited.
FORMAT_VERSION = 2
READS_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
# The largest manifest.json `Bundle.load` reads. Real ones are tens of kB (models/default's:
# ~40 kB; the build log, metrics and calibration are all small), so 4 MB is ~100x headroom,
# while a multi-GB file named manifest.json cannot make the loader read it into memory and
# parse it (JSON parsing costs several times the file's size in Python objects).
MAX_MANIFEST_BYTES = 4 * 2**20
# The largest input a bundle may declare, C*H*W values per image: 4096x4096 RGBA. Every request
# is decoded and resized to this shape before anything else runs, and the defenses allocate
# batches of it, so an absurd shape in a manifest (say 1x10^7x10^7) must be refused at load,
# not discovered as an allocation failure at the first request.
MAX_INPUT_VALUES = 4096 * 4096 * 4
# An artifact is read whole into memory to be hashed and used: a bound on it, checked on the
# file's size before a byte is read (an 8 GiB file ended in MemoryError, or the OOM killer).
# The default bundle's largest is ~10 MB; a brought network of a few hundred MB fits easily.
MAX_ARTIFACT_BYTES = 2 * 2**30


# What a bundle's version covers, by its format_version. 1: its artifacts' hashes and its
# defenses' sections. 2: also the input section (shape, value range, normalisation, class names)
# and each artifact's record of how it is built and read (architecture, feature layer,
# preprocess), which decide what a request gets as much as the weights do: hand-edited, they were
# served under the old model_version (and GET /certify's cached certificates, keyed by it, with them).
_BUILD_FIELDS = ("architecture", "feature_layer", "format", "file", "preprocess")


def content_version(manifest: dict[str, Any]) -> str:
    """A bundle's version: the first 12 hex digits of the sha256 of what its format covers (see
    _BUILD_FIELDS), so that a change to any of it is a new version. Written by `save`, checked by
    `load`."""
    artifacts = manifest.get("artifacts", {})
    hashes = sorted(f"{k}:{v['sha256']}" for k, v in artifacts.items())
    defenses = json.dumps(manifest.get("defenses", {}), sort_keys=True)
    fmt = manifest.get("format_version")
    if fmt == 1:
        return sha256_bytes(("\n".join(hashes) + defenses).encode())[:12]
    if fmt != 2:
        raise ValueError(f"bundle format {fmt!r} is not one this shieldserve reads {READS_FORMATS}")
    built = {k: {f: v.get(f) for f in _BUILD_FIELDS if f in v} for k, v in artifacts.items()}
    covered = json.dumps({"input": manifest.get("input"), "artifacts": built}, sort_keys=True)
    return sha256_bytes(("\n".join(hashes) + defenses + covered).encode())[:12]


def takes_bundle_input(name: str, record: dict[str, Any]) -> bool:
    """Whether an artifact's network takes the bundle's input conversion (`input`: the value
    range, mean and std of a classifier the user brought) or [0, 1] pixels as they are. The
    record's `preprocess` says so ("bundle" or "none"); a record without it (saved before it
    existed) is read as every recipe wrote it: the networks shieldserve trains (the built-in
    classifier, smoothing's noise classifiers, `robust_classifier`, Defense-GAN's) on pixels,
    Neural Fingerprinting's through the conversion, a network the user brought (import:,
    TorchScript) through it. Served through a conversion it never saw, a user's --mean/--std
    cost the robust network 8 points of clean accuracy and 20 under PGD."""
    preprocess = record.get("preprocess")
    if preprocess is not None:
        if preprocess not in ("bundle", "none"):
            raise BundleError(f"artifact {name!r}: preprocess must be 'bundle' or 'none', got {preprocess!r}")
        return preprocess == "bundle"
    kind = (record.get("architecture") or {}).get("kind")
    return kind != "builtin" or name == "neuralfp_classifier"


def served_differently(manifest: dict[str, Any]) -> bool:
    """A format-1 bundle with an input conversion (value range, mean, std) and a network that
    takes pixels (`takes_bundle_input`): served through the conversion before this release."""
    if manifest.get("format_version") != 1 or not manifest.get("input"):
        return False
    spec = InputSpec.from_json(manifest["input"])
    return spec != spec.pixels() and any(not takes_bundle_input(name, record) for name, record in manifest.get("artifacts", {}).items()
                            if isinstance(record, dict) and record.get("architecture"))


class BundleError(RuntimeError):
    """A bundle that cannot be used: missing file, wrong hash, unknown format."""


class UntrustedImport(BundleError):
    """The bundle names code (an `import` architecture, a TorchScript file) that the operator
    has not trusted."""


TORCHSCRIPT_TRUST = "torchscript:"  # a `trusted_imports` entry for one TorchScript file: + its sha256


def torchscript_trust(sha256: str) -> str:
    """The `trusted_imports` entry that trusts the TorchScript file of this sha256."""
    return TORCHSCRIPT_TRUST + sha256


def is_torchscript(record: Any) -> bool:
    """Would loading this artifact record hand its bytes to torch.jit.load (either label says
    TorchScript: Bundle.module refuses the two disagreeing before loading)?"""
    if not isinstance(record, dict):
        return False
    arch = record.get("architecture")
    return record.get("format") == "torchscript" or (isinstance(arch, dict) and arch.get("kind") == "torchscript")


def _untrusted(manifest: dict[str, Any], trusted: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({artifact: factory} of untrusted `import` architectures, {artifact: sha256} of untrusted
    TorchScript artifacts)."""
    trusted = tuple(trusted)
    untrusted, scripts = {}, {}
    entries = {str(e).strip().lower() for e in trusted}
    artifacts = manifest.get("artifacts")
    for name, record in (artifacts.items() if isinstance(artifacts, dict) else ()):
        arch = record.get("architecture") if isinstance(record, dict) else None
        if is_torchscript(record):
            if torchscript_trust(str(record.get("sha256", "")).lower()) not in entries:
                scripts[name] = str(record.get("sha256", ""))
        elif isinstance(arch, dict) and arch.get("kind") == "import":
            factory = str(arch.get("factory", ""))
            if not import_trusted(factory, trusted):
                untrusted[name] = factory
    return untrusted, scripts


def trust_needed(manifest: dict[str, Any], trusted: Iterable[str] = ()) -> list[str]:
    """The `trusted_imports` entries loading this bundle needs beyond `trusted`: the modules of
    its `import` architectures, `torchscript:SHA256` for each TorchScript artifact."""
    untrusted, scripts = _untrusted(manifest, trusted)
    return sorted({f.partition(":")[0] for f in untrusted.values()}) + sorted(
        {torchscript_trust(h) for h in scripts.values()})


def require_trusted(manifest: dict[str, Any], trusted: tuple[str, ...], where: Any) -> None:
    """Raise UntrustedImport where an `import` architecture of `manifest` names code that
    `trusted` does not cover (models.architectures.import_trusted), or where a TorchScript
    artifact's sha256 is not trusted by a `torchscript:SHA256` entry."""
    untrusted, scripts = _untrusted(manifest, trusted)
    if not untrusted and not scripts:
        return
    needed = trust_needed(manifest, trusted)
    what = []
    if untrusted:
        what.append("networks built by Python code (" + ", ".join(f"{a!r} by {f!r}" for a, f in sorted(untrusted.items()))
                    + "), which loading the bundle would import and run")
    if scripts:
        what.append("TorchScript programs (" + ", ".join(repr(a) for a in sorted(scripts))
                    + "), which loading the bundle would run with the service's rights (TorchScript can read "
                      "and write files)")
    raise UntrustedImport(
        f"{where}: {'; and '.join(what)}. Load it only if you trust whoever wrote the bundle, and then name "
        f"the code: `trusted_imports: [{', '.join(needed)}]` in the service's config (or SHIELDSERVE_TRUSTED_IMPORTS="
        f"'{json.dumps(needed)}'), or `--trust-import {' --trust-import '.join(needed)}` for `shieldserve train`")


def is_unfinished(manifest: Any) -> bool:
    """Whether a manifest is one of a build that has not finished (`build.complete` false,
    written by a new build's first save and set true by its last: models.train). A manifest
    without the key (saved before it existed, or not a dict) is a finished one."""
    build = manifest.get("build") if isinstance(manifest, dict) else None
    return isinstance(build, dict) and build.get("complete") is False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """What the classifier takes: the decoder converts every upload to this."""

    shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    # The network's input range: pixels in [0, 1] are mapped to [lo, hi] and then
    # normalised with mean/std, inside the Classifier wrapper. Defenses always see [0, 1].
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # the Classifier wrapper views them as (1, C, 1, 1): another length failed at the first
        # forward pass, in torch's words, after the bundle had been written
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values and len(values) != self.shape[0]:
                raise ValueError(f"input {name} has {len(values)} value(s) for {self.shape[0]} channel(s): give "
                                 f"one per channel (--{name} " + ",".join(["V"] * self.shape[0]) + ")")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def pixels(self) -> "InputSpec":
        """This input without a conversion: [0, 1] pixels, as the networks shieldserve trains take."""
        return InputSpec(shape=self.shape, class_names=self.class_names)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "class_names": list(self.class_names),
                               "value_range": list(self.value_range)}
        if self.mean is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std or ())
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InputSpec":
        if not isinstance(d, dict):
            raise BundleError(f"manifest's input must be an object, got {type(d).__name__}")
        try:
            return cls._from_json(d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BundleError(f"manifest's input is malformed: {what}") from exc

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> "InputSpec":
        if not isinstance(d["shape"], list) or not all(type(v) is int for v in d["shape"]):
            # int(28.9) would be 28: a shape is whole numbers or refused
            raise ValueError(f"input shape must be three integers (C, H, W), got {d['shape']!r}")
        shape = tuple(d["shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise BundleError(f"input shape must be (C, H, W), got {shape}")
        if shape[0] * shape[1] * shape[2] > MAX_INPUT_VALUES:
            raise BundleError(f"input shape {shape} has {shape[0] * shape[1] * shape[2]} values per image; "
                              f"shieldserve serves at most {MAX_INPUT_VALUES} (4096x4096x4)")
        names = d["class_names"]
        if not isinstance(names, list) or len(names) < 2:
            raise ValueError(f"input class_names must list at least 2 classes, got {names!r:.80}")
        value_range = _finite_numbers("value_range", d.get("value_range", [0.0, 1.0]))
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"input value_range must be [lo, hi] with lo < hi, got {list(value_range)}")
        mean = _finite_numbers("mean", d["mean"]) if d.get("mean") is not None else None
        std = _finite_numbers("std", d["std"]) if d.get("std") is not None else None
        if std is not None and min(std, default=1.0) <= 0:
            # a zero std divides every pixel by zero: inf/NaN logits, a label for every input
            raise ValueError(f"input std must be positive, got {list(std)}")
        return cls(shape=shape, class_names=tuple(str(c) for c in names),  # type: ignore[arg-type]
                   value_range=value_range, mean=mean, std=std)  # type: ignore[arg-type]


def finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite: what a manifest's numbers must be (a NaN or
    infinite threshold or rate silently turns a detector off)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _finite_numbers(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or not all(finite_number(v) for v in values):
        raise ValueError(f"input {name} must be a list of finite numbers, got {values!r:.80}")
    return tuple(float(v) for v in values)


class Classifier(nn.Module):
    """A network plus the input conversion the manifest describes.

    Takes pixels in [0, 1] with shape (B, C, H, W) and returns logits (B, K). `features`
    returns the penultimate activations: the network's own `features` method, or the layer
    models.features finds (the input of the last Linear, or `feature_layer`'s output).
    """

    def __init__(self, network: nn.Module, spec: InputSpec, feature_layer: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        self.feature_layer = feature_layer
        self._extractor: FeatureExtractor | None = None
        lo, hi = spec.value_range
        self.scale, self.offset = float(hi - lo), float(lo)
        c = spec.channels
        mean = torch.tensor(spec.mean if spec.mean else [0.0] * c).view(1, c, 1, 1)
        std = torch.tensor(spec.std if spec.std else [1.0] * c).view(1, c, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self._identity = (self.scale == 1.0 and self.offset == 0.0
                          and spec.mean is None and spec.std is None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self._identity:
            return x
        return ((x * self.scale + self.offset) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.prepare(x))

    def feature_extractor(self) -> FeatureExtractor:
        """How `features` is computed (found on first use; raises FeatureError if it cannot be).
        A method, not a property: torch.jit.trace probes the module's attributes with hasattr,
        which lets only AttributeError through, so a property raising FeatureError (a TorchScript
        network that is no chain of its submodules) broke every trace of the classifier: the
        service's inference copy and `shieldserve export`."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.network, self.spec.shape, self.feature_layer)
        return self._extractor

    def has_features(self) -> bool:
        try:
            self.feature_extractor()
        except FeatureError:
            return False
        return True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor()(self.prepare(x))


# defenses whose artifacts and calibration `shieldserve train` writes into a bundle section
TRAINED_DEFENSES = ("magnet", "neuralfp", "squeeze", "defensegan", "rmc", "smoothing", "robust")


# the noise level the gate measures each smoothing variant at under its plain key (what the
# packaged configuration serves): plain smoothing at 0.5, denoised smoothing at 0.25
GATED_SIGMA = {"smoothing": 0.5, "smoothing:denoised": 0.25}
# the defense keys that only detect (they change no image and decide nothing): a pipeline of
# them before one last defense answers wrongly only where one of them rejects or the last alone
# answers wrongly
DETECTOR_KEYS = frozenset({"magnet", "squeeze"})


def defense_key(entry: Any) -> str:
    """The quality gate's key for one entry of a pipeline config: its defense's name, and
    `smoothing:denoised` for denoised smoothing (the plain classifier behind a denoiser),
    `magnet:reformer` for MagNet with its reformer (`magnet` alone: its detectors). Smoothing
    at a noise level other than the one its plain key is measured at (GATED_SIGMA) is a key of
    its own, `smoothing@0.25` or `smoothing:denoised@0.5`: each sigma has its own network, and
    one verdict says nothing of another's (the build's default sigma, when a config gives
    none, is 0.25)."""
    if isinstance(entry, str):
        return "magnet:reformer" if entry == "magnet" else entry
    name = str(entry.get("defense", "")) if isinstance(entry, dict) else ""
    if name == "smoothing":
        key = "smoothing:denoised" if entry.get("denoiser") else "smoothing"
        try:
            sigma = float(entry.get("sigma", 0.25))
        except (TypeError, ValueError):
            return key  # the pipeline's build refuses it, with its own message
        if sigma == GATED_SIGMA[key]:
            return key
        short = f"{sigma:g}"  # 0.25, not 0.25000000000000000 (repr where :g would round)
        return f"{key}@{short if float(short) == sigma else repr(sigma)}"
    if name == "magnet" and entry.get("reform", True) is not False:
        return "magnet:reformer"
    return name


def defense_name(key: str) -> str:
    """The defense (the manifest section) a gate key belongs to: `smoothing:denoised@0.5` -> smoothing."""
    return key.partition(":")[0].partition("@")[0]


def canonical_defenses(entries: Any) -> str:
    """A pipeline's defense list as one comparable string (a bare name is {"defense": name})."""
    return json.dumps([{"defense": e} if isinstance(e, str) else e for e in entries or []], sort_keys=True)


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    size = manifest_path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} "
                          f"(real ones are tens of kB)")
    with manifest_path.open("rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BundleError(f"{manifest_path}: not valid JSON ({problem})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: must be a JSON object, got {type(manifest).__name__}")
    return manifest


def _check_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """The structure `Bundle` relies on: an `input` section and well-formed artifact records."""
    if "input" not in manifest:
        raise BundleError(f"{manifest_path}: no 'input' section")
    try:
        InputSpec.from_json(manifest["input"])
    except BundleError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    for section in ("artifacts", "defenses"):
        if not isinstance(manifest.get(section, {}), dict):
            raise BundleError(f"{manifest_path}: {section!r} must be an object")
    for name, record in manifest.get("artifacts", {}).items():
        where = f"{manifest_path}: artifact {name!r}"
        if not isinstance(record, dict):
            raise BundleError(f"{where} must be an object")
        for key in ("file", "sha256"):
            if not isinstance(record.get(key), str):
                raise BundleError(f"{where} has no {key!r} (a string)")
        size = record.get("bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise BundleError(f"{where}: 'bytes' must be a non-negative integer, got {size!r}")
        if not isinstance(record.get("architecture", {}), dict):
            raise BundleError(f"{where}: 'architecture' must be an object")


def _check_shapes(name: str, arch: dict[str, Any], state: dict[str, torch.Tensor],
                  trusted_imports: tuple[str, ...]) -> None:
    """Build the architecture on the meta device (no memory) and compare its parameters' and
    buffers' shapes with the weights file's, so that a spec whose sizes are out of proportion
    to its (hash-checked, size-bounded) weights is refused before anything is allocated."""
    try:
        with torch.device("meta"):
            meta = build_architecture(arch, trusted_imports)
    except (KeyError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise BundleError(f"artifact {name!r}: cannot build its architecture: {exc}") from exc
    expected = meta.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise BundleError(f"artifact {name!r}: weights do not fit its architecture "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(state[k].shape)}"
             for k, v in expected.items() if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        raise BundleError(f"artifact {name!r}: its architecture's shapes differ from its weights' "
                          f"({'; '.join(wrong[:3])})")
    extra = sum(b.numel() for n, b in meta.named_buffers() if n not in expected)
    if extra > sum(t.numel() for t in state.values()) + MAX_INPUT_VALUES:
        raise BundleError(f"artifact {name!r}: its architecture allocates {extra} values outside its weights")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    _verified: dict[str, bytes] = field(default_factory=dict, repr=False)
    # the modules whose code this bundle's `import` architectures may run (checked at load)
    trusted_imports: tuple[str, ...] = ()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True, trusted_imports: Iterable[str] = ()) -> "Bundle":
        """Read the manifest and (by default) check every artifact's sha256 up front.

        A network described as `{"kind": "import", "factory": "pkg.module:fn"}` is built by
        importing and calling that code, with the service's rights: such a bundle is refused
        (UntrustedImport) unless `trusted_imports` covers the module (models.architectures.
        import_trusted), because a sha256 in the manifest only says the files are the ones the
        manifest names, not who wrote it. A TorchScript artifact is a program too: refused
        unless `trusted_imports` holds `torchscript:` + its sha256."""
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{root}: no {MANIFEST_NAME}; build a bundle with `shieldserve train --out {root}`")
        manifest = _read_manifest(manifest_path)
        if "format_version" not in manifest:
            raise BundleError(f"{root}: its {MANIFEST_NAME} has no format_version: not a manifest `shieldserve train` "
                              f"wrote (this shieldserve reads formats {', '.join(map(str, READS_FORMATS))})")
        if manifest.get("format_version") not in READS_FORMATS:
            raise BundleError(f"{root}: bundle format {manifest.get('format_version')!r}, "
                              f"this shieldserve reads {', '.join(map(str, READS_FORMATS))} (a newer release saved it?)")
        _check_manifest(manifest_path, manifest)
        trusted = tuple(trusted_imports)
        require_trusted(manifest, trusted, root)
        bundle = cls(root, manifest, trusted_imports=trusted)
        if verify:
            for name in manifest.get("artifacts", {}):
                bundle._read_verified(name)
        try:
            content = content_version(manifest)
        except (AttributeError, RecursionError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest_path}: malformed ({type(exc).__name__}: {exc})") from exc
        stated = manifest.get("version")
        if stated != content:
            # the version names what answers (responses' model_version, GET /certify's cache
            # key): a threshold edited by hand would be served under the old name
            covers = ("artifacts and defenses" if manifest.get("format_version") == 1 else
                      "artifacts, defenses, input section and artifacts' architecture records")
            raise BundleError(f"{manifest_path}: its version is {stated!r}, but its {covers} "
                              f"give {content!r}: the manifest was changed after shieldserve saved it. Undo the "
                              f"change, or, if it is meant, set \"version\" to {content!r}")
        if served_differently(manifest):
            logging.getLogger("shieldserve").warning(
                "%s: saved by an earlier release, which served its networks trained on [0, 1] pixels (robust, "
                "smoothing's, the built-in classifier) through the input conversion its input section describes; "
                "they take pixels now, so its answers carry model_version %s instead of %s (`shieldserve train "
                "--steps ...` on it saves it in the current format)", root, bundle.version, stated)
        return bundle

    def require_finished(self) -> None:
        """Raise BundleError if this bundle's build has not finished (`build.complete` false,
        models.train): a build interrupted after its classifier step left a bundle that loads
        and would be served without the defenses of the steps it never reached (the default
        pipeline falling back to `baseline`). Not part of `load`: the build itself loads the
        unfinished bundle between its steps."""
        if not is_unfinished(self.manifest):
            return
        build = self.manifest["build"]
        pending = [str(s) for s in build.get("pending_steps") or []]
        steps = ",".join(pending) or "STEPS"
        trust = "".join(f" --trust-import {t}" for t in trust_needed(self.manifest))
        given = build.get("options")
        # the build's --options for the steps still to run (and the gate's): without them the
        # rest was built with the preset's settings
        wanted = {k: v for k, v in given.items() if k in pending or k == "quality"} if isinstance(given, dict) else {}
        options = f" --options {shlex.quote(json.dumps(wanted))}" if wanted else ""
        raise BundleError(f"{self.path}: its build has not finished (the steps {steps} did not run): run its "
                          f"command again ({str(build.get('command', 'shieldserve train ...'))[:300]}), or "
                          f"`shieldserve train --out {self.path} --steps {steps}{options}{trust}`")

    def read_verified(self, name: str) -> bytes:
        """An artifact's bytes, after its sha256 has been checked."""
        return self._read_verified(name)

    def _read_verified(self, name: str) -> bytes:
        if name in self._verified:
            return self._verified[name]
        record = self.artifact(name)
        file = (self.path / record["file"]).resolve()
        if self.path.resolve() not in file.parents:
            raise BundleError(f"artifact {name!r}: file {record['file']!r} is outside the bundle")
        if not file.is_file():
            raise BundleError(f"artifact {name!r}: {file} is missing")
        # the manifest's `bytes` (written by BundleWriter) is checked before anything is read,
        # and the read is bounded by it: a swapped or grown file is not read into memory whole
        expected = record.get("bytes")
        size = file.stat().st_size
        if size > MAX_ARTIFACT_BYTES:
            raise BundleError(f"artifact {name!r}: {record['file']} is {size} bytes, more than the "
                              f"{MAX_ARTIFACT_BYTES} shieldserve reads; refusing to load it")
        if expected is not None and size != expected:
            raise BundleError(f"artifact {name!r}: {record['file']} is {size} bytes, "
                              f"the manifest says {expected}; refusing to load it")
        with file.open("rb") as fh:
            data = fh.read() if expected is None else fh.read(expected + 1)
        if expected is not None and len(data) != expected:
            raise BundleError(f"artifact {name!r}: {record['file']} changed size while it was read")
        digest = sha256_bytes(data)
        if digest != record["sha256"]:
            raise BundleError(f"artifact {name!r}: sha256 of {record['file']} is {digest}, "
                              f"the manifest says {record['sha256']}; refusing to load it")
        self._verified[name] = data
        return data

    # ----------------------------------------------------------------- access
    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_json(self.manifest["input"])

    @cached_property  # read for every answer; the manifest a Bundle holds does not change
    def version(self) -> str:
        """The model_version of its answers: the manifest's `version`, except for a format-1
        bundle whose networks trained on pixels were served through its input conversion by the
        releases that saved it (`served_differently`): they answer differently now, so under
        another name (a certificate cached under the old one is not served for the new)."""
        stated = str(self.manifest.get("version", "unversioned"))
        if served_differently(self.manifest):
            return sha256_bytes(f"{stated}:preprocess".encode())[:12]
        return stated

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    def has(self, artifact: str) -> bool:
        return artifact in self.manifest.get("artifacts", {})

    def artifact(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["artifacts"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no artifact {name!r}; "
                              f"it has {sorted(self.manifest.get('artifacts', {}))}") from None

    def defense(self, name: str) -> dict[str, Any]:
        """The manifest's section for one defense (calibration thresholds, settings)."""
        try:
            return self.manifest["defenses"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no section for defense {name!r}; "
                              f"rebuild it with `shieldserve train`") from None

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        data = self._read_verified(name)
        if self.artifact(name).get("format", "safetensors") != "safetensors":
            raise BundleError(f"artifact {name!r} is not a safetensors file")
        return {k: v.to(device) for k, v in load_safetensors_bytes(data).items()}

    def module(self, name: str, device: str | torch.device = "cpu") -> nn.Module:
        """Build a network from its architecture spec and load its verified weights (eval mode)."""
        record = self.artifact(name)
        arch = record.get("architecture")
        if arch is None:
            raise BundleError(f"artifact {name!r} has no architecture")
        if arch.get("kind") == "torchscript" or record.get("format") == "torchscript":
            # only a file written as TorchScript is handed to torch.jit.load: a safetensors
            # artifact relabelled `kind: torchscript` (or the reverse) is refused
            if arch.get("kind") != "torchscript" or record.get("format") != "torchscript":
                raise BundleError(f"artifact {name!r}: architecture kind {arch.get('kind')!r} with format "
                                  f"{record.get('format')!r}; a TorchScript artifact needs both 'torchscript'")
            import io
            net = torch.jit.load(io.BytesIO(self._read_verified(name)), map_location=device)
        else:
            state = self.tensors(name)
            _check_shapes(name, arch, state, self.trusted_imports)
            try:
                net = build_architecture(arch, self.trusted_imports)
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"artifact {name!r}: cannot build its architecture: {exc}") from exc
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BundleError(f"artifact {name!r}: weights do not fit its architecture "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            net = net.to(device)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def classifier(self, device: str | torch.device = "cpu", artifact: str = "classifier") -> Classifier:
        """An artifact's network behind its input conversion: the bundle's (`input`: value range,
        mean, std) for a network that takes it, [0, 1] pixels as they are for one trained on them
        (`takes_bundle_input`)."""
        record = self.artifact(artifact)
        spec = self.input_spec if takes_bundle_input(artifact, record) else self.input_spec.pixels()
        clf = Classifier(self.module(artifact, device), spec, record.get("feature_layer")).to(device).eval()
        # one forward pass now: a network of another class count than the manifest names was
        # served (labels without a name, /v2 declaring K probabilities while it gave others) or
        # failed only inside a defense, in torch's words
        try:
            with torch.no_grad():
                out = clf(torch.zeros(2, *spec.shape, device=device))
        except Exception as exc:  # noqa: BLE001 - any failure of the network on its declared input
            raise BundleError(f"artifact {artifact!r}: fails on an input of the manifest's shape "
                              f"{list(spec.shape)}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BundleError(f"artifact {artifact!r}: gives {got} for 2 images, not logits of the manifest's "
                              f"{spec.num_classes} classes ([2, {spec.num_classes}])")
        return clf

    def quality(self, defense: str) -> dict[str, Any] | None:
        """The quality gate's verdict on a defense (models.quality), None if it was not measured."""
        return self.manifest.get("quality", {}).get("defenses", {}).get(defense)

    def unusable(self, defense: str) -> str | None:
        """Why a defense (a `defense_key`) must not be served on this bundle, or None: the
        bundle has no section for a defense that needs one, the quality gate found it ruins
        clean accuracy or could not build it, or the gate enforces its verdicts on this bundle
        and has none for it."""
        name = defense_name(defense)
        if name in TRAINED_DEFENSES and name not in self.manifest.get("defenses", {}):
            q = self.quality(defense)
            if q is not None and q.get("reason"):
                return str(q["reason"])
            return f"the bundle has no {name!r} section (build it with `shieldserve train --steps {name}`)"
        q = self.quality(defense)
        if q is None and name in TRAINED_DEFENSES and self.manifest.get("quality", {}).get("enforce"):
            # a bundle whose gate enforces its verdicts, but not on this defense (built before
            # the gate, or a step added without it): unmeasured is not served
            return (f"the quality gate has not measured {defense!r} on this bundle: measure it with "
                    f"`shieldserve train --out BUNDLE --steps quality`")
        if q is not None and not q.get("usable", True):
            return str(q.get("reason", "marked unusable by the quality gate"))
        return None

    def composition_refusal(self, entries: Any, digest: str | None = None,
                            here: Callable[[list[Any]], str | None] | None = None) -> str | None:
        """Why a pipeline of these defenses (built with `settings_digest` `digest`) is not served
        as a whole on this bundle, or None: `composition` found it unusable. The service, `shieldserve
        evaluate` and `shieldserve export` all leave such a pipeline out."""
        together = self.composition(entries, digest, here)
        if together is not None and not together.get("usable", True):
            return str(together.get("reason", "marked unusable by the quality gate"))
        return None

    def composition(self, entries: Any, digest: str | None = None,
                    here: Callable[[list[Any]], str | None] | None = None) -> dict[str, Any] | None:
        """The quality gate's verdict on a pipeline that composes two or more trained defenses,
        or has one with other settings than the gate measured it with (`_own_settings`); None
        where its one defense's verdict is the pipeline's, or a part has no verdict (`unusable`
        speaks for that part). Two parts that each pass can fail together: MagNet's rejections
        and smoothing's abstentions fall on different images.

        Measured where the gate ran the same pipeline (`quality.pipelines`: the packaged
        configuration's compositions, and those of the `--config` given to `shieldserve train`),
        matched by `digest`, the built pipeline's `settings_digest` (its defenses' settings as
        built, whatever way the config wrote them); a record written before digests, by its
        defense list. Else bounded where that is sound: every part but the last only detects
        (DETECTOR_KEYS: it changes no image and decides nothing), so the pipeline answers wrongly
        only where a detector rejects or the last part alone answers wrongly, and its accuracy
        drop is at most the detectors' rejection rates plus the last part's drop (for a
        randomized last part, smoothing, up to its sampling noise). Any other part before the
        last (a reformer, a projection, an adapter) bounds nothing: unmeasured.

        Returns {"passes": True | False | None, "usable": bool, "how": "measured" | "bound" |
        "unmeasured", "accuracy_drop" or "accuracy_drop_bound", "reason"}."""
        entries = list(entries or [])
        keys = [defense_key(e) for e in entries]
        trained = [k for k in keys if defense_name(k) in TRAINED_DEFENSES]
        if len(trained) == 1:
            return self._own_settings(trained[0], digest, here)
        if len(trained) < 2:
            return None
        gate = self.manifest.get("quality", {})
        enforce = bool(gate.get("enforce"))
        allowed = float(gate.get("max_accuracy_drop", 0.02))
        fix = "measure it with `shieldserve train --out BUNDLE --steps quality --config YOUR_CONFIG.yaml`"
        want = canonical_defenses(entries)
        measured = self._measured(lambda rec: rec.get("settings_digest") == digest if rec.get("settings_digest")
                                  and digest else canonical_defenses(rec.get("defenses")) == want)
        if measured is not None:
            return measured
        parts = [self.quality(k) for k in keys]
        if any(q is None for q in parts):
            return None
        if len(keys) != len(trained) or not all(k in DETECTOR_KEYS for k in keys[:-1]):
            return {"passes": None, "usable": not enforce, "how": "unmeasured",
                    "reason": f"the quality gate has not measured the composition {' + '.join(keys)} on this bundle "
                              f"(a part before the last is not a pure detector, so its parts' verdicts bound "
                              f"nothing): {fix}"}
        rejections = [q.get("rejection_rate") for q in parts[:-1]]
        last = parts[-1].get("accuracy_drop")
        if any(not isinstance(v, (int, float)) for v in (*rejections, last)):
            return None
        bound = sum(float(v) for v in rejections) + float(last)
        passes = bound <= allowed + 1e-9
        why = (f"the composition {' + '.join(keys)} drops at most {bound:.4f} of clean validation accuracy "
               f"({', '.join(k for k in keys[:-1])} reject {', '.join(f'{float(v):.4f}' for v in rejections)}; "
               f"{keys[-1]} alone drops {float(last):.4f})")
        return {"passes": passes, "usable": passes or not enforce, "how": "bound", "accuracy_drop_bound": round(bound, 4),
                "reason": f"{why}, within the {allowed:.2f} allowed" if passes else
                          f"{why}, more than the {allowed:.2f} allowed, and the gate has not measured it: {fix}"}

    def _measured(self, same: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The gate's record of a pipeline measured whole (`quality.pipelines`) for which `same`
        holds, not stale (a step it used was rebuilt since), with how it was found; else None."""
        for name, rec in (self.manifest.get("quality", {}).get("pipelines") or {}).items():
            if isinstance(rec, dict) and not rec.get("stale") and same(rec):
                return {**rec, "how": "measured", "measured_as": name}
        return None

    def _own_settings(self, key: str, digest: str | None,
                      here: Callable[[list[Any]], str | None] | None) -> dict[str, Any] | None:
        """The verdict on a pipeline whose one trained defense is `key`, built with `settings_digest`
        `digest`: None where that defense's verdict is the pipeline's. The gate measures each
        defense with the packaged settings (models.recipes.quality.GATED) and records that
        pipeline's digest in the verdict; a config that gives the defense other settings
        (Defense-GAN projecting 2 steps from a random start, RMC's or smoothing's options,
        another certify budget) serves another pipeline, and that verdict says nothing of it
        (such a Defense-GAN answered 7 of 40 digits, served as "passed"). Judged by the gate's
        measurement of it (`quality.pipelines`, matched by digest: `shieldserve train --steps
        quality --config`), else unmeasured: not served where the gate enforces.

        The same settings on another machine are the same pipeline: where `here`
        (service.runtime.gated_digests) gives the verdict's pipeline, built on this machine with
        the packaged settings, this digest, what differs is the machine (smoothing's bfloat16,
        RMC's parallel images on a GPU), as it always could; without `here`, unmeasured. A verdict
        without a digest (a bundle gated before it was recorded) is the pipeline's, as before."""
        q = self.quality(key)
        measured = q.get("settings_digest") if isinstance(q, dict) else None
        if not measured or not digest or digest == measured:
            return None
        gate = self.manifest.get("quality", {})
        whole = self._measured(lambda rec: rec.get("settings_digest") == digest)
        if whole is not None:
            return whole
        as_gated = q.get("pipeline") if isinstance(q, dict) else None
        if here is not None and isinstance(as_gated, list) and here(as_gated) == digest:
            return None
        return {"passes": None, "usable": not gate.get("enforce"), "how": "unmeasured",
                "reason": f"the quality gate measured {key} with other settings ({canonical_defenses(as_gated or [])}, "
                          f"settings digest {measured}) than this pipeline's (settings digest {digest}), and has "
                          f"not measured this one on this bundle: measure it with `shieldserve train --out BUNDLE "
                          f"--steps quality --config YOUR_CONFIG.yaml` (with the SHIELDSERVE_* variables it is "
                          f"served with)"}


class BundleWriter:
    """Builds or extends a bundle directory; `save()` writes the manifest last."""

    def __init__(self, path: str | Path, manifest: dict[str, Any] | None = None,
                 trusted_imports: Iterable[str] = ()) -> None:
        self.path = Path(path)
        # what Bundle.load may import while the bundle is built (models.train: --trust-import and
        # the module --classifier import: names)
        self.trusted_imports = tuple(trusted_imports)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = manifest or {}
        self.manifest.setdefault("format_version", FORMAT_VERSION)
        self.manifest.setdefault("name", self.path.name)
        self.manifest.setdefault("artifacts", {})
        self.manifest.setdefault("defenses", {})
        self.manifest.setdefault("metrics", {})
        self.manifest.setdefault("build", {"steps": []})

    @classmethod
    def extend(cls, path: str | Path, trusted_imports: Iterable[str] = (),
               unverified: Iterable[str] = ()) -> "BundleWriter":
        """A writer over the bundle at `path`, every artifact's sha256 checked but those in
        `unverified`: the ones the caller is about to write again (a step killed while writing
        them left files its manifest's hashes do not match)."""
        bundle = Bundle.load(path, verify=False, trusted_imports=trusted_imports)
        skip = set(unverified)
        for name in bundle.manifest.get("artifacts", {}):
            if name not in skip:
                bundle.read_verified(name)
        return cls(path, bundle.manifest, trusted_imports)

    def load(self) -> "Bundle":
        """The bundle as saved so far, its imports trusted as this writer's."""
        return Bundle.load(self.path, trusted_imports=self.trusted_imports)

    def set_input(self, spec: InputSpec) -> None:
        self.manifest["input"] = spec.to_json()

    def add_tensors(self, name: str, tensors: dict[str, torch.Tensor], **meta: Any) -> dict[str, Any]:
        data = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        return self.add_file(name, f"{name}.safetensors", data, format="safetensors", **meta)

    def add_module(self, name: str, module: nn.Module, architecture: dict[str, Any], **meta: Any) -> dict[str, Any]:
        state = {k: v for k, v in module.state_dict().items()}
        return self.add_tensors(name, state, architecture=architecture, **meta)

    def add_file(self, name: str, filename: str, data: bytes, **meta: Any) -> dict[str, Any]:
        (self.path / filename).write_bytes(data)
        record = {"file": filename, "sha256": sha256_bytes(data), "bytes": len(data), **meta}
        self.manifest["artifacts"][name] = record
        if is_torchscript(record):
            # the build wrote this program itself, from the user's file (trusted by naming it in
            # --classifier) or from its own training: it may load it back; serving it needs the
            # operator's `torchscript:SHA256` entry
            self.trusted_imports = (*self.trusted_imports, torchscript_trust(record["sha256"]))
        return record

    def set_defense(self, name: str, section: dict[str, Any]) -> None:
        self.manifest["defenses"][name] = section

    def record_step(self, step: str, command: str, seconds: float, **extra: Any) -> None:
        steps = [s for s in self.manifest["build"].get("steps", []) if s.get("step") != step]
        steps.append({"step": step, "command": command, "seconds": round(seconds, 1),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra})
        self.manifest["build"]["steps"] = steps

    def save(self) -> Path:
        self.manifest["format_version"] = FORMAT_VERSION  # a format-1 bundle is upgraded here
        self.manifest["version"] = content_version(self.manifest)
        out = self.path / MANIFEST_NAME
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")
        tmp.replace(out)
        return out
