"""Defense-GAN on real digits: the projection lowers the reconstruction error from its starting
point, counts generator passes exactly, is reproducible from the run's generator and honours
deadlines; the quick preset trains in seconds; the pipeline serves through /predict with the
stage's reconstruction error in the answer."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from models.bundle import Bundle
from service.defenses.base import DeadlineExceeded, DefenseEnv, RunContext
from tests.conftest import defense_env, png

PIPELINES = {
    "defensegan": {"defenses": [{"defense": "defensegan"}]},
    "defensegan_detect": {"defenses": [{"defense": "defensegan", "detect": True}]},
    "defensegan_rec": {"defenses": [{"defense": "defensegan", "classifier": "rec"}]},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The generator is tiny: per-op thread synchronisation costs more than it saves, and on a
    # busy 2-core machine two threads make the projection many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(quick_bundle) -> DefenseEnv:
    return defense_env(quick_bundle)


@pytest.fixture(scope="module")
def nets(env):
    section = env.bundle.defense("defensegan")
    return env.bundle.module(section["generator"]), env.bundle.module(section["encoder"])


def test_quick_preset_trains_in_seconds(quick_bundle):
    manifest = Bundle.load(quick_bundle).manifest
    step = {s["step"]: s for s in manifest["build"]["steps"]}["defensegan"]
    assert step["seconds"] < 30, step  # ~10 s alone on 2 cores; slack for a busy machine
    assert {"defensegan_generator", "defensegan_encoder", "defensegan_classifier"} <= set(manifest["artifacts"])
    assert (quick_bundle / manifest["defenses"]["defensegan"]["samples_png"]).stat().st_size > 100


@pytest.mark.parametrize("init", ["random", "encoder"])
def test_projection_lowers_error_and_counts_passes(nets, mnist, init):
    from service.defenses.defensegan import project, ProjectionSettings

    gen, enc = nets
    x = mnist.test.per_class(2).x
    s = ProjectionSettings(steps=25, restarts=3, optimizer="adam", lr=0.05, init=init, init_noise=0.5)
    p = project(gen, x, s, encoder=enc, rng=torch.Generator().manual_seed(0))
    assert p.x.shape == x.shape and float(p.x.min()) >= 0 and float(p.x.max()) <= 1
    assert (p.error < p.initial_error).all(), (p.error, p.initial_error)
    # the reported error is the returned image's error
    assert torch.allclose(p.error, (p.x - x).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-7)
    # no early stopping, no pruning: every restart runs every step
    assert p.generator_evals.tolist() == [25 * 3] * len(x)
    # pruning to the best restart after 5 steps: 3 rows for 5 steps, then 1 row for 20
    pruned = project(gen, x, replace(s, prune_at=5), encoder=enc, rng=torch.Generator().manual_seed(0))
    assert pruned.generator_evals.tolist() == [3 * 5 + 20] * len(x)


def test_early_stopping_is_per_image(nets, mnist):
    from service.defenses.defensegan import PRESETS, project

    gen, enc = nets
    x = mnist.test.per_class(3).x
    p = project(gen, x, PRESETS["default"], encoder=enc, rng=torch.Generator().manual_seed(0))
    s = PRESETS["default"]
    assert (p.generator_evals <= s.restarts * s.prune_at + (s.steps - s.prune_at)).all()
    assert p.generator_evals.min() < p.generator_evals.max() or p.steps.max() < s.steps
    assert (p.error <= p.initial_error).all()


def test_random_restarts_come_from_the_run_generator_and_deadlines_stop_it(env, mnist):
    from service.defenses.defensegan import build

    (purifier,) = build({"projection": "paper", "overrides": {"steps": 3, "restarts": 2}}, env)
    x = mnist.test.per_class(1).x
    a = purifier.purify(x, env.classifier, RunContext(seed=7))
    b = purifier.purify(x, env.classifier, RunContext(seed=7))
    c = purifier.purify(x, env.classifier, RunContext(seed=8))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.details["reconstruction_error"].shape == (len(x),)
    with pytest.raises(DeadlineExceeded):
        purifier.purify(x, env.classifier, RunContext(deadline=time.monotonic() - 1))


def test_detector_threshold_round_trips(env, mnist):
    from service.defenses.defensegan import build

    record = env.bundle.defense("defensegan")["detector"]["reconstruction_error"]
    assert record["target_fpr"] == 0.01 and record["measured_val_fpr"] <= 0.01 + 1e-9
    detector, purifier = build({"detect": True}, env)
    assert [detector.role, purifier.role] == ["detector", "purifier"]
    assert detector.threshold == record["thresholds"]["reconstruction_error"]
    # far-off-manifold inputs (white-on-black inverted: mostly white) score above the
    # threshold; the purifier reuses the detector's work
    noise = 0.7 + 0.3 * torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ctx = RunContext()
    (det,) = detector.detect(noise, env.classifier, ctx)
    assert det.rejected.all(), (det.scores, det.threshold)
    out = purifier.purify(noise, env.classifier, ctx)
    assert torch.equal(out.details["reconstruction_error"], det.scores)


def test_options_are_checked(env):
    from service.defenses.defensegan import build

    for bad in ({"projection": "fastest"}, {"bogus": 1}, {"overrides": {"stepz": 3}},
                {"detect": True, "projection": "paper"}, {"detect": True, "rate": 0.05},
                {"classifier": "other"}):
        with pytest.raises(ValueError):
            build(bad, env)


def test_pipeline_serves_through_predict(make_client, mnist):
    client = make_client(pipelines=PIPELINES)
    x = mnist.test.per_class(1).x[:3]
    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(len(x))]
    bright = 0.7 + 0.3 * torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1))
    files.append(("file", ("bright.png", png(bright), "image/png")))
    body = client.post("/predict?pipeline=defensegan", files=files)
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    for r in results:
        assert r["status"] == "accepted" and r["label"] is not None
        (stage,) = [s for s in r["stages"] if s["defense"] == "defensegan"]
        assert stage["reconstruction_error"] >= 0 and stage["generator_evals"] > 0
    assert results[-1]["stages"][0]["reconstruction_error"] > max(r["stages"][0]["reconstruction_error"]
                                                                 for r in results[:-1])
    det = client.post("/predict?pipeline=defensegan_detect", files=files).json()["results"]
    assert det[-1]["status"] == "rejected"
    assert det[-1]["rejected_by"][0]["detector"] == "reconstruction_error"
    pipes = {p["name"]: p for p in client.get("/pipelines").json()["pipelines"]}
    assert [d["role"] for d in pipes["defensegan_detect"]["defenses"]] == ["detector", "purifier"]
    rec = client.post("/predict?pipeline=defensegan_rec", files=files[:1]).json()["results"][0]
    purify, adapt = [s for s in rec["stages"] if s["defense"] == "defensegan"]  # projection, Rec classifier
    assert purify["reconstruction_error"] >= 0 and "reconstruction_error" not in adapt
    assert [d["role"] for d in pipes["defensegan_rec"]["defenses"]] == ["purifier", "adapter"]


def test_rec_classifier_and_bundle_settings(env, mnist):
    """`classifier: rec` classifies G(z*) with the Defense-GAN-Rec classifier (trained on
    projections); the default keeps the base classifier; `default` runs the bundle's stored settings."""
    from service.defenses.defensegan import build

    section = env.bundle.defense("defensegan")
    assert section["classifier"] == "defensegan_classifier"
    purifier, adapter = build({"classifier": "rec"}, env)
    assert adapter.role == "adapter" and adapter.public_settings() == {"classifier": "defensegan_classifier"}
    x = mnist.test.per_class(1).x
    classify = adapter.adapt(x, env.classifier, RunContext())
    assert classify is not env.classifier and classify(x).shape == (len(x), 10)
    assert [c.role for c in build({}, env)] == ["purifier"]
    stored = {k: v for k, v in section["projection"].items() if k != "preset"}
    assert {k: v for k, v in purifier.public_settings().items() if k != "projection"} == stored
    assert stored["min_norm"] == stored["max_norm"] == 1.0  # z on the sphere ||z|| = sqrt(latent)


def test_default_bundle_purifies_clean_digits(default_bundle, mnist):
    from service.defenses.defensegan import build

    env = defense_env(default_bundle)
    if "defensegan" not in env.bundle.manifest.get("defenses", {}):
        pytest.skip("models/default has no defensegan artifacts yet")
    (purifier,) = build({}, env)
    x, y = mnist.test.per_class(5).x, mnist.test.per_class(5).y
    classify = env.classifier
    out = purifier.purify(x, env.classifier, RunContext())
    with torch.no_grad():
        acc = float((classify(out.x).argmax(1) == y).float().mean())
    assert acc >= 0.9
