"""GET/POST /certify and /predict on smoothing pipelines: real digits, real HTTP round trips."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from tests.conftest import png

PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def digits(mnist) -> list[tuple[bytes, int]]:
    test = mnist.test.per_class(1)
    return [(png(test.x[i]), int(test.y[i])) for i in range(len(test))]


def test_predict_on_smoothing_returns_a_radius(make_client, digits) -> None:
    client = make_client(warmup=False)
    certified = 0
    for body, y in digits[:6]:
        r = client.post("/predict?pipeline=smoothing", content=body, headers=PNG)
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["status"] in ("accepted", "abstained")
        if res["status"] == "accepted":
            assert res["certified_radius"] is not None and res["certified_radius"] >= 0
            certified += int(res["label"] == y and res["certified_radius"] > 0)
        else:
            assert res["label"] is None and res["certified_radius"] is None
    # the quick bundle's noisy classifier is trained per session: 4 of these 6 certify on one CPU
    # (one digit misread, one at pA 0.47); a spare for another CPU's kernels
    assert certified >= 3
    assert "shieldserve_certified_radius_count" in client.get("/metrics").text


def test_predict_certifies_at_the_target_radius(make_client, digits) -> None:
    client = make_client(warmup=False)
    files = [("file", (f"{i}.png", body, "image/png")) for i, (body, _) in enumerate(digits[:6])]
    r = client.post("/predict?pipeline=smoothing", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    settings = {d["defense"]: d["settings"] for p in client.get("/pipelines").json()["pipelines"]
                if p["name"] == "smoothing" for d in p["defenses"]}["smoothing"]
    target, n_max = settings["target_radius"], settings["n"]
    assert target == 0.5 and settings["sound_noise"] is True
    for res in results:  # each answer says the target, whether it was reached and what it cost
        assert res["target_radius"] == target and 0 < res["samples"] <= n_max + settings["n0"]
        # and the bound its radius holds with
        assert (res["alpha"], res["sigma"]) == (settings["alpha"], settings["sigma"])
        if res["certified"]:
            assert res["status"] == "accepted" and res["certified_radius"] >= target
        elif res["status"] == "accepted":
            assert res["certified_radius"] < target
    # the quick bundle trained here certifies about 4 of these 6 at r = 0.5 (one with pA near
    # 0.93 against the 0.84 needed, which the sequential test's early refusal misses in ~3e-4
    # of the service's random seeds): at least 3 leaves a margin for that and for other CPUs
    assert sum(r["certified"] for r in results) >= 3
    # easy digits stop long before the budget: a sequential test, not a fixed n
    assert min(r["samples"] for r in results if r["certified"]) < n_max
    # ?radius= asks another target; a small one is reached with fewer samples
    r = client.post("/predict?pipeline=smoothing&radius=0.1", content=digits[0][0], headers=PNG)
    small = r.json()["results"][0]
    assert r.status_code == 200 and small["target_radius"] == 0.1
    if small["certified"] and results[0]["certified"]:
        assert small["samples"] <= results[0]["samples"]
    for bad in ("-1", "abc", "nan", "11"):
        r = client.post(f"/predict?pipeline=smoothing&radius={bad}", content=digits[0][0], headers=PNG)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
    r = client.post("/predict?pipeline=baseline&radius=0.5", content=digits[0][0], headers=PNG)
    assert r.status_code == 422
    # -0.0 is 0.0 (it was echoed as -0.0, and cached under it for a later radius=0)
    r = client.post("/predict?pipeline=smoothing&radius=-0.0", content=digits[0][0], headers=PNG)
    assert r.status_code == 200 and str(r.json()["results"][0]["target_radius"]) == "0.0", r.text
    base = client.post("/predict?pipeline=baseline", content=digits[0][0], headers=PNG).json()["results"][0]
    assert base["target_radius"] is None and base["samples"] is None and base["certified"] is None
    assert base["alpha"] is None and base["sigma"] is None


def test_get_certify_after_predict_and_errors(make_client, digits) -> None:
    client = make_client(warmup=False, certify={"max_n": 5000, "default_n": 2000})
    body, y = digits[3]
    digest = hashlib.sha256(body).hexdigest()
    # unknown digest -> 404 before anything was posted
    r = client.get(f"/certify?image_sha256={digest}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_image"
    assert client.post("/predict?pipeline=smoothing", content=body, headers=PNG).status_code == 200
    r = client.get(f"/certify?image_sha256={digest}&n0=50&alpha=0.001")
    assert r.status_code == 200, r.text
    cert = r.json()
    for field in ("image_sha256", "pipeline", "label", "abstained", "radius", "p_a_lower", "sigma", "n0", "n",
                  "alpha", "samples", "seconds", "seed"):
        assert field in cert
    assert cert["image_sha256"] == digest and cert["pipeline"] == "smoothing"
    assert (cert["n"], cert["n0"], cert["samples"], cert["sigma"]) == (2000, 50, 2050, 0.5)  # the pipeline's sigma
    assert cert["label"] == y and not cert["abstained"] and cert["radius"] > 0 and not cert["cached"]
    # the same question again is answered from the cache
    again = client.get(f"/certify?image_sha256={digest}&n0=50&alpha=0.001").json()
    assert again["cached"] and again["radius"] == cert["radius"]
    assert cert["seed_chosen_by_client"] is False and again["seed_chosen_by_client"] is False
    # the recorded seed reproduces the certificate exactly (a fresh computation: seed is in the key)
    rep = client.get(f"/certify?image_sha256={digest}&n0=50&alpha=0.001&seed={cert['seed']}").json()
    assert not rep["cached"] and (rep["label"], rep["p_a_lower"], rep["radius"]) == \
        (cert["label"], cert["p_a_lower"], cert["radius"])
    # ... and says the seed was the client's (its alpha holds only for a seed not picked after
    # seeing results), also when answered from the cache
    assert rep["seed_chosen_by_client"] is True
    again = client.get(f"/certify?image_sha256={digest}&n0=50&alpha=0.001&seed={cert['seed']}").json()
    assert again["cached"] and again["seed_chosen_by_client"] is True
    # alpha: at the bound 1e-12 a certificate; below it (where scipy's bound is no bound) a 422
    r = client.get(f"/certify?image_sha256={digest}&n0=20&n=200&alpha=1e-12")
    assert r.status_code == 200 and r.json()["alpha"] == 1e-12, r.text
    for bad in ("9.9e-13", "1e-300", "5e-324", "0", "0.5"):
        r = client.get(f"/certify?image_sha256={digest}&alpha={bad}")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
        r = client.post(f"/certify?alpha={bad}", content=body, headers=PNG)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
    # n above the configured maximum, an unknown sigma, a pipeline without certificates
    r = client.get(f"/certify?image_sha256={digest}&n=5001")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    r = client.get(f"/certify?image_sha256={digest}&n0=10001")  # above certify.max_n0
    assert r.status_code == 422 and "max" in r.json()["error"]["message"]
    for bad in ("11", "inf", "nan", "-1"):  # a radius no budget could certify is refused, as on /predict
        r = client.get(f"/certify?image_sha256={digest}&radius={bad}")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
        r = client.post(f"/certify?radius={bad}", content=body, headers=PNG)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
    assert client.get(f"/certify?image_sha256={digest}&sigma=0.3").status_code == 422
    # the lower bounds and the seed's range, on GET and POST
    for bad in ("n=0", "n0=0", "sigma=0", "sigma=-1", "seed=-1", f"seed={2**63}"):
        r = client.get(f"/certify?image_sha256={digest}&{bad}")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
        r = client.post(f"/certify?{bad}", content=body, headers=PNG)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", bad
    two = client.post("/certify", files=[("file", ("a.png", body, "image/png")), ("file", ("b.png", body, "image/png"))])
    assert two.status_code == 422 and "one image" in two.json()["error"]["message"], two.text
    assert client.get(f"/certify?image_sha256={digest}&pipeline=baseline").status_code == 422
    assert client.get(f"/certify?image_sha256={digest}&pipeline=nope").status_code == 404
    assert client.get("/certify?image_sha256=xyz").status_code == 422


def test_post_certify_round_trip_and_target_radius(make_client, digits) -> None:
    client = make_client(warmup=False)
    body, y = digits[1]
    r = client.post("/certify?n=2000&sigma=0.5", content=body, headers=PNG)
    assert r.status_code == 200, r.text
    cert = r.json()
    assert cert["image_sha256"] == hashlib.sha256(body).hexdigest() and cert["sigma"] == 0.5
    assert cert["label"] == y and cert["radius"] > 0
    # the posted image is now in the store: GET finds it; radius= settles with fewer samples
    r = client.get(f"/certify?image_sha256={cert['image_sha256']}&radius=0.25&n=100000")
    assert r.status_code == 200, r.text
    seq = r.json()
    assert seq["certified"] is True and seq["radius"] >= 0.25 and seq["samples"] < 10_000
    # denoised smoothing through the plain classifier answers the same way
    r = client.post("/certify?pipeline=denoised&n=500&n0=20", content=body, headers=PNG)
    assert r.status_code == 200 and r.json()["pipeline"] == "denoised"


def test_post_certify_hashes_its_upload_off_the_event_loop(make_client, digits, monkeypatch) -> None:
    """As on /predict, the upload's sha256 is taken in the worker thread that decodes it."""
    import asyncio

    import service.api.predict as predict

    on_loop: list[bool] = []
    real = predict.upload_digests

    def spy(items):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(items)

    monkeypatch.setattr(predict, "upload_digests", spy)
    client = make_client(warmup=False)
    body, _ = digits[2]
    r = client.post("/certify?n=200&n0=20&sigma=0.5", content=body, headers=PNG)
    assert r.status_code == 200, r.text
    assert r.json()["image_sha256"] == hashlib.sha256(body).hexdigest()
    assert on_loop == [False], on_loop


