"""`shieldserve train`: build a complete bundle from a dataset, step by step.

Each step is a recipe module with `build_step(ctx: BuildContext) -> None` that trains its
artifacts, calibrates what needs calibrating, and adds both to the bundle. Steps run in the
order of STEPS; `--steps` picks some of them to add to (or refresh in) an existing bundle.
Every step draws its randomness from a generator derived from the seed and the step's name,
so rebuilding with the same seed reproduces the manifest's metrics.

A defense step that fails on a new bundle is recorded as unusable (with its error) and the
build goes on. Extending a bundle, a step that fails on a defense the bundle already has leaves
that defense as it was (section, artifacts, manifest) and the command fails; a training
checkpoint that cannot be resumed (recipes.common.CheckpointError) always fails the command,
naming the file.

The manifest on disk moves only from one consistent state to the next, whenever the process is
killed: no step saves it halfway (BuildContext.classifier() builds from memory), a step is saved
with its verdicts "not measured" until the quality gate has measured it, and a new build's
manifest says it is unfinished (`build.complete` false; is_incomplete) until its last save. A
finished bundle is not replaced without `force`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import platform
import shlex
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.bundle import Bundle, BundleError, BundleWriter, Classifier, InputSpec, require_trusted, torchscript_trust
from models.bundle import is_unfinished as is_incomplete  # the service refuses such a bundle (Bundle.require_finished)
from models.features import FeatureError
from models.datasets import Dataset, load_dataset
from models.recipes import quality
from models.recipes.common import CheckpointError

log = logging.getLogger("shieldserve.train")

# (step name, recipe module). Later steps may use the classifier the first one built.
STEPS: list[tuple[str, str]] = [
    ("classifier", "models.recipes.classifier"),
    ("magnet", "models.recipes.magnet"),
    ("neuralfp", "models.recipes.neuralfp"),
    ("squeeze", "models.recipes.squeeze"),
    ("defensegan", "models.recipes.defensegan"),
    ("rmc", "models.recipes.rmc"),
    ("smoothing", "models.recipes.smoothing"),
    ("robust", "models.recipes.robust"),
]


@dataclass
class ClassifierSource:
    """Where the base classifier comes from when the user brings their own."""

    kind: str                  # "import" | "torchscript"
    target: str                # "pkg.module:factory" or a TorchScript file
    weights: Path | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: str | None = None  # the layer whose output RMC indexes (default: found, models.features)


@dataclass
class BuildContext:
    dataset: Dataset
    writer: BundleWriter
    preset: str
    seed: int
    device: torch.device
    command: str
    options: dict[str, Any] = field(default_factory=dict)
    byo_classifier: bool = False
    extending: bool = False    # `--steps` on an existing bundle: a failed step keeps the defense it had
    config: str | None = None  # the service YAML whose compositions the gate measures (None: the packaged one)
    broken_pipelines: list[str] = field(default_factory=list)  # its pipelines that do not build
    _classifier: Classifier | None = None

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_json(self.writer.manifest["input"])

    def classifier(self) -> Classifier:
        """The base classifier (frozen, eval mode), built from the writer's manifest in memory.

        Never by saving the manifest first: a defense step calls this after writing some of its
        artifacts, and a save there put them on disk beside the step's old section (MagNet's
        new autoencoders under thresholds calibrated on the old ones, smoothing's new networks
        under the old verdicts) until the step's own save; a process killed in between (SIGKILL,
        out of memory) left a bundle that loaded and rejected every clean image. The manifest
        on disk moves only from one finished step to the next. The classifier's file does not
        change during a defense step, and its bytes are checked against the record in memory."""
        if self._classifier is None:
            manifest = copy.deepcopy(self.writer.manifest)
            trusted = tuple(self.writer.trusted_imports)
            # what Bundle.load checks before it builds anything (the classifier's code or program)
            require_trusted({"artifacts": {"classifier": manifest["artifacts"]["classifier"]}}, trusted,
                            self.writer.path)
            self._classifier = Bundle(self.writer.path, manifest, trusted_imports=trusted).classifier(self.device)
        return self._classifier

    def forget_classifier(self) -> None:
        self._classifier = None


class StepWriter(BundleWriter):
    """A BundleWriter that can undo one step (`begin` ... `rollback` or `commit`): the files the
    step overwrote are put back, the ones it added removed, and the manifest restored, in memory
    and on disk where the step saved it (neuralfp's `recalibrate` saves before it starts). A step
    that fails on a defense the bundle already has leaves that defense as it was."""

    def __init__(self, path: str | Path, manifest: dict[str, Any] | None = None,
                 trusted_imports: tuple[str, ...] = ()) -> None:
        super().__init__(path, manifest, trusted_imports)
        self._undo: dict[str, Any] | None = None

    def begin(self, step: str) -> None:
        manifest_file = self.path / "manifest.json"
        self._undo = {"manifest": copy.deepcopy(self.manifest),
                      "disk": manifest_file.read_bytes() if manifest_file.is_file() else None,
                      "files": {}}
        # files a defense section names that are not artifacts (Defense-GAN's samples_png): the
        # step writes them directly, not through add_file
        for value in self.manifest.get("defenses", {}).get(step, {}).values():
            if isinstance(value, str) and Path(value).name == value and (self.path / value).is_file():
                self._keep(value)

    def _keep(self, filename: str) -> None:
        if self._undo is not None and filename not in self._undo["files"]:
            target = self.path / filename
            self._undo["files"][filename] = target.read_bytes() if target.is_file() else None

    def add_file(self, name: str, filename: str, data: bytes, **meta: Any) -> dict[str, Any]:
        self._keep(filename)
        return super().add_file(name, filename, data, **meta)

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for filename, data in undo["files"].items():
            target = self.path / filename
            if data is None:
                target.unlink(missing_ok=True)
            else:
                target.write_bytes(data)
        self.manifest.clear()
        self.manifest.update(undo["manifest"])
        manifest_file = self.path / "manifest.json"
        current = manifest_file.read_bytes() if manifest_file.is_file() else None
        if current != undo["disk"]:
            if undo["disk"] is None:
                manifest_file.unlink(missing_ok=True)
            else:
                tmp = manifest_file.with_suffix(".json.tmp")
                tmp.write_bytes(undo["disk"])
                tmp.replace(manifest_file)


def parse_classifier(spec: str, weights: str | None, kwargs: dict[str, Any]) -> ClassifierSource:
    kind, sep, target = spec.partition(":")
    if kind == "torchscript" and target:
        return ClassifierSource("torchscript", target)
    if kind == "import" and target:
        if not weights:
            raise ValueError("--classifier import:... needs --classifier-weights FILE.safetensors")
        return ClassifierSource("import", target, Path(weights), kwargs)
    if spec.endswith((".pt", ".ts", ".torchscript")) and not sep:
        return ClassifierSource("torchscript", spec)
    raise ValueError("--classifier must be 'import:package.module:factory' (with --classifier-weights) "
                     "or 'torchscript:FILE'")


def _load_torchscript(source: Any, name: Any) -> Any:
    """torch.jit.load, its failure one ValueError naming the file (torch's loader says only
    "[enforce fail ...]" or "PytorchStreamReader failed locating file constants.pkl"); a
    torch.save file (a pickle in the same zip format) is named as such."""
    import zipfile

    try:
        return torch.jit.load(source, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises on a file that is not TorchScript
        hint = ""
        try:
            if hasattr(source, "seek"):
                source.seek(0)
            with zipfile.ZipFile(source) as zf:
                if any(n.endswith("/data.pkl") for n in zf.namelist()) and \
                        not any(n.endswith("/constants.pkl") for n in zf.namelist()):
                    hint = ("; it is a torch.save file (a pickle, which shieldserve never loads): export the "
                            "network with torch.jit.trace or torch.jit.script, then .save(FILE)")
        except (zipfile.BadZipFile, OSError, ValueError):
            pass
        raise ValueError(f"{name} is not a TorchScript file (torch.jit.save's output): "
                         f"{type(exc).__name__}{hint}") from None


def _cause(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong: TorchScript's first line is
    "The following operation failed in the TorchScript interpreter.", its cause the last."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        return lines[-1][:300]
    return lines[0][:300]


@torch.no_grad()
def _check_fits(net: Any, dataset: Dataset, source: str) -> None:
    """ValueError, before anything is written, where the user's classifier does not run on the
    data's input shape or gives another number of logits than the data has classes (served, a
    10-logit network on 2-class data answered labels that are no class)."""
    shape, classes = (2, *dataset.input_shape), len(dataset.class_names)
    try:
        out = net(torch.zeros(shape))
    except Exception as exc:  # noqa: BLE001 - whatever the user's network raises, said in one line
        raise ValueError(f"the classifier {source} does not run on this data's input {tuple(shape)} "
                         f"(N, C, H, W; pixels scaled by --mean/--std): {_cause(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the classifier {source} answers {got} for a batch of 2, but the data has {classes} "
                         f"classes: it must return logits of shape (N, {classes})")


def _remove_if_empty(out: Path, created: bool) -> None:
    """Remove `out` if this build created it and a failure left nothing in it."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def add_byo_classifier(writer: BundleWriter, src: ClassifierSource, dataset: Dataset, device: torch.device) -> dict:
    """Put the user's pretrained classifier into the bundle unchanged, and measure it."""
    from models.recipes.common import accuracy

    if src.kind == "torchscript":
        import io

        data = Path(src.target).read_bytes()
        net = _load_torchscript(io.BytesIO(data), src.target).eval()
        _check_fits(net, dataset, str(src.target))
        record = writer.add_file("classifier", "classifier.torchscript", data, format="torchscript",
                                 architecture={"kind": "torchscript"}, preprocess="bundle", source=str(src.target))
    else:
        from safetensors.torch import load_file

        from models.architectures import build_architecture

        arch = {"kind": "import", "factory": src.target, "kwargs": src.kwargs}
        net = build_architecture(arch)
        net.load_state_dict(load_file(str(src.weights)))
        _check_fits(net.eval(), dataset, src.target)
        record = writer.add_module("classifier", net, arch, preprocess="bundle", source=str(src.weights))
    writer.save()
    clf = writer.load().classifier(device)
    record["metrics"] = {"test_accuracy": round(accuracy(clf, dataset.test.x.to(device), dataset.test.y.to(device)), 4)}
    record["pretrained"] = True
    if src.feature_layer:
        record["feature_layer"] = src.feature_layer
    try:
        record["features"] = Classifier(clf.network, clf.spec, src.feature_layer).feature_extractor().describe()
    except FeatureError as exc:  # RMC's step will say so; the other defenses do not need features
        record["features"] = {"error": str(exc)}
    return record


