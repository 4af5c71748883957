"""MagNet on real digits: calibrated thresholds round-trip through the bundle, the detectors
reject real FGSM digits and accept clean ones, and the HTTP answer names the detector."""

from __future__ import annotations

import pytest
import torch

from service.attacks import fgsm
from service.defenses.base import RunContext
from service.defenses.calibration import rejection_rate
from tests.conftest import png

PIPELINES = {
    "baseline": {"defenses": []},
    "magnet": {"defenses": [{"defense": "magnet"}]},
    "magnet_detect": {"defenses": [{"defense": "magnet", "reform": False}]},
}


@pytest.fixture(scope="module")
def digits(mnist, env):
    x, y = mnist.test.per_class(6).x, mnist.test.per_class(6).y
    x_adv = fgsm(env.classifier, x, y, 0.3)
    return x, y, x_adv


def test_thresholds_round_trip_and_hold_on_validation(env, mnist):
    from models.recipes.magnet import detector_scores
    from service.defenses.magnet import build

    section = env.bundle.defense("magnet")
    cal = section["calibration"]
    assert cal["target_fpr"] == 0.01
    assert set(cal["thresholds"]) == {"reconstruction_l1", "reconstruction_l2", "divergence_t10", "divergence_t40"}
    detector, reformer = build({}, env)
    assert detector.role == "detector" and reformer.role == "purifier"
    assert detector.thresholds == cal["thresholds"]
    # the autoencoders loaded from the bundle reproduce the calibration: <= 1% of validation rejected
    scores = detector_scores(mnist.val.x, detector.autoencoders, env.classifier, detector.names)
    # each threshold is one calibration image's score: recomputed with another thread count
    # that image may land a rounding error above it, so allow one image per detector
    slack = len(detector.names) / len(mnist.val.x)
    assert cal["measured_val_fpr"] <= 0.01
    assert rejection_rate(scores, detector.thresholds) <= cal["measured_val_fpr"] + slack + 1e-9
    # calibrated with a margin: validation plus held-out training digits, upper bound <= 1%
    assert cal["calibration_set"]["validation"] == len(mnist.val.x) and cal["calibration_set"]["train_holdout"] > 0
    assert cal["calibration_images"] == sum(cal["calibration_set"].values())
    assert cal["fpr_upper_bound"] <= cal["bound_target"] <= cal["target_fpr"]
    assert cal["measured_calibration_fpr"] < cal["fpr_upper_bound"]
    # the reformer is one of the two autoencoders, named in the manifest and in the settings
    assert section["reformer"]["autoencoder"] in ("magnet_ae_i", "magnet_ae_ii")
    assert reformer.public_settings() == {"reformer": section["reformer"]["autoencoder"]}


def test_bounded_calibration():
    from service.defenses.calibration import bounded_joint_thresholds, clopper_pearson_upper

    # known values of the one-sided 95% Clopper-Pearson bound (scipy.stats.beta.ppf(0.95, k + 1, n - k))
    assert abs(clopper_pearson_upper(0, 500) - 0.0059736) < 1e-6
    assert abs(clopper_pearson_upper(1, 500) - 0.0094523) < 1e-6
    assert abs(clopper_pearson_upper(8, 1500) - 0.0096025) < 1e-6
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(2000, generator=g), "b": torch.rand(2000, generator=g)}
    thresholds, rate, k = bounded_joint_thresholds(scores, 0.01)
    assert round(rejection_rate(scores, thresholds) * 2000) == k and clopper_pearson_upper(k, 2000) <= 0.01
    assert clopper_pearson_upper(k + 1, 2000) > 0.01 and 0 < rate < 0.01  # one more would break the bound
    with pytest.raises(ValueError):
        bounded_joint_thresholds({"a": torch.rand(100, generator=g)}, 0.01)  # 100 digits cannot show 1%


def test_detectors_reject_fgsm_and_accept_clean(env, digits):
    from service.defenses.magnet import build

    x, y, x_adv = digits
    (detector,) = build({"reform": False}, env)
    ctx = RunContext()
    with torch.no_grad():
        clean = torch.stack([d.rejected for d in detector.detect(x, env.classifier, ctx)]).any(0)
        adv = torch.stack([d.rejected for d in detector.detect(x_adv, env.classifier, ctx)]).any(0)
    assert clean.float().mean() <= 0.05
    assert adv.float().mean() >= 0.9


def test_reformer_keeps_clean_digits_readable(env, digits):
    from service.defenses.magnet import build

    x, y, _ = digits
    (reformer,) = build({"detectors": []}, env)
    out = reformer.purify(x, env.classifier, RunContext()).x
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    base_acc = float((env.classifier(x).argmax(1) == y).float().mean())
    assert float((env.classifier(out).argmax(1) == y).float().mean()) >= base_acc - 0.12