class _NetworkStore:
    """A store whose calls block, as Redis's do (not in_process): each records whether it ran
    on the event loop's thread, and sleeps as a round trip would."""

    in_process = False

    def __init__(self) -> None:
        from service.store import MemoryStore

        self.inner, self.on_loop, self.calls = MemoryStore(), [], 0

    def _call(self, fn, *args):
        import asyncio
        import time

        try:
            asyncio.get_running_loop()
            self.on_loop.append(fn.__name__)
        except RuntimeError:
            pass
        self.calls += 1
        time.sleep(0.05)
        return fn(*args)

    def put_image(self, digest, x):
        return self._call(self.inner.put_image, digest, x)

    def get_image(self, digest):
        return self._call(self.inner.get_image, digest)

    def put_certificate(self, key, certificate):
        return self._call(self.inner.put_certificate, key, certificate)

    def get_certificate(self, key):
        return self._call(self.inner.get_certificate, key)


def test_a_store_that_blocks_is_never_called_on_the_event_loop(make_client, digits) -> None:
    # Redis's round trips (up to its timeout) must not hold the event loop: /predict, GET and
    # POST /certify call such a store from worker threads; the in-process store stays inline
    client = make_client(warmup=False, certify={"max_n": 5000, "default_n": 500})
    store = client.app.state.store = _NetworkStore()
    body, y = digits[2]
    digest = hashlib.sha256(body).hexdigest()
    assert client.post("/predict?pipeline=smoothing", content=body, headers=PNG).status_code == 200
    r = client.get(f"/certify?image_sha256={digest}&n0=20")
    assert r.status_code == 200 and r.json()["label"] == y, r.text
    assert client.get(f"/certify?image_sha256={digest}&n0=20").json()["cached"]
    other, _ = digits[4]
    assert client.post("/certify?n=500&n0=20", content=other, headers=PNG).status_code == 200
    # put, get, get_certificate, put_certificate, get_certificate (cached), put, get/put_certificate
    assert store.calls >= 8 and store.on_loop == []