# --options keys a step reads besides its recipe's fields (squeeze has no recipe class)
_STEP_EXTRAS: dict[str, set[str]] = {"robust": {"work_dir"}, "defensegan": {"work_dir", "recipe"},
                                     "squeeze": {"target_fpr", "bound", "confidence"}}


def _step_settings(step: str) -> set[str]:
    """The --options keys the step `step` reads: its recipe's fields and _STEP_EXTRAS."""
    make = getattr(importlib.import_module(dict(STEPS)[step]), "recipe", None)
    fields = {f.name for f in dataclasses.fields(make("quick"))} if make is not None else set()
    return fields | _STEP_EXTRAS.get(step, set())


# settings that count something that must be there at least once (0 epochs, a batch of 0, a
# network of width 0 were tracebacks deep in a step); every other whole-number setting is >= 0
_AT_LEAST_ONE = {"epochs", "batch_size", "width", "hidden", "latent_dim"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the recipe field's annotated type (JSON arrays for tuples, an
    int where a float goes); a type this does not know is left to the recipe."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, list):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return True
    return True


def _check_values(options: dict[str, Any], preset: str) -> None:
    """Each step's --options values are of its recipe's types and within the bounds every
    recipe shares, and the recipe takes them (its own checks: methods, ranges), before anything
    is written or trained: `"adversarial": "PGD"` trained a plain classifier without a word,
    `"method": "PGD"` recorded `robust` unusable after the whole build, and `"epochs": "2"` or
    `"batch_size": 0` were tracebacks."""
    modules = dict(STEPS)
    for section, value in options.items():
        make = getattr(importlib.import_module(modules[section]), "recipe", None) if section in modules else None
        if make is None:
            continue
        settings = dict(value)
        if section == "defensegan":
            settings = {**settings.pop("recipe", {}), **settings}
        settings = {k: v for k, v in settings.items() if k not in _STEP_EXTRAS.get(section, ())}
        hints = typing.get_type_hints(type(make("quick")))
        for key, v in settings.items():
            hint = hints.get(key, Any)
            if not _fits(v, hint):
                want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
                raise ValueError(f"--options {section}.{key}: {v!r} is not of its type ({want})")
            if isinstance(v, int) and not isinstance(v, bool) and hint in (int, int | str):
                least = 1 if key in _AT_LEAST_ONE or key.endswith("_batch_size") else 0
                if v < least:
                    raise ValueError(f"--options {section}.{key}: {v!r} must be at least {least}")
        try:
            make(preset, **settings)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--options {section}: {exc}") from None