def test_options_are_checked(env):
    from service.defenses.magnet import build

    assert [c.role for c in build({"reform": False}, env)] == ["detector"]
    assert [c.role for c in build({"detectors": ["reconstruction_l1"]}, env)] == ["detector", "purifier"]
    for bad in ({"target_fpr": 0.05}, {"detectors": ["nope"]}, {"reform": "yes"}, {"detectors": [], "reform": False}):
        with pytest.raises(ValueError):
            build(bad, env)


def test_thresholds_calibrated_for_another_classifier_are_refused(env, monkeypatch):
    # the joint thresholds include the divergence detectors, which read the classifier: a
    # classifier rebuilt under them would be served with thresholds that no longer hold
    from service.defenses.magnet import build

    section = env.bundle.defense("magnet")
    assert section["classifier_sha256"] == env.bundle.artifact("classifier")["sha256"]  # recorded at build
    monkeypatch.setitem(section, "classifier_sha256", "0" * 64)
    with pytest.raises(ValueError, match="another classifier"):
        build({"reform": False}, env)
    assert [c.role for c in build({"detectors": [], "reform": True}, env)] == ["purifier"]  # the reformer alone


def test_http_rejection_names_detector_score_threshold(make_client, digits):
    client = make_client(pipelines=PIPELINES, default_pipeline="magnet")
    x, y, x_adv = digits
    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(4)]
    files += [("file", (f"a{i}.png", png(x_adv[i]), "image/png")) for i in range(4)]
    for pipeline in ("magnet", "magnet_detect"):
        body = client.post(f"/predict?pipeline={pipeline}", files=files).json()
        results = body["results"]
        clean, adv = results[:4], results[4:]
        assert sum(r["status"] == "accepted" and r["label"] == int(y[i]) for i, r in enumerate(clean)) >= 3
        rejected = [r for r in adv if r["status"] == "rejected"]
        assert len(rejected) >= 3
        for r in rejected:
            assert r["label"] is None
            for j in r["rejected_by"]:
                assert j["defense"] == "magnet" and j["detector"].startswith(("reconstruction_", "divergence_"))
                assert j["score"] > j["threshold"]
    pipes = {p["name"]: p for p in client.get("/pipelines").json()["pipelines"]}
    assert [d["role"] for d in pipes["magnet"]["defenses"]] == ["detector", "purifier"]
    assert [d["role"] for d in pipes["magnet_detect"]["defenses"]] == ["detector"]
    assert pipes["magnet"]["defenses"][0]["settings"]["calibrated_target_fpr"] == 0.01


def test_divergence_scores_from_one_joint_pass_match_two_passes(env, mnist):
    # detector_scores classifies x and AE(x) in one forward pass; the scores must be those of
    # the two separate passes (the calibrated thresholds were computed either way)
    from service.defenses.magnet import build, detector_scores, js_divergence

    detector, _ = build({}, env)
    for n in (1, 3, 40):
        x = mnist.val.x[:n]
        joint = detector_scores(x, detector.autoencoders, env.classifier, detector.names)
        with torch.no_grad():
            r = detector.autoencoders["magnet_ae_ii"](x)
            a, b = env.classifier(x), env.classifier(r)
        for name, t in (("divergence_t10", 10.0), ("divergence_t40", 40.0)):
            torch.testing.assert_close(joint[name], js_divergence(a, b, t), rtol=1e-4, atol=1e-7)


def test_detectors_score_with_the_inference_copy_of_the_classifier(make_client, digits):
    # Pipeline.run hands detectors the runtime's TorchScript copy of the classifier (no
    # autograd in detection): its scores are the eager network's up to float rounding, and
    # it really is the copy that scores (a stand-in copy changes the divergences)
    from service.defenses.base import RunContext
    from service.defenses.magnet import detector_scores

    client = make_client(pipelines=PIPELINES, default_pipeline="magnet")
    runtime = client.app.state.runtime
    pipe = runtime.pipelines["magnet_detect"]
    assert pipe.inference_classifier is not None
    x = torch.cat([digits[0][:6], digits[2][:6]])
    detector = pipe.components[0]
    with torch.no_grad():
        eager = detector_scores(x, detector.autoencoders, runtime.classifier, detector.names)
    served = runtime.compute.submit(lambda: pipe.run(x, RunContext())).result()
    for name in detector.names:
        got = torch.tensor([r.scores[f"magnet/{name}"] for r in served])
        torch.testing.assert_close(got, eager[name], rtol=1e-3, atol=1e-6)
    fast, flat = pipe.inference_classifier, lambda t: torch.zeros(t.shape[0], 10)
    pipe.inference_classifier = flat
    try:  # equal logits for x and AE(x): every divergence is 0
        flat_run = runtime.compute.submit(lambda: pipe.run(x, RunContext())).result()
        assert all(r.scores["magnet/divergence_t10"] == 0 for r in flat_run)
    finally:
        pipe.inference_classifier = fast
