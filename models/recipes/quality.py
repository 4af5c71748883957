"""The quality gate: every defense is measured, as it will be served, on clean validation images.

After a build step, `measure(...)` runs the step's pipelines (the service's own Pipeline code,
`GATED` below) on a class-stratified slice of the validation split and compares them with
the base classifier on the same images. A defense's clean accuracy counts every image it
answers correctly; a rejection or an abstention is not a correct answer. A defense whose
accuracy is more than `max_accuracy_drop` (0.02 by default) below the base classifier's is
recorded as unusable in the manifest (`quality.defenses.NAME`: usable, reason, the numbers),
and the service then does not serve pipelines that need it (models.bundle.Bundle.unusable).
A step that fails (it cannot be built around this classifier) is recorded the same way with
its error as the reason.

The query monitor is gated too (`measure_monitor`, after the build): it rejects what it
flags, so it is run over the user's own benign images (the training and validation splits,
never test, in a seeded random order, from 8 clients in turn). Where it flags more than
`max_accuracy_drop` of them (near-duplicate data: overlapping crops of a few photographs,
video frames) it is recorded unusable and the service runs without it, saying so. Its
suspect pixel check (`suspect_linf`) is measured first, on the same order: the share of each
client's images within reach of one of its previous ones (`query_monitor:suspect_linf`); above
the same bound (low-resolution data with few levels) the monitor runs without that check, and
is measured without it.

Each verdict records the `settings_digest` of the pipeline it was measured with (GATED's, built
with the packaged configuration alone: service.runtime.packaged_settings). A served pipeline
whose one trained defense has other settings (Defense-GAN projecting 2 steps from a random
start, RMC's or smoothing's options, another certify budget) is not that pipeline: served on
the packaged settings' verdict, such a Defense-GAN answered 7 of 40 digits and was "passed". It
is judged by its own measurement (`measure_pipelines`, recorded in `quality.pipelines` with its
digest), and without one it is not served where the gate enforces (models.bundle.Bundle.composition).

Options: {"quality": {"images": N, "max_accuracy_drop": D, "enforce": true}} (`shieldserve
train --max-accuracy-drop D`). The quick preset (seconds of training, for tests) measures
nothing unless `images` is set, and then records the verdicts without enforcing them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from models.recipes.common import progress

log = logging.getLogger("shieldserve.train")

# defense key -> the pipeline that measures it (what the packaged config serves)
GATED: dict[str, list[Any]] = {
    "magnet": [{"defense": "magnet", "reform": False}],
    "magnet:reformer": [{"defense": "magnet", "reform": True}],
    "neuralfp": ["neuralfp"],
    "squeeze": ["squeeze"],
    "defensegan": [{"defense": "defensegan", "projection": "default"}],
    "rmc": [{"defense": "rmc", "mode": "isolated"}],
    # as the packaged config serves them: sigma 0.5 certified at r = 0.5 (`smoothing`, `default`),
    # the denoiser at sigma 0.25
    "smoothing": [{"defense": "smoothing", "sigma": 0.5, "target_radius": 0.5}],
    "smoothing:denoised": [{"defense": "smoothing", "sigma": 0.25, "denoiser": True, "target_radius": 0.5}],
    "robust": ["robust"],
}
# the build step -> the defense keys it makes
STEP_KEYS: dict[str, list[str]] = {
    "magnet": ["magnet", "magnet:reformer"], "neuralfp": ["neuralfp"], "squeeze": ["squeeze"], "defensegan": ["defensegan"],
    "rmc": ["rmc"], "smoothing": ["smoothing", "smoothing:denoised"], "robust": ["robust"],
}


def gated(key: str) -> list[Any]:
    """The pipeline that measures a defense key: GATED's, or smoothing at another sigma
    (`smoothing@0.25`, `smoothing:denoised@0.5`) as GATED's smoothing entry at that sigma."""
    if key in GATED:
        return GATED[key]
    base, _, sigma = key.partition("@")
    if base in ("smoothing", "smoothing:denoised") and sigma:
        return [{**GATED[base][0], "sigma": float(sigma)}]
    raise KeyError(key)