def _check_options(options: dict[str, Any], chosen: list[str] | None = None) -> None:
    """--options' sections are steps' names (or `quality`), and each section's settings are its
    step's: refused here, before anything is written or trained (a misspelt key was a traceback
    once the classifier step had written a manifest, or, in a defense step, that defense
    recorded unusable after every other step had run, and the command exiting 0). With
    `--steps` (`chosen`), a section of a step that does not run is named in a warning: its
    settings are ignored (silently, before; one options file for several `--steps` runs is
    fine, a section meant for a step left out is not)."""
    sections = [name for name, _ in STEPS] + ["quality"]
    for section, value in options.items():
        if section not in sections:
            raise ValueError(f"--options: unknown section {section!r}; sections: {', '.join(sections)}")
        if chosen is not None and section != "quality" and section not in chosen:
            log.warning("--options %s: the %s step does not run (--steps %s): its settings are ignored", section,
                        section, ",".join(chosen))
        if not isinstance(value, dict):
            raise ValueError(f"--options: {section!r} must be an object of settings, got {type(value).__name__}")
        if section == "quality":
            continue
        known = _step_settings(section)
        nested = value.get("recipe", {}) if section == "defensegan" else {}
        if not isinstance(nested, dict):
            raise ValueError("--options defensegan.recipe must be an object of settings")
        for key in [*value, *nested]:
            if key not in known or (key in nested and key in _STEP_EXTRAS.get(section, ())):
                raise ValueError(f"--options {section}: unknown setting {key!r}; settings: "
                                 f"{', '.join(sorted(known - {'recipe'}))}")
    defaults = quality.PRESETS["default"].to_json()
    for key, value in options.get("quality", {}).items():
        if key not in defaults:
            raise ValueError(f"--options quality: unknown setting {key!r}; settings: {', '.join(defaults)}")
        want = type(defaults[key])  # bool, int or float; a float setting takes an int too
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, (int, float) if want is float else int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"--options quality.{key}: {value!r} is not {'an' if want is int else 'a'} {want.__name__}")
    # the types alone let a typo turn the gate off: a drop of 2 (meant as 2 %) passes a defense
    # that rejects every clean image, and NaN compares false with everything; a negative drop
    # (the defense must beat the base classifier) only makes the gate stricter
    drop = options.get("quality", {}).get("max_accuracy_drop")
    if drop is not None and not -1 < drop < 1:
        raise ValueError(f"--options quality.max_accuracy_drop: {drop!r} is not a fraction below 1 (0.02 allows a drop "
                         f"of 2 points of clean accuracy; 1 or more would pass every defense)")
    images = options.get("quality", {}).get("images")
    if images is not None and images < 0:
        raise ValueError(f"--options quality.images: {images!r} is negative (0 turns the gate off; 300 is the default)")


