"""Admission by cost (service/admission.py): one request holds at most half the budget, an
operator's `cost_per_image` still adds a certifying decider's samples, and a sample is
weighed by the FLOPs of the networks it runs (a denoiser then the classifier weighs more)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from service.admission import Admission
from service.batcher import Overloaded
from tests.conftest import png

FAST = {"warmup": False}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def _flops(fn, shape) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


def _decider(rt, name: str):
    [comp] = [c for c in rt.pipelines[name].components if c.role == "decider"]
    return comp


# --------------------------------------------------------------------------- at most half the budget
def test_one_request_holds_at_most_half_of_max_cost():
    a = Admission(200_000, 256, retry_after_s=1)
    big = 64 * 4002.0  # one 64-image /predict on `default` before sample weights: over the whole budget
    a.admit(big, "an over-budget request, alone")
    assert a.cost_in_flight == 100_000 and a.requests_in_flight == 1
    a.admit(1.0, "a baseline image")  # the other half is still there
    a.admit(3.0, "a magnet image")
    with pytest.raises(Overloaded) as refused:
        a.admit(big, "a second over-budget request")
    assert refused.value.retry_after >= 1
    with pytest.raises(Overloaded):
        a.admit(100_000, "more than the other half")
    a.admit(99_996, "exactly what is left")
    assert a.cost_in_flight == 200_000
    for cost in (99_996, 3.0, 1.0, big):
        a.release(cost)
    assert a.cost_in_flight == 0 and a.requests_in_flight == 0
    # a request between half and the whole budget is weighed at its full cost, holds half
    a.admit(150_000, "heavy")
    assert a.cost_in_flight == 100_000
    with pytest.raises(Overloaded):
        a.admit(150_000, "a second heavy one: 100,000 + 150,000 > 200,000")
    a.admit(50_000, "fits")
    a.release(50_000)
    a.release(150_000)
    assert a.cost_in_flight == 0 and a.requests_in_flight == 0


def test_max_size_default_request_leaves_room_for_others(make_client, mnist):
    c = make_client(admission={"max_cost": 1000, "retry_after_s": 2}, **FAST)
    rt = c.app.state.runtime
    adm = rt.admission
    images = rt.settings.limits.max_images_per_request
    big = rt.cost("default", images)
    assert big > adm.max_cost  # a max-size `default` request weighs more than the whole budget
    body = png(mnist.test.x[0])
    files = [("file", (f"{i}.png", png(mnist.test.x[i]), "image/png")) for i in range(images)]
    adm.admit(big, "a max-size default request in flight")  # admitted alone
    try:
        assert adm.cost_in_flight == 500
        r = c.post("/predict?pipeline=baseline", content=body, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text  # a baseline image is still admitted
        r = c.post("/predict?pipeline=default", files=files)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 2
        assert "shieldserve_admitted_cost 500.0" in c.get("/metrics").text
    finally:
        adm.release(big)
    assert adm.cost_in_flight == 0 and adm.requests_in_flight == 0
    r = c.post("/predict?pipeline=default", files=files)  # alone, it runs
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == images
    assert adm.cost_in_flight == 0 and adm.requests_in_flight == 0


# --------------------------------------------------------------------------- cost_per_image
def test_cost_per_image_adds_the_certifying_samples(make_client, mnist):
    c = make_client(admission={"cost_per_image": {"smoothing": 5, "magnet": 7}, "max_cost": 1000}, **FAST)
    rt = c.app.state.runtime
    w = rt.sample_weights["smoothing"][0]
    for n in (1000, 10_000, 100_000):
        assert rt.cost("smoothing", 1, {"n": n, "n0": 100, "certify": True}) == pytest.approx(5 + w * (n + 100))
    assert rt.cost("smoothing", 3, {"n": 100_000, "n0": 100}) == pytest.approx(3 * (5 + w * 100_100))
    dec = _decider(rt, "smoothing")  # /predict: the pipeline's own n and n0
    assert rt.cost("smoothing", 1) == pytest.approx(5 + w * (dec.n + dec.n0))
    assert rt.cost("magnet", 3) == 21  # no certifying decider: the operator's figure alone
    # and admission sees it: a large n is refused while something else is in flight
    n = min(rt.settings.certify.max_n, math.ceil(2000 / w))
    rt.admission.admit(1, "a request in flight")
    try:
        r = c.post(f"/certify?pipeline=smoothing&n={n}&n0=32", content=png(mnist.test.x[0]),
                   headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
    finally:
        rt.admission.release(1)


# --------------------------------------------------------------------------- sample weights (FLOPs)
def test_a_sample_weighs_its_networks_flops(make_client):
    c = make_client(**FAST)
    rt = c.app.state.runtime
    shape = tuple(rt.input_spec.shape)
    base = _flops(rt.classifier, shape)
    smooth, den = _decider(rt, "smoothing"), _decider(rt, "denoised")
    f_smooth = max(_flops(smooth.eager_classifiers[s], shape) for s in smooth.sigmas)
    f_den = max(_flops(lambda z, s=s: rt.classifier(den.eager_denoisers[s](z)), shape) for s in den.sigmas)
    assert f_den > base  # the denoiser runs before the classifier on every sample
    assert rt.sample_weights["smoothing"] == {0: pytest.approx(f_smooth / base, abs=0.01)}
    assert rt.sample_weights["denoised"] == {0: pytest.approx(f_den / base, abs=0.01)}
    for w, exact in ((rt.sample_weights["smoothing"][0], f_smooth / base),
                     (rt.sample_weights["denoised"][0], f_den / base)):
        assert exact <= w < exact + 0.01  # rounded up: an upper bound
    assert rt.sample_weights["baseline"] == {} and rt.sample_weights["magnet"] == {}
    # per image at the same n: denoised costs more than smoothing by about the FLOP ratio
    opts = {"n": 10_000, "n0": 100, "certify": True}
    ratio = (rt.cost("denoised", 1, opts) - 1) / (rt.cost("smoothing", 1, opts) - 1)
    assert ratio == pytest.approx(f_den / f_smooth, rel=0.1)
    assert rt.cost("denoised", 1, opts) > rt.cost("smoothing", 1, opts)
    assert rt.cost("baseline", 1) == 1.0 and rt.cost("magnet", 1) == 3.0


def test_packaged_costs_match_the_operations_doc(default_bundle):
    """docs/operations.md's admission paragraph states what the runtime computes."""
    from service.runtime import Runtime
    from service.settings import load_settings

    rt = Runtime(load_settings(bundle=default_bundle, warmup=False))
    try:
        text = " ".join(DOCS.read_text().split())
        para = text[text.index("**Admission by cost.**"):text.index("**Limits**")]
        c = rt.settings.certify

        def units(value: float) -> str:
            return f"{value:,.0f}"

        for name in ("baseline", "magnet", "neuralfp", "defensegan", "rmc", "default", "smoothing", "denoised"):
            assert re.search(rf"`{name}`( and `\w+`)? {re.escape(units(rt.cost(name, 1)))}\b", para), name
        for n in (c.default_n, c.max_n):
            cost = rt.cost(c.pipeline, 1, {"n": n, "n0": c.default_n0, "certify": True})
            assert units(cost) in para, (n, cost)
        w = rt.sample_weights
        assert f"{w['smoothing'][0]:.2f}" in para and f"{w['denoised'][0]:.2f}" in para
    finally:
        rt.compute.close()