def step_keys(step: str, manifest: dict[str, Any]) -> list[str]:
    """The defense keys a build step's section serves: STEP_KEYS, and for smoothing one pair per
    noise level the section has networks for (each sigma's own network gets its own verdict;
    models.bundle.defense_key)."""
    from models.bundle import defense_key

    keys = list(STEP_KEYS.get(step, []))
    section = manifest.get("defenses", {}).get(step, {})
    if step == "smoothing":
        for part, denoiser in (("classifiers", False), ("denoisers", True)):
            for sigma in sorted(float(sg) for sg in section.get(part, {})):
                key = defense_key({"defense": "smoothing", "sigma": sigma, "denoiser": denoiser})
                if key not in keys:
                    keys.append(key)
    return keys


@dataclass(frozen=True)
class QualityRecipe:
    images: int = 300              # validation images, stratified by class
    max_accuracy_drop: float = 0.02
    seed: int = 0                  # of the pipelines' randomness (smoothing's noise, projections)
    # False (the quick preset, for tests): verdicts are recorded but every defense stays served;
    # a few seconds of training cannot keep a defense's accuracy, and tests need every pipeline
    enforce: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# quick (seconds of training, for tests): not measured unless options ask for images; every
# test session builds a quick bundle, and the gate's pipelines (projections, smoothing's
# samples, RMC's fine-tuning) would cost it more than its training
PRESETS = {"default": QualityRecipe(), "quick": QualityRecipe(images=0, enforce=False)}


def recipe(preset: str, **overrides: Any) -> QualityRecipe:
    return replace(PRESETS.get(preset, PRESETS["default"]), **overrides)


def _section(manifest: dict[str, Any], r: QualityRecipe) -> dict[str, Any]:
    q = manifest.setdefault("quality", {})
    q.update({"max_accuracy_drop": r.max_accuracy_drop, "images": r.images,
              "enforce": r.enforce,
              "counts": "an image counts as right when the pipeline accepts it and answers its label; "
                        "rejections and abstentions count as wrong"})
    q.setdefault("defenses", {})
    return q


def record_failure(manifest: dict[str, Any], step: str, error: BaseException, preset: str,
                   options: dict[str, Any]) -> None:
    """A step that raised: its defenses are unusable, with the error as the reason."""
    r = recipe(preset, **options)
    q = _section(manifest, r)
    for key in STEP_KEYS.get(step, [step]):
        q["defenses"][key] = {"usable": False, "reason": f"the {step} step failed: {error}",
                              "pipeline": GATED.get(key)}


class NearChance(ValueError):
    """The base classifier answers the validation images no better than chance: the gate refuses
    the bundle (every defense would pass at 0.0 against 0.0)."""


def chance_bound(classes: int) -> float:
    """The validation accuracy at or below which the base classifier counts as broken: 1.5/K,
    at most chance + 0.1. Half of chance above it is many standard errors of a chance-level
    classifier on the gate's few hundred images (10 classes: 0.15 against 0.10 +- 0.017), and
    far below any classifier worth defending; the cap keeps two- to four-class data from
    refusing a weak but real one (2 classes: 0.60, not 0.75). What it catches answers near 0
    or near 1/K: labels shifted or 1-based, another class order, the wrong input range or
    normalisation."""
    k = max(1, classes)
    return min(1.5 / k, 1.0 / k + 0.1)