def build_bundle(out: str | Path, *, dataset: str | None = None, preset: str | None = None, seed: int | None = None,
                 steps: list[str] | None = None, classifier: ClassifierSource | None = None,
                 device: str = "cpu", input_overrides: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None, argv: list[str] | None = None,
                 trusted_imports: list[str] | tuple[str, ...] = (), config: str | None = None,
                 force: bool = False) -> Path:
    """Build (or extend, with `steps`) the bundle at `out`. Returns the manifest's path.
    `config`: the service YAML the bundle will be served with (merged over the packaged one, as
    `shieldserve serve --config` does): the quality gate also measures each of its pipelines
    that composes two or more trained defenses (models.recipes.quality.measure_pipelines).

    `dataset`: mnist5k (the default for a new bundle), idx:DIR or npz:FILE. Extending a bundle
    defaults to the dataset it was built on, and refuses another one (or the same one whose
    content has changed): its steps would be trained and calibrated on data the manifest does
    not name, beside artifacts made on the recorded data. `preset` and `seed` likewise: a new
    bundle's default is "default" and 0, an extended one's what it was built with
    (`build.preset`, `build.seed`), and another value is refused (the manifest records one
    preset and seed for the whole bundle, and rebuilding from it must reproduce its metrics).

    Without `steps`, a bundle already at `out` is refused unless `force` (`--force`): the build
    would replace it. A new build's manifest says it is unfinished until its last save
    (`build.complete` false, `build.pending_steps` the steps still to run; `is_incomplete`): the
    service must not serve it. Such a bundle is built again without `force` (its training
    checkpoints, in the work directory, resume), or finished with `--steps` naming the pending
    ones. Replacing a bundle (`force`, or an unfinished one) deletes its manifest and the files it
    names before the first step runs."""
    from models.recipes.common import require_same_data

    out = Path(out)
    started = time.monotonic()
    known = [name for name, _ in STEPS]
    chosen = steps or known
    for s in chosen:
        if s not in known and s != "quality":
            raise ValueError(f"unknown step {s!r}; steps: {known} (and quality: measure the bundle's "
                             f"defenses again)")
    exists = (out / "manifest.json").exists()
    if "quality" in chosen and not exists:
        raise ValueError("--steps quality measures an existing bundle's defenses; build the bundle first")
    if force and steps:
        raise ValueError("--force replaces a whole bundle, and --steps adds or refreshes some of its steps: "
                         "give one of them")
    if exists and not steps and not force and not is_incomplete(_read_json(out / "manifest.json")):
        # nothing checked for one: a finished bundle (hours of training) was silently replaced,
        # and an interrupted rebuild left only its classifier, served undefended
        raise ValueError(f"there is a bundle at {out} already (its manifest.json); building one there without "
                         f"--steps would replace it: pass --force to replace it, add or refresh some of its steps "
                         f"with --steps STEP,..., or choose another --out")
    if steps and not exists and "classifier" not in chosen:
        # every other step needs the classifier: each would fail after its training, the
        # command exit 0, and `serve` refuse the bundle
        raise ValueError(f"there is no bundle at {out} to add steps to (no manifest.json); build one first "
                         f"(without --steps, or with --steps classifier,...)")
    if classifier is not None and "classifier" not in chosen:
        raise ValueError("--classifier replaces the bundle's classifier: add `classifier` to --steps")
    _check_device(device)
    _check_options(options or {}, chosen if steps else None)
    if classifier is not None and classifier.feature_layer:
        _check_feature_layer(classifier)  # a mistyped layer is refused now, not after the steps trained
    if config is not None:  # a config that does not load fails now, not after hours of training
        from service.settings import load_settings

        load_settings(config)
    extending = bool(steps) and (out / "manifest.json").exists()
    previous_text = (out / "manifest.json").read_text() if extending else ""
    previous = _previous_manifest(out / "manifest.json") if extending else {}
    # the user's own --classifier is trusted (they named it: the import: factory, the
    # torchscript: file by its content); a bundle's recorded one is code like any other and
    # needs --trust-import, refused here before the data is loaded
    byo: tuple[str, ...] = ()
    if classifier is not None and classifier.kind == "import":
        byo = (classifier.target,)
    elif classifier is not None and classifier.kind == "torchscript" and Path(classifier.target).is_file():
        byo = (torchscript_trust(hashlib.sha256(Path(classifier.target).read_bytes()).hexdigest()),)
    trusted = tuple(trusted_imports) + byo
    if extending:
        require_trusted(previous, trusted, out)
    if extending and input_overrides:
        had = InputSpec.from_json(previous.get("input"))
        if dataclasses.replace(had, **input_overrides) != had and not (classifier is not None and "classifier" in chosen):
            raise ValueError(f"the bundle at {out} has its input conversion (value range, mean, std) from its build; "
                             f"--value-range, --mean and --std change it only with a new classifier "
                             f"(--steps classifier --classifier ...), or build a new bundle")
    if extending and "classifier" in chosen and classifier is None and \
            (previous.get("artifacts", {}).get("classifier", {}).get("architecture") or {}).get("kind") != "builtin":
        raise ValueError(f"the bundle at {out} serves a classifier you brought; --steps classifier without "
                         f"--classifier would replace it with the built-in one: give --classifier, or build a new "
                         f"bundle")
    recorded = previous.get("build", {}).get("dataset")
    if dataset is None:
        dataset = recorded or "mnist5k"
    elif recorded and absolute_dataset(dataset) != absolute_dataset(recorded):
        raise ValueError(f"the bundle at {out} was built on {recorded}; pass --dataset {recorded} "
                         f"(or build a new bundle, without --steps, on {dataset})")
    build = previous.get("build", {})
    preset = _as_built(out, "preset", preset, build.get("preset"), "default")
    seed = _as_built(out, "seed", seed, build.get("seed"), 0)
    _check_values(options or {}, preset)
    # the gate as this bundle's last measure ran it, unless --options says otherwise: a step
    # added to a quick bundle measured with `{"quality": {"images": 300, ...}}` was not measured
    # (the preset's 0 images), and kept the verdict of the defense it replaced
    gate_options = {**(_recorded_gate(previous) if extending else {}), **(options or {}).get("quality", {})}
    gate_asked = {k for k in (options or {}).get("quality", {}) if k != "images"}
    if gate_asked and quality.recipe(preset, **gate_options).images <= 0:
        raise ValueError(f"--options quality / --max-accuracy-drop set {', '.join(sorted(gate_asked))}, but the "
                         f"quality gate does not run here (the {preset} preset measures 0 images): "
                         f"add --options '{{\"quality\": {{\"images\": 300}}}}' to run it")
    # recorded with an absolute path: `evaluate` and `--steps` read the bundle's dataset from
    # the manifest, run from anywhere (a relative one was relative to where train ran)
    dataset = absolute_dataset(dataset)
    ds = load_dataset(dataset)
    if classifier is not None and ds.val_carved:
        # README, "Your data": said there, and missed (the UCI example gives none): the gate then
        # measured every defense against a base near 100% on digits the network had learned
        log.warning("%s has no x_val/y_val: the validation split is carved from x_train, which the classifier you "
                    "bring was probably trained on; the quality gate and the detectors' calibration then run on "
                    "images it knows, and look better than they will be: give a held-out x_val/y_val", dataset)
    content = require_same_data(ds, previous, dataset, out, "build a new bundle without --steps")
    # artifacts the chosen steps write again are not verified: a step killed while writing them
    # (SIGKILL, out of memory) left files the manifest's hashes do not match, and nothing could
    # load the bundle to run that step again
    rebuilt = _step_artifacts(previous, chosen) if extending else ()
    created = not out.exists()  # removed again if the build fails before writing anything in it
    writer = (StepWriter.extend(out, trusted, unverified=rebuilt) if extending
              else StepWriter(out, trusted_imports=trusted))
    command = "shieldserve train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    if not extending or (input_overrides and classifier is not None):
        spec = InputSpec(shape=ds.input_shape, class_names=tuple(ds.class_names),
                         **(input_overrides or {}))
        writer.set_input(spec)
    if not extending:
        # the content's hash: `--steps` on this bundle later refuses data that is not this
        writer.manifest["dataset"] = {**ds.describe(), "sha256": content}
        writer.manifest["build"].update({"seed": seed, "preset": preset, "dataset": dataset,
                                         "command": command,
                                         "versions": {"python": platform.python_version(),
                                                      "torch": torch.__version__,
                                                      # float sums differ by thread count: a rebuild
                                                      # reproduces the metrics at the same count
                                                      "torch_threads": torch.get_num_threads()}})
    if not extending:
        # unfinished until the last save below: an interrupted new build (or replacement) must not
        # be served with only its first steps' defenses, or none (the classifier alone)
        writer.manifest["build"].update({"complete": False, "pending_steps": [s for s in known if s in chosen]})
        if options:
            # for the command that finishes an interrupted build (Bundle.require_finished): its
            # `--steps` without them built the rest with the preset's settings, under a manifest
            # whose command named these
            writer.manifest["build"]["options"] = options
        if exists:  # --force, or an unfinished build again: its old manifest, then the files it named
            # but never what this build reads: `--classifier torchscript:OUT/classifier.torchscript`
            # (or its weights) named the old bundle's own file, deleted before it was read
            inputs = [Path(p) for p in (classifier.target if classifier and classifier.kind == "torchscript" else None,
                                        classifier.weights if classifier else None) if p]
            if dataset.startswith("npz:"):
                inputs.append(Path(dataset[4:]))
            _remove_bundle(out, keep=inputs)
    elif "classifier" in chosen and any(k in writer.manifest.get("defenses", {}) for k in quality.STEP_KEYS
                                        if k not in chosen):
        # the classifier step saves the new classifier beside the defenses kept from before,
        # whose verdicts were about the old one until the gate measures them again at the end:
        # unfinished (`--steps quality` finishes it) until then, so a kill in between is not served
        build = writer.manifest["build"]
        build["complete"] = False
        build["pending_steps"] = [*[s for s in build.get("pending_steps") or [] if s != "quality"], "quality"]
    ctx = BuildContext(ds, writer, preset, seed, torch.device(device), command, dict(options or {}),
                       byo_classifier=classifier is not None, extending=extending, config=config)
    gate = gate_options
    try:
        with _signals_stop_the_step():
            _run_steps(ctx, chosen, classifier, gate, command)
    except quality.NearChance:
        # the gate refused the base classifier: no manifest that serves it is left behind. A new
        # bundle loses its manifest (nothing loads it); an extended one keeps the manifest it had
        # before a refused new classifier, or its refused step's defenses marked unusable
        if not extending:
            (out / "manifest.json").unlink(missing_ok=True)
        elif "classifier" in chosen:
            (out / "manifest.json").write_text(previous_text)
        else:
            writer.save()
        _remove_if_empty(out, created)
        raise
    except BaseException:
        # a --classifier refused when it is loaded left an empty --out directory behind
        _remove_if_empty(out, created)
        raise
    writer.manifest["build"]["seconds"] = round(time.monotonic() - started, 1)
    build = writer.manifest["build"]
    if build.get("complete") is False and not build.get("pending_steps"):
        # every step a new build chose has run (an extended unfinished one: its --steps ran the rest)
        build["complete"] = True
        build.pop("pending_steps", None)
    path = writer.save()
    if ctx.broken_pipelines:  # the bundle is saved; `serve --config` would refuse to start on these
        given = f"--config {ctx.config}" if ctx.config else "the service configuration"
        raise ValueError(f"the bundle at {out} is built, but {given} does not serve on it: "
                         + "; ".join(ctx.broken_pipelines) + " (fix the config, then measure it with "
                         f"`shieldserve train --out {out} --steps quality --config CONFIG`)")
    return path


