"""Defense-GAN's manifest-supplied numbers are checked when the pipeline is built: projection
settings out of range (steps = 10^9 held the warm-up, which has no deadline, forever; a NaN lr
or noise made every error NaN), a detector threshold or rate that is not finite (never
exceeded: the detector passed everything), and a generator or encoder that does not fit the
bundle's input or each other (a torch shape error at the warm-up, or on every request). Each
is refused naming the field or artifact, the bound and the value. Builds only, no projection:
seconds in all."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest

from models.bundle import BundleError
from service.pipeline import Pipeline, PipelineConfigError
from tests.conftest import DEFAULT_BUNDLE, defense_env

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def env(quick_bundle):
    e = defense_env(quick_bundle)
    e.bundle.manifest = copy.deepcopy(e.bundle.manifest)  # each test edits its own
    return e


def _stored(env) -> dict:
    return env.bundle.manifest["defenses"]["defensegan"]["projection"]


def test_the_hostile_stored_projection_fails_start_up_at_once(env):
    # the auditor's case: the bundle's own `default` settings with 10^9 steps and no early stop
    _stored(env).update(steps=10**9, patience=0, prune_at=0)
    t = time.monotonic()
    with pytest.raises(PipelineConfigError) as info:
        Pipeline.build("defensegan", {"defenses": [{"defense": "defensegan", "projection": "default"}]}, env)
    assert time.monotonic() - t < 10
    message = str(info.value)
    for part in ("pipeline 'defensegan'", "steps", "defenses.defensegan.projection", "[1, 10000]", "1000000000"):
        assert part in message, message


OUT_OF_RANGE = [
    ({"steps": 10**9}, r"steps \(the pipeline's overrides\) must be an integer in \[1, 10000\], got 1000000000"),
    ({"steps": 0}, r"steps .* must be an integer in \[1, 10000\], got 0"),
    ({"steps": 150.5}, r"steps .* must be an integer"),
    ({"steps": True}, r"steps .* must be an integer"),
    ({"restarts": 0}, r"restarts .* must be an integer in \[1, 100\], got 0"),
    ({"restarts": 10**6}, r"restarts .* must be an integer in \[1, 100\]"),
    ({"steps": 2001, "restarts": 10}, r"steps x restarts .* at most 20000 .* got 2001 x 10 = 20010"),
    ({"patience": -1}, r"patience .* \[0, 10000\], got -1"),
    ({"prune_at": 10**9}, r"prune_at .* \[0, 10000\]"),
    ({"lr": NAN}, r"lr .* must be a finite number in \(0, 1000\], got nan"),
    ({"lr": INF}, r"lr .* got inf"),
    ({"lr": 0.0}, r"lr .* \(0, 1000\], got 0.0"),
    ({"lr": -1.0}, r"lr .* got -1.0"),
    ({"lr": "0.05"}, r"lr .* got '0.05'"),
    ({"momentum": 1.0}, r"momentum .* \[0, 1\), got 1.0"),
    ({"decay_at": NAN}, r"decay_at .* \[0, 1\], got nan"),
    ({"decay": 0.0}, r"decay .* \(0, 1\], got 0.0"),
    ({"init_noise": NAN}, r"init_noise .* got nan"),
    ({"min_delta": NAN}, r"min_delta .* got nan"),
    ({"max_norm": INF}, r"max_norm .* got inf"),
    ({"min_norm": 2.0, "max_norm": 1.0}, r"min_norm .* at most max_norm \(1.0\), got 2.0"),
    ({"optimizer": "sgd"}, r"optimizer .* one of \('momentum', 'adam'\), got 'sgd'"),
    ({"init": "zeros"}, r"init .* one of \('random', 'encoder'\), got 'zeros'"),
]


@pytest.mark.parametrize("overrides, problem", OUT_OF_RANGE, ids=[json.dumps(o) for o, _ in OUT_OF_RANGE])
def test_out_of_range_overrides_are_refused_with_field_bound_and_value(env, overrides, problem):
    from service.defenses.defensegan import build

    with pytest.raises(ValueError, match=problem):
        build({"projection": "paper", "overrides": overrides}, env)


@pytest.mark.parametrize("field, value", [("steps", 10**9), ("lr", NAN), ("restarts", 0), ("steps", "150")])
def test_out_of_range_stored_settings_are_refused_naming_the_manifest(env, field, value):
    from service.defenses.defensegan import build

    _stored(env)[field] = value
    with pytest.raises(ValueError, match=rf"{field} \(bundle .*: defenses.defensegan.projection\) must be"):
        build({}, env)


def test_every_shipped_projection_is_within_bounds(env):
    """`paper`, `default`, the settings stored in the quick and the committed bundles, and the
    overrides docs/defenses/defensegan.md and bench/ run all pass."""
    from service.defenses.defensegan import PRESETS, ProjectionSettings, build, check_settings, settings_for

    sections = [env.bundle.defense("defensegan")]
    if (DEFAULT_BUNDLE / "manifest.json").exists():
        sections.append(json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())["defenses"]["defensegan"])
    for section in sections:
        for preset in PRESETS:
            check_settings(settings_for(preset, section))
    check_settings(ProjectionSettings())  # the dataclass' own defaults are `paper`
    for preset, overrides in (("default", {"min_norm": 0, "max_norm": 0}), ("default", {"steps": 30}),
                              ("paper", {"min_norm": 1, "max_norm": 1}), ("paper", {"steps": 3, "restarts": 2}),
                              ("default", {"init": "random", "restarts": 6, "prune_at": 10}),
                              ("paper", {"steps": 2000, "restarts": 10}),
                              ("paper", {"steps": 10_000, "restarts": 2}), ("paper", {"steps": 200, "restarts": 100})):
        (purifier,) = build({"projection": preset, "overrides": overrides}, env)
        assert {k: purifier.public_settings()[k] for k in overrides} == overrides


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["thresholds"].__setitem__("reconstruction_error", NAN), r"thresholds.reconstruction_error must be a finite"),
    (lambda r: r["thresholds"].__setitem__("reconstruction_error", INF), r"thresholds.reconstruction_error .* got inf"),
    (lambda r: r["thresholds"].__setitem__("reconstruction_error", -0.1), r"thresholds.reconstruction_error .* got -0.1"),
    (lambda r: r["thresholds"].pop("reconstruction_error"), r"thresholds.reconstruction_error .* got None"),
    (lambda r: r.__setitem__("target_fpr", NAN), r"target_fpr must be a finite number in \[0, 1\], got nan"),
    (lambda r: r.__setitem__("target_fpr", 5), r"target_fpr must be a finite number in \[0, 1\], got 5"),
], ids=["nan", "inf", "negative", "missing", "fpr nan", "fpr 5"])
def test_non_finite_detector_numbers_are_refused(env, edit, problem):
    from service.defenses.defensegan import build

    edit(env.bundle.manifest["defenses"]["defensegan"]["detector"]["reconstruction_error"])
    with pytest.raises(BundleError, match=problem) as info:
        build({"detect": True}, env)
    assert "defenses.defensegan.detector.reconstruction_error" in str(info.value)


def test_a_nan_rate_option_is_not_taken_for_the_calibrated_one(env):
    from service.defenses.defensegan import build

    with pytest.raises(ValueError, match="calibrated to rate"):
        build({"detect": True, "rate": NAN}, env)
    detector, _ = build({"detect": True}, env)
    assert math.isfinite(detector.threshold) and detector.rate == 0.01


def test_networks_that_do_not_fit_the_input_or_each_other_are_refused(env, monkeypatch):
    from models.architectures import Encoder, Generator
    from service.defenses.defensegan import build

    section = env.bundle.defense("defensegan")
    real = env.bundle.module

    def swap(replacement):
        monkeypatch.setattr(env.bundle, "module",
                            lambda name, device="cpu": replacement.get(name) or real(name, device))

    swap({section["generator"]: Generator(latent_dim=128, width=2, image_size=14)})
    with pytest.raises(BundleError, match=r"'defensegan_generator' .* draws images of shape \(1, 14, 14\), "
                                          r"this bundle's input is \(1, 28, 28\)"):
        build({}, env)
    swap({section["encoder"]: Encoder(latent_dim=64, width=2, image_size=28)})
    with pytest.raises(BundleError, match=r"'defensegan_encoder' .* shape \(64,\), the generator takes \(128,\)"):
        build({}, env)
    build({"projection": "paper"}, env)  # `paper` starts at random: the encoder is not loaded
    swap({section["generator"]: Generator(latent_dim=128, width=2, channels=3, image_size=28)})
    with pytest.raises(BundleError, match=r"draws images of shape \(3, 28, 28\)"):
        build({"projection": "paper"}, env)