def check_base(base_acc: float, classes: int, images: int, r: QualityRecipe) -> str | None:
    """Raise NearChance (where the gate enforces) when the base classifier is near chance; else
    the note to record (not enforced), or None."""
    bound = chance_bound(classes)
    if base_acc > bound + 1e-9:
        return None
    why = (f"the base classifier's clean validation accuracy is {base_acc:.4f} on {images} images, at or below "
           f"{bound:.4f} for {classes} classes (chance is {1 / max(1, classes):.4f}): check that the dataset's "
           f"labels are in the classifier's class order (0-based) and the input range/mean/std "
           f"(--value-range, --mean, --std) match how it was trained")
    if r.enforce:
        raise NearChance(why)
    return why + "; not enforced (quality.enforce is false: the quick preset)"


def _gate_images(dataset: Any, r: QualityRecipe, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    classes = len(dataset.class_names)
    val = dataset.val.per_class(max(1, -(-r.images // classes)))
    return val.x[:r.images].to(device), val.y[:r.images].to(device)


@torch.no_grad()
def check_classifier(bundle_path: Any, dataset: Any, preset: str, options: dict[str, Any],
                     device: torch.device, trusted_imports: tuple[str, ...] = ()) -> None:
    """Right after the classifier step, on the gate's images: a base classifier near chance is
    refused before hours of defense training around it (NearChance where enforced)."""
    from models.bundle import Bundle

    r = recipe(preset, **options)
    if r.images <= 0:
        return
    base = Bundle.load(bundle_path, trusted_imports=trusted_imports).classifier(device)
    x, y = _gate_images(dataset, r, device)
    check_base(float((base(x).argmax(1) == y).float().mean()), len(dataset.class_names), len(y), r)


@torch.no_grad()
def measure(bundle_path: Any, manifest: dict[str, Any], step: str, dataset: Any, preset: str,
            options: dict[str, Any], device: torch.device, trusted_imports: tuple[str, ...] = ()) -> None:
    """Measure the step's defenses on the validation split and record the verdicts in `manifest`.
    The compositions measured with the step's old defenses (`quality.pipelines`) are dropped:
    `measure_pipelines` measures them again."""
    r = recipe(preset, **options)
    if r.images <= 0:
        return
    q = _section(manifest, r)
    gate = _Gate.open(bundle_path, dataset, r, device, trusted_imports)
    q["base"] = {"val_accuracy": round(gate.base_acc, 4), "images": len(gate.y)}
    keys = step_keys(step, manifest)
    try:
        note = check_base(gate.base_acc, len(dataset.class_names), len(gate.y), r)
    except NearChance as exc:
        # measured against a classifier that is itself wrong, every defense would "pass" (0.0 vs
        # 0.0): the step's defenses are recorded unusable (the manifest may be saved) and the build stops
        q["base"]["reason"] = str(exc)
        for key in keys:
            q["defenses"][key] = {"usable": False, "passes": False, "reason": str(exc), "pipeline": gated(key)}
        raise
    if note:
        q["base"]["reason"] = note
    _stale(q, keys)
    for key in keys:
        q["defenses"][key] = gate.score(gated(key), f"quality gate {key}", r)


def _stale(q: dict[str, Any], keys: list[str]) -> None:
    """The compositions measured with these defenses' old versions: measure_pipelines runs them
    again, and until it does Bundle.composition does not read them."""
    for rec in (q.get("pipelines") or {}).values():
        if isinstance(rec, dict) and set(rec.get("keys", [])) & set(keys):
            rec["stale"] = True


def forget(manifest: dict[str, Any], step: str, reason: str | None = None) -> None:
    """The step's defenses changed (rebuilt, or a new classifier under them) and the gate does
    not run here: the verdicts about what they were are dropped, not kept for what they are (a
    step rebuilt with the gate off kept its old "usable", and a defense rejecting a quarter of
    the clean digits was served as passed). Where the bundle's gate enforces, a defense without
    a verdict is not served (Bundle.unusable) until `--steps quality` measures it; `reason`:
    record it unusable with that reason instead (it cannot be served as it is)."""
    q = manifest.get("quality")
    if not isinstance(q, dict):
        if reason is None:
            return
        q = manifest.setdefault("quality", {})
    keys = step_keys(step, manifest)
    verdicts = q.setdefault("defenses", {})
    for key in keys:
        if reason is None:
            verdicts.pop(key, None)
        else:
            verdicts[key] = {"usable": False, "reason": reason, "pipeline": gated(key)}
    _stale(q, keys)


@torch.no_grad()
def measure_pipelines(bundle_path: Any, manifest: dict[str, Any], dataset: Any, preset: str,
                      options: dict[str, Any], device: torch.device, config: str | None = None,
                      trusted_imports: tuple[str, ...] = ()) -> list[str]:
    """The served pipelines the defenses' verdicts do not speak for, each as a whole: every
    pipeline of the service's configuration (the packaged one, with `config` merged over it: the
    file the bundle will be served with, whose settings the pipelines are built with, as `serve`
    builds them) whose trained defenses are all usable on this bundle and that composes two or
    more of them, or has one with other settings than the gate measured it with (its built
    `settings_digest` is not the one its verdict records, nor that of the verdict's pipeline
    built here with the packaged settings: Defense-GAN's 2-step projection, the packaged
    `denoised` at n 1000 where `smoothing:denoised` is measured at certify.predict_n), is run on
    the gate's images like a single defense and recorded in `quality.pipelines` (its name -> the
    record, with its defense list and the built pipeline's `settings_digest`, by which the
    service matches it: models.bundle.Bundle.composition). Measured again: a record `measure`
    marked stale (a step it used was rebuilt), whichever config gave it. A pipeline that does not
    build is not recorded (serving it fails start-up with the same error): returned, one line
    each, for `shieldserve train` to fail on once the bundle is saved."""
    from models.bundle import Bundle, TRAINED_DEFENSES, defense_key, defense_name
    from service.pipeline import Pipeline
    from service.runtime import gated_digests
    from service.settings import load_settings

    r = recipe(preset, **options)
    if r.images <= 0:
        if config is not None:
            log.warning("--config %s: the quality gate is off (quality.images 0, the quick preset's default), so its "
                        "pipelines are not measured", config)
        return []
    q = _section(manifest, r)
    done = q.setdefault("pipelines", {})
    bundle = Bundle.load(bundle_path, trusted_imports=trusted_imports)
    settings = load_settings(config, bundle=str(bundle_path))
    wanted = {name: cfg.model_dump().get("defenses", []) or [] for name, cfg in settings.pipelines.items()}
    for name, rec in done.items():
        if rec.get("stale"):
            wanted.setdefault(name, rec.get("defenses") or [])
    gate = None
    here = None  # the gate's own pipelines' digests on this machine, built when first needed
    measured: set[str] = set()
    broken: list[str] = []
    for name, entries in wanted.items():
        keys = [defense_key(e) for e in entries]
        trained = [k for k in keys if defense_name(k) in TRAINED_DEFENSES]
        if any(bundle.unusable(k) is not None for k in trained):
            continue  # the service leaves it out, saying why
        gate = gate or _Gate.open(bundle_path, dataset, r, device, trusted_imports, settings)
        try:  # every pipeline, so that a config `serve` would refuse fails here, not at deployment
            pipe = Pipeline.build(f"quality:{name}", {"defenses": entries}, gate.env)
        except Exception as exc:  # noqa: BLE001 - a configuration error: serve fails on it, loudly
            if name in settings.pipelines:  # a stale record's old pipeline is only dropped (below)
                log.warning("quality gate: pipeline %s does not build, not measured: %s", name, exc)
                broken.append(f"pipeline {name!r} does not build: {exc}")
            continue
        digest = pipe.settings_digest
        if len(trained) < 2:
            here = here or gated_digests(bundle, gate.env.classifier, device)
            if not trained or bundle.composition(entries, digest, here) is None:
                continue  # built as the gate measured its defense: that verdict is the pipeline's
        if digest in measured or any(rec.get("settings_digest") == digest and not rec.get("stale")
                                     for rec in done.values()):
            continue  # measured already, this run or before
        record = gate.score(entries, f"quality gate pipeline {name}", r, pipe=pipe)
        record.pop("pipeline", None)
        done[name] = {**record, "defenses": entries, "keys": keys, "settings_digest": digest}
        measured.add(digest)
    for name in [n for n, rec in done.items() if rec.get("stale")]:
        del done[name]  # no longer buildable or served: a stale verdict must not stay
    return broken


@dataclass
class _Gate:
    """The gate's images and the base classifier's accuracy on them, and how one pipeline is scored."""

    env: Any
    x: torch.Tensor
    y: torch.Tensor
    base_acc: float
    too_few: str | None
    device: torch.device

    @classmethod
    def open(cls, bundle_path: Any, dataset: Any, r: QualityRecipe, device: torch.device,
             trusted_imports: tuple[str, ...], settings: Any = None) -> "_Gate":
        from models.bundle import Bundle
        from service.defenses.base import DefenseEnv
        from service.runtime import packaged_settings

        bundle = Bundle.load(bundle_path, trusted_imports=trusted_imports)
        base = bundle.classifier(device)
        # each defense with the packaged settings (GATED), the ones its verdict's digest records
        settings = settings or packaged_settings(bundle_path)
        env = DefenseEnv(bundle=bundle, classifier=base, device=device, settings=settings)
        x, y = _gate_images(dataset, r, device)
        base_acc = float((base(x).argmax(1) == y).float().mean())
        # a drop within max_accuracy_drop is only seen on at least 2 / max_accuracy_drop images (100
        # at 0.02: two images' worth): on a small validation split (2 images of imbalanced data, one
        # per class) a defense that cost half the accuracy still "passed"
        least = math.ceil(2 / r.max_accuracy_drop - 1e-9) if r.max_accuracy_drop > 0 else 0
        too_few = (f"measured on only {len(y)} validation images, fewer than the {least} a drop within "
                   f"{r.max_accuracy_drop:.2f} needs (one image is {1 / max(1, len(y)):.4f}): give more validation "
                   f"images (x_val/y_val) or a larger quality.max_accuracy_drop") if len(y) < least else None
        return cls(env, x, y, base_acc, too_few, device)

    def score(self, entries: list[Any], label: str, r: QualityRecipe, pipe: Any = None) -> dict[str, Any]:
        """Run the pipeline of `entries` (built already: `pipe`) on the gate's images; its verdict."""
        from service.defenses.base import RunContext
        from service.pipeline import Pipeline

        x, y, base_acc = self.x, self.y, self.base_acc
        started = time.monotonic()
        try:
            pipe = pipe or Pipeline.build(label, {"defenses": entries}, self.env)
            results = []
            bar = progress(-(-len(x) // 50), label)
            for i in range(0, len(x), 50):
                results += pipe.run(x[i:i + 50], RunContext(device=self.device, seed=r.seed + i))
                bar.update(1)
            bar.close()
        except Exception as exc:  # a defense that cannot run on this bundle is not served
            return {"usable": False, "reason": f"could not run its pipeline: {exc}", "pipeline": entries}
        seconds = time.monotonic() - started
        # what it was measured as: a served pipeline of the same defense with another digest is
        # another pipeline (models.bundle.Bundle.composition)
        digest = pipe.settings_digest
        labels = torch.tensor([-1 if res.label is None else res.label for res in results], device=self.device)
        status = [res.status for res in results]
        right = (torch.tensor([s == "accepted" for s in status], device=self.device) & (labels == y))
        acc = float(right.float().mean())
        record = {
            "val_accuracy": round(acc, 4), "base_val_accuracy": round(base_acc, 4),
            "accuracy_drop": round(base_acc - acc, 4),
            "rejection_rate": round(sum(s == "rejected" for s in status) / len(status), 4),
            "abstention_rate": round(sum(s == "abstained" for s in status) / len(status), 4),
            "images": len(status), "seconds": round(seconds, 1),
            "seconds_per_image": round(seconds / max(1, len(status)), 4), "pipeline": entries,
            "settings_digest": digest,
        }
        within = base_acc - acc <= r.max_accuracy_drop + 1e-9
        passes = within and self.too_few is None
        record["passes"] = passes
        record["usable"] = passes or not r.enforce
        record["reason"] = (f"clean validation accuracy {acc:.4f} is within {r.max_accuracy_drop:.2f} of the base "
                            f"classifier's {base_acc:.4f}" if within else
                            f"clean validation accuracy {acc:.4f} is {base_acc - acc:.4f} below the base "
                            f"classifier's {base_acc:.4f} (more than the {r.max_accuracy_drop:.2f} allowed; "
                            f"rejected {record['rejection_rate']:.4f}, abstained {record['abstention_rate']:.4f})")
        if within and self.too_few is not None:
            record["reason"] += f", but {self.too_few}"
        if not passes and not r.enforce:
            record["reason"] += "; not enforced (quality.enforce is false: the quick preset)"
        return record


MONITOR_CLIENTS = 8


def measure_monitor(bundle_path: Any, manifest: dict[str, Any], dataset: Any, preset: str,
                    options: dict[str, Any]) -> None:
    """The query monitor, with the packaged settings, on the training and validation images."""
    from service.defenses.query_monitor import GATE_KEY, NEAR_GATE_KEY, MonitorPolicy, QueryMonitor
    from service.settings import load_settings

    r = recipe(preset, **options)
    if r.images <= 0:
        return
    q = _section(manifest, r)
    qm = load_settings(None, bundle=str(bundle_path)).query_monitor
    # "flag" so that no client gets blocked: the count is of what `reject` would refuse
    policy = replace(MonitorPolicy(**qm.policy.model_dump()), action="flag")
    monitor = QueryMonitor.from_settings(qm, store="memory")
    x = torch.cat([dataset.train.x, dataset.val.x])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(r.seed))
    if policy.suspect_linf > 0:
        # the pixel check first: where it is unusable the service runs the monitor without it,
        # so the monitor is measured without it too (as it will be served)
        near = q["defenses"][NEAR_GATE_KEY] = _measure_near(x[order], policy.suspect_linf, qm.suspect_history, r)
        if not near["usable"]:
            policy = replace(policy, suspect_linf=0.0)
    else:
        q["defenses"].pop(NEAR_GATE_KEY, None)
    started = time.monotonic()
    flagged = 0
    bar = progress(len(x), "quality gate query_monitor", unit="image")
    try:
        for n, i in enumerate(order.tolist()):
            verdict = monitor.screen(policy, x[i:i + 1], f"client-{n % MONITOR_CLIENTS}")
            flagged += int(verdict.flagged[0])
            bar.update(1)
    except ValueError as exc:  # e.g. images smaller than the monitor's window
        q["defenses"][GATE_KEY] = {"usable": False, "reason": f"cannot fingerprint these images: {exc}"}
        return
    finally:
        bar.close()
        monitor.close()
    rate = flagged / max(1, len(x))
    passes = rate <= r.max_accuracy_drop + 1e-9
    record: dict[str, Any] = {
        "flag_rate": round(rate, 4), "flagged": flagged, "images": len(x), "clients": MONITOR_CLIENTS,
        "base_val_accuracy": None,  # not an accuracy: the share of benign images it would refuse
        "split": "train + validation", "threshold": policy.threshold, "suspect_linf": policy.suspect_linf,
        "seconds": round(time.monotonic() - started, 1),
        "passes": passes, "usable": passes or not r.enforce,
    }
    what = (f"the query monitor flags {flagged} of {len(x)} benign training and validation images "
            f"({rate:.4f}; {MONITOR_CLIENTS} clients, threshold {policy.threshold})")
    record["reason"] = (f"{what}: within the {r.max_accuracy_drop:.2f} allowed" if passes else
                        f"{what}: more than the {r.max_accuracy_drop:.2f} allowed, so it would reject that share "
                        f"of benign queries (near-duplicate images?); the service runs without it")
    if not passes and not r.enforce:
        record["reason"] += "; not enforced (quality.enforce is false: the quick preset)"
    q["defenses"][GATE_KEY] = record


def _measure_near(x: torch.Tensor, linf: float, history: int, r: QualityRecipe) -> dict[str, Any]:
    """The suspect pixel check on benign traffic: the share of each client's images within
    `linf` of one of its previous `history` ones, what it would reject if that client were
    ever a suspect (low-resolution data with few levels can be nearly all of it)."""
    from service.defenses.query_monitor import is_near, near_distances, near_pixels

    started = time.monotonic()
    px = near_pixels(x)
    near = 0
    for c in range(MONITOR_CLIENTS):
        rows = px[c::MONITOR_CLIENTS]
        near += sum(is_near(near_distances(list(rows[max(0, i - history):i]), rows[i:i + 1])[0], linf)
                    for i in range(len(rows)))
    rate = near / max(1, len(x))
    passes = rate <= r.max_accuracy_drop + 1e-9
    what = (f"the suspect pixel check (suspect_linf {linf}) finds {near} of {len(x)} benign images within "
            f"reach of one of their client's previous {history} ({rate:.4f})")
    reason = (f"{what}: within the {r.max_accuracy_drop:.2f} allowed" if passes else
              f"{what}: more than the {r.max_accuracy_drop:.2f} allowed, so it would reject that share of a "
              f"suspected client's benign queries; the monitor runs without it")
    if not passes and not r.enforce:
        reason += "; not enforced (quality.enforce is false: the quick preset)"
    return {"near_rate": round(rate, 4), "near": near, "images": len(x), "suspect_linf": linf,
            "base_val_accuracy": None, "split": "train + validation", "seconds": round(time.monotonic() - started, 1),
            "passes": passes, "usable": passes or not r.enforce, "reason": reason}


def table(manifest: dict[str, Any]) -> str:
    """The gate's verdicts as a plain-text table (printed at the end of `shieldserve train`): each
    defense, then each composition measured whole (`pipeline NAME`)."""
    from models.bundle import defense_name

    q = manifest.get("quality", {})
    base = q.get("base", {})
    steps = {s["step"]: s.get("seconds") for s in manifest.get("build", {}).get("steps", [])}
    rows = [("defense", "clean acc", "base acc", "rejected", "abstained", "step s", "gate s", "verdict")]
    measured = [*q.get("defenses", {}).items(), *((f"pipeline {n}", d) for n, d in (q.get("pipelines") or {}).items())]
    for key, d in measured:
        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        verdict = ("usable" if d.get("passes", d.get("usable")) else
                   ("below the gate, served anyway: " if d.get("usable") else "UNUSABLE: ") + str(d.get("reason", "")))
        def sec(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}"
        rows.append((key, f(d.get("val_accuracy")), f(d.get("base_val_accuracy", base.get("val_accuracy"))),
                     f(d.get("rejection_rate", d.get("flag_rate", d.get("near_rate")))), f(d.get("abstention_rate")),
                     sec(steps.get(defense_name(key))), sec(d.get("seconds")), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    head = (f"quality gate: {base.get('images', '?')} validation images; a defense more than "
            f"{q.get('max_accuracy_drop', 0.02):.2f} below the base classifier is "
            + ("not served" if q.get("enforce") else "marked (not enforced: served anyway)"))
    tail = [f"BASE CLASSIFIER: {base['reason']}"] if base.get("reason") else []
    return "\n".join([head, *lines, *tail])