def _previous_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle `--steps` extends, checked as Bundle.load checks it, and the
    sections read here objects (`[]`, or a `build` that is a string, were tracebacks)."""
    from models.bundle import _check_manifest, _read_manifest

    manifest = _read_manifest(path)
    _check_manifest(path, manifest)
    for section in ("build", "dataset", "quality", "metrics"):
        if not isinstance(manifest.get(section, {}), dict):
            raise BundleError(f"{path}: {section!r} must be an object")
    return manifest


def _recorded_gate(manifest: dict[str, Any]) -> dict[str, Any]:
    """The quality gate's settings a bundle's manifest records from its last measure (images,
    max_accuracy_drop, enforce), where the gate ran; {} otherwise."""
    q = manifest.get("quality")
    if not isinstance(q, dict) or not isinstance(q.get("images"), int) or isinstance(q["images"], bool) \
            or q["images"] <= 0:
        return {}
    out: dict[str, Any] = {"images": q["images"]}
    if isinstance(q.get("enforce"), bool):
        out["enforce"] = q["enforce"]
    drop = q.get("max_accuracy_drop")
    if isinstance(drop, (int, float)) and not isinstance(drop, bool) and -1 < drop < 1:
        out["max_accuracy_drop"] = drop
    return out


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None where it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove_bundle(out: Path, keep: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Delete the bundle at `out` that a new build replaces: its manifest first (from then on no
    bundle is there to load), then the files it names (its artifacts, Defense-GAN's samples), so
    that none is left beside the new bundle's. Files it does not name are left alone."""
    old = _read_json(out / "manifest.json")
    (out / "manifest.json").unlink(missing_ok=True)
    if not isinstance(old, dict):
        return
    names = [rec.get("file") for rec in (old.get("artifacts") or {}).values() if isinstance(rec, dict)]
    for section in (old.get("defenses") or {}).values():
        if isinstance(section, dict):
            # the files a section names itself (Defense-GAN's samples image), not its other strings
            names += [v for v in section.values() if isinstance(v, str) and v.endswith(".png")]
    kept = {p.resolve() for p in keep}
    for name in names:
        if isinstance(name, str) and name and Path(name).name == name and name not in (".", "..", "manifest.json"):
            target = out / name
            if target.is_file() and not target.is_symlink() and target.resolve() not in kept:
                target.unlink()