def test_a_shared_certificate_cache_tells_differently_configured_pipelines_apart(quick_bundle, digits) -> None:
    # two replicas sharing one store (Redis in production), each with a pipeline named
    # `smoothing` but configured differently: neither is answered with the other's certificate
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings
    from service.store import MemoryStore

    store = MemoryStore()
    body, _ = digits[2]
    digest = hashlib.sha256(body).hexdigest()
    q = f"/certify?image_sha256={digest}&n0=20&n=200&seed=5"

    def app(**smoothing):
        pipes = {"smoothing": {"defenses": [{"defense": "smoothing", "sigma": 0.5, **smoothing}]}}
        return TestClient(create_app(load_settings(bundle=quick_bundle, warmup=False, pipelines=pipes), store=store))

    with app() as a, app(sound=False) as b:
        assert a.post("/predict?pipeline=smoothing", content=body, headers=PNG).status_code == 200
        assert not a.get(q).json()["cached"] and a.get(q).json()["cached"]
        assert not b.get(q).json()["cached"]  # same name, other settings: its own certificate
        assert b.get(q).json()["cached"]


def test_a_radius_beyond_the_budget_asks_only_for_the_label(make_client, digits) -> None:
    # r = 10 (and r = 3 at n = 100,000) cannot be certified by any count of the budget: known
    # before any sample, so each digit draws only what its label needs, not n_max
    client = make_client(warmup=False)
    files = [("file", (f"{i}.png", body, "image/png")) for i, (body, _) in enumerate(digits[:6])]
    n_max = {d["defense"]: d["settings"] for p in client.get("/pipelines").json()["pipelines"]
             if p["name"] == "smoothing" for d in p["defenses"]}["smoothing"]["n"]
    r = client.post("/predict?pipeline=smoothing&radius=10", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for res in results:
        assert res["certified"] is False and res["target_radius"] == 10
        if res["status"] == "accepted":
            assert 0 < res["certified_radius"] < 10
    # what the label needs: one look for an easy digit (a few dozen samples); a digit whose pA
    # is near 1/2 may still need many, so the margin is on most digits, not each (before the
    # change every digit drew n_max)
    samples = [res["samples"] for res in results]
    assert sum(n <= n_max // 4 for n in samples) >= 4, samples
    assert sum(res["label"] == y for res, (_, y) in zip(results, digits[:6])) >= 4
    body, y = digits[3]
    digest = hashlib.sha256(body).hexdigest()
    started = time.monotonic()
    r = client.get(f"/certify?image_sha256={digest}&n=100000&n0=10&radius=3")
    cert = r.json()
    assert r.status_code == 200 and cert["certified"] is False and cert["samples"] <= 100000 // 4, cert
    assert cert["label"] == y and 0 < cert["radius"] < 3
    assert time.monotonic() - started < 5


def test_certify_past_its_deadline_is_a_504_and_stops(make_client, digits) -> None:
    # with a 0.3 s deadline: a 504 soon after it, not an answer after the whole budget. The
    # largest CERTIFY (n0 = 10,000 drawn in batch_size chunks, then n = 100,000), and r = 1.85
    # at n = 100,000, whose first look is 70,506 samples (one draw of 70,506 copies, ~660 MB,
    # with no deadline check inside it before: now in batch_size chunks, checked between them)
    client = make_client(warmup=False)
    body, _ = digits[5]
    assert client.post("/certify?n=100&n0=10", content=body, headers=PNG).status_code == 200
    digest = hashlib.sha256(body).hexdigest()
    for query in ("n=100000&n0=10000", "n=100000&n0=10&radius=1.85"):
        started = time.monotonic()
        r = client.get(f"/certify?image_sha256={digest}&{query}", headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert time.monotonic() - started < 2, query


def test_certify_is_answered_at_its_deadline_and_holds_its_cost_until_the_work_stops(make_client, digits) -> None:
    """The sampling loop looks at the deadline between chunks of batch_size copies (~2 s a
    chunk on `denoised`): a 0.5 s deadline was answered after 2.3-2.5 s. The answer comes at the
    deadline; the loop is told to stop and its cost stays held until it has."""
    import threading

    from service.defenses.base import DeadlineExceeded

    client = make_client(warmup=False)
    body, _ = digits[5]
    runtime = client.app.state.runtime
    pipeline = runtime.pipelines["smoothing"]
    running, finish = threading.Event(), threading.Event()
    stopped_by: list[bool] = []

    def one_long_chunk(x, ctx):  # type: ignore[no-untyped-def]  # a chunk that outlasts the deadline
        running.set()
        finish.wait(10)
        stopped_by.append(ctx.cancelled())
        raise DeadlineExceeded("stopped")

    original = pipeline.run
    pipeline.run = one_long_chunk  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        r = client.post("/certify?n=1000&n0=10", content=body, headers={**PNG, "X-Request-Timeout": "0.5"})
        took = time.monotonic() - started
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert took < 2.5 and running.is_set(), took  # not the chunk's 10 s
        assert runtime.admission.cost_in_flight > 0  # held while the loop runs
        finish.set()
        deadline = time.monotonic() + 5
        while runtime.admission.cost_in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runtime.admission.cost_in_flight == 0 and stopped_by == [True]
    finally:
        finish.set()
        pipeline.run = original  # type: ignore[method-assign]


def test_without_pipeline_a_certify_pipeline_not_served_is_said_not_hidden(make_client, mnist, caplog,
                                                                           tmp_path) -> None:
    """certify.pipeline not served (removed, or left out by the quality gate): /certify without
    pipeline= fell back to default_pipeline quietly, and answered 422 "pipeline 'baseline' does
    not certify", a pipeline the client never named. Now start-up names the certifying pipeline it
    uses instead, or, where none certifies, the 422 says why."""
    import logging

    body = png(mnist.test.x[0])
    headers = {"content-type": "image/png"}
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        client = make_client(warmup=False, default_pipeline="baseline", certify={"pipeline": "gone"})
    assert any("certify.pipeline gone is not used (not configured); /certify without pipeline= uses default"
               in r.getMessage() for r in caplog.records)  # the first certifying one
    r = client.post("/certify?n=100", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["pipeline"] == "default"
    config = tmp_path / "c.yaml"  # every certifying pipeline removed
    config.write_text("default_pipeline: baseline\npipelines: {default: null, smoothing: null, denoised: null}\n")
    client = make_client(warmup=False, config=str(config))
    r = client.post("/certify?n=100", content=body, headers=headers)
    assert r.status_code == 422
    assert "certify.pipeline 'smoothing' is not served (not configured) and no served pipeline certifies" in \
        r.json()["error"]["message"]
    # served, but with no certificate (a config gave it other defenses): it answered a 422 that
    # said it was not served; the certifying default is used, and start-up says so
    caplog.clear()
    config.write_text("pipelines: {smoothing: {defenses: []}}\n")
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        client = make_client(warmup=False, config=str(config))
    assert any("certify.pipeline smoothing is not used (served, but it does not certify); /certify without "
               "pipeline= uses default" in r.getMessage() for r in caplog.records)
    r = client.post("/certify?n=100", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["pipeline"] == "default"
    config.write_text("default_pipeline: baseline\npipelines: {default: null, denoised: null, "
                      "smoothing: {defenses: []}}\n")
    r = make_client(warmup=False, config=str(config)).post("/certify?n=100", content=body, headers=headers)
    assert r.status_code == 422
    assert "certify.pipeline 'smoothing' does not certify and no served pipeline certifies" in \
        r.json()["error"]["message"]


def test_a_lower_bound_of_exactly_one_half_abstains(make_client, digits) -> None:
    """Cohen et al. give a label only when pA > 1/2 is shown: ten unanimous samples at alpha
    2^-10 bound pA below by exactly 0.5, which shows nothing (a label at radius 0 was served)."""
    client = make_client(warmup=False)
    for body, _ in digits[:3]:
        r = client.post("/certify?pipeline=smoothing&n=10&n0=10&alpha=0.0009765625", content=body, headers=PNG)
        assert r.status_code == 200, r.text
        cert = r.json()
        if cert["p_a_lower"] == 0.5:
            assert cert["abstained"] is True and cert["label"] is None and cert["status"] == "abstained"
        else:  # not unanimous: below one half
            assert cert["p_a_lower"] < 0.5 and cert["abstained"] is True


def test_a_shown_radius_never_exceeds_its_bound(make_client, digits) -> None:
    """The radius and the lower bound on pA are cut to 6 decimals, never rounded up: a shown
    radius above sigma * Phi^-1(p_a_lower) claimed more than the certificate shows (by up to
    5e-7 on 10 of 36 certificates, from a float32 copy and round-to-nearest)."""
    from scipy.stats import norm

    client = make_client(warmup=False)
    seen = 0
    for body, _ in digits:
        for n in (100, 137, 1000):
            cert = client.post(f"/certify?pipeline=smoothing&n={n}&n0=10", content=body, headers=PNG).json()
            if cert["abstained"]:
                continue
            seen += 1
            exact = cert["sigma"] * norm.ppf(cert["p_a_lower"])
            assert cert["radius"] <= exact and exact - cert["radius"] < 1.01e-6, (cert, exact)
    assert seen >= 10


def test_a_certified_answer_never_shows_a_radius_below_its_target() -> None:
    """`certified` is true exactly when the radius shown is >= the target: a radius of
    0.506110966866 (a unanimous first look of 49 samples) cut to 0.50611 was shown below a
    target of 0.5061109658659239 that it was certified at. The target is shown then (below the
    radius: still sound); anything else is cut to 6 decimals as before."""
    from service.api.render import render
    from service.pipeline import ImageResult

    target, radius = 0.5061109658659239, 0.506110966866

    def shown(certified: bool, r: float, t: float | None) -> float:
        cert = {"target_radius": t, "certified": certified, "samples": 49, "alpha": 0.001, "sigma": 0.5}
        out = render(ImageResult(status="accepted", label=1, confidence=0.99, certified_radius=r,
                                 details={"certificate": cert}))
        assert out.certified is certified and out.target_radius == t
        return out.certified_radius

    assert shown(True, radius, target) == target and target <= radius
    assert shown(True, 0.7123456789, 0.5) == 0.712345  # well above its target: cut as before
    assert shown(False, 0.4123456789, 0.5) == 0.412345  # not certified at the target
    assert shown(True, radius, None) == 0.50611


def test_the_v2_radius_tensor_never_rounds_a_radius_up() -> None:
    """/v2 carries the radius as FP32, whose nearest value to 0.1 (or 0.3) is above it."""
    from service.api.oip import _columns
    from service.pipeline import ImageResult

    radii = [0.1, 0.3, 0.545218, 1.350916, 0.0]
    results = [ImageResult(status="accepted", label=1, confidence=0.9, certified_radius=r) for r in radii]
    results.append(ImageResult(status="abstained"))
    dtype, column = _columns(results, 2)["certified_radius"]
    assert dtype == "FP32" and column[-1] == -1.0
    for shown, exact in zip(column[:-1], radii):
        assert float(shown) <= exact and exact - float(shown) < 1e-7


def test_a_resent_image_gets_the_same_noise_and_answer_alone_or_in_company(make_client, mnist) -> None:
    """/predict draws an image's noise from a keyed hash of the image and what it is asked, so
    resending it (alone, or beside other images) gives the same answer: a client cannot retry an
    image until a certificate that holds only with probability 1 - alpha per draw comes out
    wrong. Blends of two digits, whose pA is far from 1, are answered from different noise
    with different sample counts and radii when each request draws its own."""
    client = make_client(warmup=False)
    test = mnist.test.per_class(1)
    blends = [png(0.5 * test.x[i] + 0.5 * test.x[i + 1]) for i in range(0, 8, 2)]
    others = [("file", (f"o{i}.png", png(test.x[9 - i]), "image/png")) for i in range(3)]
    for body in blends:
        answers = []
        for _ in range(3):
            answers.append(client.post("/predict?pipeline=smoothing", content=body, headers=PNG).json()["results"][0])
        files = [others[0], ("file", ("b.png", body, "image/png")), *others[1:]]
        answers.append(client.post("/predict?pipeline=smoothing", files=files).json()["results"][1])
        # the same noise: the same answer, up to the float kernels another batch size picks (a
        # noisy copy within rounding of a decision boundary could be counted otherwise)
        assert len({(a["status"], a["label"], a["certified"]) for a in answers}) == 1, answers
        radii = [a["certified_radius"] or 0.0 for a in answers]
        assert max(radii) - min(radii) <= 0.01, answers


def test_an_images_seed_is_its_pixels_and_what_it_is_asked_not_its_format_or_company(mnist) -> None:
    """The keyed seed reads the image as the query monitor tells copies apart (8-bit pixels on
    the grid): a gray digit as an RGB PNG is the same image, with the same noise; in a batch its
    seed is its own; another noise level or key is another draw (what the decider passes as
    `asked` is the sigma and f alone: test_a_question_asked_another_way_gets_the_same_noise)."""
    import io

    from PIL import Image

    from models.bundle import InputSpec
    from service.defenses.smoothing import image_seeds
    from service.imaging import ImageLimits, decode_image

    spec, limits = InputSpec(shape=(1, 28, 28), class_names=tuple(str(i) for i in range(10))), ImageLimits()
    gray = png(mnist.test.x[0])
    buf = io.BytesIO()
    Image.open(io.BytesIO(gray)).convert("RGB").save(buf, format="PNG")
    a, b = decode_image(gray, spec, limits)[None], decode_image(buf.getvalue(), spec, limits)[None]
    key, asked = b"k" * 32, (0.5, 4000, 0, 0.001, 0.5, False)
    other = mnist.test.x[1:3]
    assert image_seeds(key, a, asked) == image_seeds(key, b, asked)
    assert image_seeds(key, torch.cat([other, a]), asked)[2] == image_seeds(key, a, asked)[0]
    assert image_seeds(key, a, asked) != image_seeds(key, a, (0.5, 4000, 0, 0.001, 0.75, False))
    assert image_seeds(key, a, asked) != image_seeds(b"j" * 32, a, asked)


def test_a_question_asked_another_way_gets_the_same_noise(make_client, mnist) -> None:
    """A client varying what it asks (a radius, alpha or budget jittered by 1e-12) gets no fresh
    draw of an image's noise: the seed is the same, and the same radius asked two ways gets the
    same certificate (the auditor's abstaining blend got a label 16 times in 30 so)."""
    client = make_client(warmup=False)
    test = mnist.test.per_class(1)
    body = png(0.5 * test.x[2] + 0.5 * test.x[3])

    def answer(query: str) -> tuple:
        r = client.post(f"/predict?pipeline=smoothing&{query}", files={"file": ("d.png", body, "image/png")})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        return res["status"], res["label"], res["certified"], res["samples"]

    base = answer("radius=0.5")
    for query in ("radius=0.500000000001", "radius=0.499999999999", "alpha=0.0010000000001", "n=3999"):
        assert answer(query) == base, query
    posted = [client.post(f"/certify?pipeline=smoothing&n=500&n0=20&{q}", content=body, headers=PNG).json()
              for q in ("alpha=0.001", "alpha=0.0010000000001", "n=501")]
    assert len({c["seed"] for c in posted}) == 1 and posted[0]["label"] == posted[1]["label"]
    # the same 500 copies, another alpha: the same count, so bounds 1e-13 of alpha apart
    assert posted[0]["p_a_lower"] == pytest.approx(posted[1]["p_a_lower"], abs=1e-9)


def test_a_certificate_the_cache_no_longer_holds_is_computed_from_the_same_noise(make_client, mnist, monkeypatch) -> None:
    """POST /certify without seed= draws an image's noise as /predict does, from a keyed hash of
    the image and what it is asked: with no cached copy (evicted, or a store that is down) the
    same request is answered from the same noise, seed included, not redrawn until it certifies."""
    client = make_client(warmup=False)
    store = client.app.state.store
    monkeypatch.setattr(store, "get_certificate", lambda key: None)
    test = mnist.test.per_class(1)
    body = png(0.5 * test.x[2] + 0.5 * test.x[3])
    first, second = (client.post("/certify?pipeline=smoothing&n=500&n0=20", content=body, headers=PNG).json()
                     for _ in range(2))
    assert not second.get("cached") and first["seed"] == second["seed"]
    assert (first["label"], first["radius"], first["p_a_lower"]) == (second["label"], second["radius"], second["p_a_lower"])
    chosen = client.post(f"/certify?pipeline=smoothing&n=500&n0=20&seed={first['seed']}", content=body, headers=PNG).json()
    assert chosen["seed_chosen_by_client"] is True and chosen["p_a_lower"] == first["p_a_lower"]  # reproduced


def test_replicas_sharing_the_monitor_secret_share_the_noise(make_client, mnist) -> None:
    """With the query monitor's secret set (docker-compose sets it), every replica and worker
    derives the same noise key: an image resent to another replica is answered from the same
    noise. Without it each process has its own key."""
    body = png(mnist.test.x[5])
    url = "/certify?pipeline=smoothing&n=200&n0=10"
    a, b = (make_client(warmup=False, query_monitor={"secret": "shared-secret-do-not-leak"}) for _ in range(2))
    first, second = (c.post(url, content=body, headers=PNG).json() for c in (a, b))
    assert first["seed"] == second["seed"] and first["p_a_lower"] == second["p_a_lower"]
    assert "shared-secret-do-not-leak" not in str(first)
    c, d = make_client(warmup=False), make_client(warmup=False)
    assert c.post(url, content=body, headers=PNG).json()["seed"] != d.post(url, content=body, headers=PNG).json()["seed"]