def _check_device(device: str) -> None:
    """A device torch can use here, refused before anything is written (`--device cuda` on a
    CPU-only torch was an AssertionError traceback from the first step, and an empty bundle
    directory)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device: cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch has no CUDA device to use (torch "
                             f"{torch.__version__}); train on cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: shieldserve trains on cpu or cuda")


def _check_feature_layer(src: ClassifierSource) -> None:
    """--feature-layer names a submodule of the brought network: checked on the network alone,
    before the data is loaded or anything trains (a misspelt one surfaced after the classifier
    step, as RMC recorded unusable, and the command exited 0)."""
    if src.kind == "torchscript":
        net = _load_torchscript(str(src.target), src.target)
    else:
        from models.architectures import build_architecture

        net = build_architecture({"kind": "import", "factory": src.target, "kwargs": src.kwargs})
    names = [n for n, _ in net.named_modules() if n]
    if src.feature_layer not in names:
        raise ValueError(f"--feature-layer {src.feature_layer!r}: the network has no such submodule; it has "
                         f"{names[:20]}")


def _step_artifacts(manifest: dict[str, Any], steps: list[str]) -> tuple[str, ...]:
    """The artifacts of `manifest` that `steps` write again: named after the step (`classifier`
    itself; `smoothing_*`, `magnet_*`, ... for the others; `robust_classifier` for robust)."""
    names = manifest.get("artifacts", {})
    return tuple(n for n in names for s in steps
                 if n == s or (s != "classifier" and n.startswith(s + "_")))


class _Stopped(SystemExit):
    """SIGTERM or SIGHUP during a build: raised in the main thread so that the running step is
    undone (StepWriter.rollback) as it is for Ctrl-C."""


@contextlib.contextmanager
def _signals_stop_the_step() -> Iterator[None]:
    """While the steps run, SIGTERM and SIGHUP (`kill`, `docker stop`, a closed terminal, a job
    timeout) raise _Stopped: a step stopped by one left artifacts the manifest's hashes did not
    match, and no command loaded the bundle again. SIGKILL cannot be caught: for that, `--steps`
    on the same step does not verify the artifacts it writes again (_step_artifacts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: Any) -> None:
        raise _Stopped(128 + sig)

    # a signal ignored by whoever started us (`nohup` ignores SIGHUP) stays ignored
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def absolute_dataset(spec: str) -> str:
    """A dataset spec with its file or directory made absolute (npz:FILE, idx:DIR); others as given."""
    kind, sep, path = spec.partition(":")
    if sep and kind in ("npz", "idx") and path and not Path(path).is_absolute():
        return f"{kind}:{Path(path).resolve()}"
    return spec


def _as_built(out: Path, flag: str, given: Any, recorded: Any, default: Any) -> Any:
    """`given` (None: not given) against what the bundle being extended records (None: a new
    bundle, or one that records nothing): the recorded value by default, another one refused."""
    if given is None:
        return default if recorded is None else recorded
    if recorded is not None and given != recorded:
        raise ValueError(f"the bundle at {out} was built with --{flag} {recorded}; pass --{flag} {recorded} "
                         f"(or leave it out), or build a new bundle, without --steps, with --{flag} {given}")
    return given


def _done(manifest: dict[str, Any], step: str) -> None:
    """Take a step off the unfinished build's `pending_steps` (saved with what it wrote)."""
    pending = manifest["build"].get("pending_steps")
    if isinstance(pending, list) and step in pending:
        pending.remove(step)


def _unmeasured(manifest: dict[str, Any], step: str) -> None:
    """Record the step's defenses as not measured (unusable) until the gate's verdicts replace
    these, in the same shape as quality.record_failure's."""
    verdicts = manifest.setdefault("quality", {}).setdefault("defenses", {})
    for key in quality.step_keys(step, manifest):
        verdicts[key] = {"usable": False, "pipeline": quality.gated(key),
                         "reason": f"not measured: the build stopped after the {step} step was saved and before "
                                   f"the quality gate measured it (measure it with `shieldserve train --out BUNDLE "
                                   f"--steps quality`)"}


def _run_steps(ctx: BuildContext, chosen: list[str], classifier: ClassifierSource | None, gate: dict[str, Any],
               command: str) -> None:
    writer, ds, preset = ctx.writer, ctx.dataset, ctx.preset
    gate_runs = quality.recipe(preset, **gate).images > 0  # quality.measure measures nothing otherwise
    for name, module_path in STEPS:
        if name not in chosen:
            continue
        t0 = time.monotonic()
        if name == "classifier" and classifier is not None:
            record = add_byo_classifier(writer, classifier, ds, ctx.device)
            writer.manifest["metrics"]["classifier_test_accuracy"] = record["metrics"]["test_accuracy"]
        elif name == "classifier":
            importlib.import_module(module_path).build_step(ctx)
            # the check below loads the bundle from disk (add_byo_classifier saves as it measures):
            # unsaved, a new bundle has no manifest yet and an extended one has its old classifier
            writer.save()
        else:
            _defense_step(ctx, name, module_path, gate)
        if name == "classifier":
            ctx.forget_classifier()
            quality.check_classifier(writer.path, ds, preset, gate, ctx.device,
                                     trusted_imports=writer.trusted_imports)
        writer.record_step(name, command, time.monotonic() - t0)
        if name in writer.manifest.get("defenses", {}) and name in quality.STEP_KEYS and gate_runs:
            # the gate reads the bundle from disk, so the step is saved before it is measured: with
            # its verdicts "not measured" (unusable), not the old defense's (a process killed
            # before the second save left the new defense under the old one's "usable")
            _unmeasured(writer.manifest, name)
            writer.save()
            quality.measure(writer.path, writer.manifest, name, ds, preset, gate, ctx.device,
                            trusted_imports=writer.trusted_imports)
        elif name in writer.manifest.get("defenses", {}) and name in quality.STEP_KEYS:
            quality.forget(writer.manifest, name)  # the verdicts were about the defense it replaced
        _done(writer.manifest, name)  # saved with the step's verdicts: an unfinished build resumes after it
        writer.save()
        log.info("step %s done in %.1fs", name, time.monotonic() - t0)
    if "classifier" in chosen and "quality" not in chosen:
        # a new classifier under defenses kept from before: their verdicts (and MagNet's, squeeze's,
        # RMC's calibrations) were about the old one; measured again with the new one, a defense
        # that no longer holds (or refuses a classifier it was not calibrated for) is not served
        now = writer.manifest["artifacts"]["classifier"]["sha256"]
        for name in quality.STEP_KEYS:
            if name not in chosen and name in writer.manifest.get("defenses", {}):
                if gate_runs:
                    quality.measure(writer.path, writer.manifest, name, ds, preset, gate, ctx.device,
                                    trusted_imports=writer.trusted_imports)
                    continue
                # unmeasured: their verdicts go; a defense calibrated jointly with the old
                # classifier is refused by the service's loader, which failed `serve` at start-up
                # after this command exited 0: recorded unusable, it is left out with the reason
                built_for = writer.manifest["defenses"][name].get("classifier_sha256")
                quality.forget(writer.manifest, name, None if built_for in (None, now) else (
                    f"calibrated with the classifier this build replaced (the quality gate did not run to measure it "
                    f"with the new one): rebuild it with `shieldserve train --out BUNDLE --steps {name}`"))
        quality.measure_monitor(writer.path, writer.manifest, ds, preset, gate)  # a new bundle: the monitor on its data
        _done(writer.manifest, "quality")
        writer.save()
    if "quality" in chosen:  # the gate alone, again, on every defense the bundle has
        t0 = time.monotonic()
        for name in quality.STEP_KEYS:
            if name in writer.manifest.get("defenses", {}):
                quality.measure(writer.path, writer.manifest, name, ds, preset, gate, ctx.device,
                                trusted_imports=writer.trusted_imports)
        quality.measure_monitor(writer.path, writer.manifest, ds, preset, gate)
        _done(writer.manifest, "quality")
    # the served compositions, each whole (what a step above measured again was dropped); read
    # from the bundle on disk with the verdicts above
    writer.save()
    ctx.broken_pipelines = quality.measure_pipelines(writer.path, writer.manifest, ds, preset, gate, ctx.device,
                                                     config=ctx.config, trusted_imports=writer.trusted_imports)
    if "quality" in chosen:
        writer.record_step("quality", command, time.monotonic() - t0)


def _defense_step(ctx: BuildContext, name: str, module_path: str, gate: dict[str, Any]) -> None:
    """Run one defense step. Whatever it raises, what it wrote is undone first (StepWriter).

    A defense that cannot be built around this classifier is recorded as unusable with the
    reason, and the build goes on: the other defenses may still serve it. Not so for a defense
    the bundle being extended already has (its working section and artifacts are kept and the
    command fails: refreshing it failed, it did not become unusable), nor for a checkpoint
    that cannot be resumed (the command fails naming the file; the manifest is not saved)."""
    writer = ctx.writer
    kept = ctx.extending and name in writer.manifest.get("defenses", {})
    guarded = isinstance(writer, StepWriter)
    if guarded:
        writer.begin(name)
    try:
        importlib.import_module(module_path).build_step(ctx)
    except BaseException as exc:
        if guarded:
            writer.rollback()
        if isinstance(exc, CheckpointError):
            log.error("step %s stopped, the bundle unchanged by it: %s", name, exc)
            raise
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: undone, not recorded
            if isinstance(exc, (KeyboardInterrupt, _Stopped)):  # one line, where Ctrl-C printed a traceback
                log.error("step %s stopped (%s); the bundle is as it was before the step",
                          name, "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"signal {exc.code - 128}")
            raise
        if kept:
            log.error("step %s failed; the bundle keeps the %s defense it had: %s", name, name, exc)
            raise
        if isinstance(exc, ValueError):  # what the data cannot give (too few calibration images): one line
            log.error("step %s failed; its defense is recorded as unusable: %s", name, exc)
        else:  # anything else may be a bug: its traceback
            log.exception("step %s failed; its defense is recorded as unusable", name)
        writer.manifest.get("defenses", {}).pop(name, None)
        quality.record_failure(writer.manifest, name, exc, ctx.preset, gate)
    else:
        if guarded:
            writer.commit()
