"""HTTP round trips on /predict, /pipelines, health and metrics, with real digits."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.conftest import png


def _files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]


def test_predict_multipart_many_files_answers_per_contract(make_client, mnist):
    import hashlib

    c = make_client()
    sub = mnist.test.per_class(3)
    images = [png(x) for x in sub.x]
    r = c.post("/predict?pipeline=baseline", files=_files(images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pipeline"] == "baseline" and body["model_version"] and body["request_id"]
    assert r.headers["x-request-id"] == body["request_id"]
    assert len(body["results"]) == 30
    for res, data in zip(body["results"], images):
        assert res["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert res["status"] == "accepted" and res["certified_radius"] is None and res["rejected_by"] == []
        assert res["class_name"] == str(res["label"]) and 0 < res["confidence"] <= 1
    labels = torch.tensor([res["label"] for res in body["results"]])
    assert float((labels == sub.y).float().mean()) >= 0.6  # the quick classifier reads real digits


def test_predict_raw_body_and_default_pipeline(make_client, mnist):
    c = make_client()
    r = c.post("/predict", content=png(mnist.test.x[0]), headers={"content-type": "image/png",
                                                                    "x-request-id": "client-42"})
    assert r.status_code == 200
    assert r.json()["pipeline"] == "default" and r.json()["request_id"] == "client-42"


@pytest.mark.parametrize("body,ctype,status,code", [
    (b"", "image/png", 400, "invalid_image"),
    (b"\x89PNG\r\n\x1a\n-truncated", "image/png", 400, "invalid_image"),
    (b"hello", "text/plain", 415, "unsupported_media_type"),
    (b"GIF89a" + b"\0" * 20, "image/gif", 415, "unsupported_media_type"),
])
def test_malformed_uploads_answer_4xx_with_codes(make_client, body, ctype, status, code):
    r = make_client().post("/predict?pipeline=baseline", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_unknown_pipeline_is_404(make_client, mnist):
    r = make_client().post("/predict?pipeline=nope", content=png(mnist.test.x[0]),
                           headers={"content-type": "image/png"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_pipeline"


def test_multipart_without_file_part_is_400(make_client):
    r = make_client().post("/predict", data={"note": "hi"}, files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"


def test_body_limit_413_with_and_without_content_length(make_client, mnist):
    c = make_client(limits={"max_body_bytes": 2000})
    big = b"\0" * 5000
    r = c.post("/predict", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():
        for _ in range(5):
            yield b"\0" * 1000

    r = c.post("/predict", content=chunks(), headers={"content-type": "image/png"})  # chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_too_many_images_is_413(make_client, mnist):
    c = make_client(limits={"max_images_per_request": 2})
    r = c.post("/predict", files=_files([png(x) for x in mnist.test.x[:3]]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_pixel_limit_checked_before_decoding(make_client):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    c = make_client(limits={"max_pixels": 1_000_000})
    r = c.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_resize_reject_policy_is_422(make_client):
    from service.imaging import encode_png

    c = make_client(limits={"resize": "reject"})
    r = c.post("/predict", content=encode_png(torch.rand(1, 20, 20)), headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"


def test_pipelines_health_and_unknown_route(make_client):
    c = make_client()
    p = c.get("/pipelines").json()
    assert p["default"] == "default" and {x["name"] for x in p["pipelines"]} >= {"baseline", "default"}
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.get("/readyz").status_code == 200
    r = c.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = c.get("/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_metrics_count_predict_requests_by_outcome(make_client, mnist):
    c = make_client()
    for _ in range(3):
        c.post("/predict?pipeline=baseline", content=png(mnist.test.x[0]), headers={"content-type": "image/png"})
    c.post("/predict?pipeline=baseline", content=b"", headers={"content-type": "image/png"})
    text = c.get("/metrics").text
    assert 'shieldserve_requests_total{endpoint="predict",outcome="accepted",pipeline="baseline"} 3.0' in text
    assert 'shieldserve_requests_total{endpoint="predict",outcome="error",pipeline="baseline"} 1.0' in text
    assert 'shieldserve_batch_size_count{pipeline="baseline"} 3.0' in text
    assert "shieldserve_request_duration_seconds_bucket" in text and "shieldserve_inflight_requests" in text
    for forbidden in ("sha256", "request_id"):
        assert forbidden not in text


def _asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_batcher_merges_concurrent_requests(quick_bundle, mnist):
    from service.app import create_app
    from service.settings import load_settings

    app = create_app(load_settings(bundle=quick_bundle, warmup=False,
                                   batching={"max_batch_size": 64, "max_delay_ms": 50}))
    app.state.runtime.ready = True
    images = [png(x) for x in mnist.test.x[:16]]

    async def go():
        async with _asgi_client(app) as client:
            rs = await asyncio.gather(*[client.post("/predict?pipeline=baseline", content=b,
                                                    headers={"content-type": "image/png"}) for b in images])
            return rs, (await client.get("/metrics")).text

    rs, text = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    count = float(next(l for l in text.splitlines() if l.startswith('shieldserve_batch_size_count{pipeline="baseline"}')).split()[-1])
    total = float(next(l for l in text.splitlines() if l.startswith('shieldserve_batch_size_sum{pipeline="baseline"}')).split()[-1])
    assert total == 16 and count < 16  # fewer batches than requests: they were merged
    # the same image answers the same whether batched or alone
    alone = asyncio.run(_one(app, images[0]))
    assert alone["results"][0]["label"] == rs[0].json()["results"][0]["label"]


async def _one(app, image: bytes) -> dict:
    async with _asgi_client(app) as client:
        return (await client.post("/predict?pipeline=baseline", content=image, headers={"content-type": "image/png"})).json()


def test_full_queue_answers_503_overloaded_with_retry_after(quick_bundle, mnist):
    from service.app import create_app
    from service.settings import load_settings

    app = create_app(load_settings(bundle=quick_bundle, warmup=False,
                                   batching={"max_batch_size": 1, "max_delay_ms": 0, "max_queue": 2,
                                             "retry_after_s": 3},
                                   limits={"max_images_per_request": 2}))  # at most the queue (Settings)
    images = [png(x) for x in mnist.test.x[:40]]

    async def go():
        async with _asgi_client(app) as client:
            return await asyncio.gather(*[client.post("/predict?pipeline=baseline", content=b,
                                                      headers={"content-type": "image/png"}) for b in images])

    rs = asyncio.run(go())
    codes = [r.status_code for r in rs]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    over = next(r for r in rs if r.status_code == 503)
    assert over.json()["error"]["code"] == "overloaded" and over.headers["retry-after"] == "3"


def test_openapi_schema_documents_routes(make_client):
    spec = make_client().get("/openapi.json").json()
    assert "/predict" in spec["paths"] and "/pipelines" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_decisions_come_from_the_optimised_classifier_and_match_the_eager_network(make_client, mnist):
    """The served argmax runs the TorchScript-frozen decision (classifier, softmax and max in one
    call); it answers what the eager classifier answers on real digits (labels equal,
    confidences within float rounding), and optimize_classifier=false serves the eager network."""
    sub = mnist.test.per_class(4)
    images = [png(x) for x in sub.x]
    answers = {}
    seven = torch.nn.functional.one_hot(torch.tensor(7), 10).float()

    def always_seven(x):
        n = x.shape[0]
        return seven.expand(n, 10), torch.ones(n), torch.full((n,), 7)

    def labels_of(c, k):
        r = c.post("/predict?pipeline=baseline", files=_files(images[:k]))
        assert r.status_code == 200, r.text
        return [res["label"] for res in r.json()["results"]]

    for optimize in (True, False):
        c = make_client(optimize_classifier=optimize)
        runtime = c.app.state.runtime
        pipe = runtime.pipelines["baseline"]
        if optimize:
            assert isinstance(runtime.inference_classifier, torch.jit.ScriptModule)
            assert isinstance(runtime.argmax_decision, torch.jit.ScriptModule)
            assert pipe.inference_classifier is runtime.inference_classifier
            assert pipe.argmax_decision is runtime.argmax_decision
        else:
            assert runtime.inference_classifier is None and pipe.inference_classifier is None
            assert runtime.argmax_decision is None and pipe.argmax_decision is None
        r = c.post("/predict?pipeline=baseline", files=_files(images))
        assert r.status_code == 200, r.text
        answers[optimize] = r.json()["results"]
        with torch.no_grad():  # the digits through the eager network
            eager = torch.softmax(runtime.classifier(sub.x), dim=1)
        labels = torch.tensor([res["label"] for res in answers[optimize]])
        confidence = torch.tensor([res["confidence"] for res in answers[optimize]])
        assert torch.equal(labels, eager.argmax(1))
        assert float((confidence - eager.max(1).values).abs().max()) < 1e-3  # PNG moves pixels < 1/510
        if optimize:  # and the decision really is the compiled one: a stand-in that says 7 is obeyed
            fused = pipe.argmax_decision
            pipe.argmax_decision = always_seven
            try:
                assert labels_of(c, 5) == [7] * 5
                # without the compiled decision, the optimised classifier decides
                pipe.argmax_decision, fast = None, pipe.inference_classifier
                pipe.inference_classifier = lambda x: seven.expand(x.shape[0], 10) * 9
                try:
                    assert labels_of(c, 5) == [7] * 5
                finally:
                    pipe.inference_classifier = fast
            finally:
                pipe.argmax_decision = fused
            assert labels_of(c, 5) == [a["label"] for a in answers[True][:5]]
    assert [a["label"] for a in answers[True]] == [a["label"] for a in answers[False]]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(answers[True], answers[False])) < 1e-4


def test_a_broken_small_png_is_a_400_and_the_next_request_is_fine(make_client, mnist):
    c = make_client()
    digit = png(mnist.test.x[0])
    broken = digit[:40] + bytes(b ^ 0x5A for b in digit[40:-12]) + digit[-12:]  # IDAT garbled, header intact
    r = c.post("/predict?pipeline=baseline", content=broken, headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    r = c.post("/predict?pipeline=baseline", files=_files([digit, broken]))
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("file 1:"), r.text
    r = c.post("/predict?pipeline=baseline", content=digit, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] is not None
    # a part whose declared type is refused is named by its index too (the 415 named none)
    r = c.post("/predict?pipeline=baseline", files=[*_files([digit, digit]), ("file", ("2.txt", b"hi", "text/plain"))])
    assert r.status_code == 415 and r.json()["error"]["message"].startswith("file 2: content type 'text/plain'"), r.text


def test_an_unexpected_failure_in_predict_is_a_logged_500_and_the_next_request_is_fine(make_client, mnist, caplog):
    """An exception the handler does not map becomes the contract's JSON 500 with the request
    id (answered inside RequestIdMiddleware), logged, and counted as an error."""
    c = make_client()
    runtime = c.app.state.runtime
    digit = png(mnist.test.x[0])
    real = runtime.classify

    async def broken(*args, **kwargs):
        raise RuntimeError("secret detail that must not reach the client")

    runtime.classify = broken
    try:
        with caplog.at_level("ERROR", logger="shieldserve"):
            r = c.post("/predict?pipeline=baseline", content=digit, headers={"content-type": "image/png"})
    finally:
        runtime.classify = real
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret detail" not in r.text and r.headers.get("x-request-id")
    assert any("unhandled error on POST /predict" in rec.getMessage() for rec in caplog.records)
    metrics = c.get("/metrics").text
    assert 'shieldserve_requests_total{endpoint="predict",outcome="error",pipeline="baseline"} 1.0' in metrics
    r = c.post("/predict?pipeline=baseline", content=digit, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == int(mnist.test.y[0])


def test_fastapi_telemetry_is_off_unless_asked_for(make_client):
    c = make_client()
    telemetry = c.app._telemetry  # FastAPI's native OpenTelemetry: off unless asked for
    assert not (telemetry["tracing"] or telemetry["metrics"] or telemetry["logs"])
    c = make_client(fastapi_telemetry=True)
    assert c.app._telemetry["tracing"] and c.app._telemetry["metrics"]
    assert c.get("/healthz").status_code == 200


def test_building_apps_changes_no_process_wide_state(make_client):
    """Thread counts and interpreter settings belong to the server's entry point
    (service/server.py); an app or runtime built in a process leaves them as they were."""
    import sys

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    make_client(torch_threads=threads + 1)
    make_client()
    assert torch.get_num_threads() == threads and sys.getswitchinterval() == interval


@pytest.mark.parametrize("sent", [4, 10])
def test_far_too_many_images_is_413_too(make_client, mnist, sent):
    # Starlette stops reading at the parser's file limit (max_images_per_request + 1), so the
    # count is "more than the limit", not the number sent
    c = make_client(limits={"max_images_per_request": 2})
    r = c.post("/predict", files=_files([png(x) for x in mnist.test.x[:sent]]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    assert "more than 2 images" in r.json()["error"]["message"]


def test_a_multipart_body_of_many_text_fields_is_refused_unread(make_client, mnist):
    # text fields cost the parser memory and time and carry nothing we read: past MAX_FORM_FIELDS
    # the body is a 400 before any image is decoded
    from service.api.predict import MAX_FORM_FIELDS

    c = make_client()
    fields = {f"f{i}": "x" for i in range(MAX_FORM_FIELDS + 1)}
    r = c.post("/predict", data=fields, files=_files([png(mnist.test.x[0])]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    assert "fields" in r.json()["error"]["message"]
    fields = {f"f{i}": "x" for i in range(MAX_FORM_FIELDS - 1)}
    assert c.post("/predict", data=fields, files=_files([png(mnist.test.x[0])])).status_code == 200


def test_metrics_are_collected_off_the_event_loop(quick_bundle):
    # a gauge callback that blocks (the query monitor's blocked count asks Redis, which may be
    # slow or down) must not hold up the other requests of the loop
    import time as _time

    from service.app import create_app
    from service.settings import load_settings

    app = create_app(load_settings(bundle=quick_bundle, warmup=False))
    app.state.runtime.ready = True
    app.state.runtime.metrics.blocked_clients.set_function(lambda: _time.sleep(2.0) or 0)

    async def go():
        async with _asgi_client(app) as client:
            t0 = _time.monotonic()
            scrape = asyncio.ensure_future(client.get("/metrics"))
            await asyncio.sleep(0.1)  # the scrape is collecting (on the loop, this sleep would last 2 s)
            health = await client.get("/healthz")
            return health, _time.monotonic() - t0, await scrape

    health, seconds, scrape = asyncio.run(go())
    assert health.status_code == 200 and scrape.status_code == 200
    assert seconds < 1.5, seconds  # /healthz answered while the scrape was still collecting


def test_an_unknown_pipeline_is_named_cut_short(make_client, mnist) -> None:
    """The 404 quotes the client's pipeline name cut to 80 characters (as /v2 does), not whole."""
    client = make_client(warmup=False)
    long = "p" * 5000
    for r in (client.post(f"/predict?pipeline={long}", content=png(mnist.test.x[0]),
                          headers={"content-type": "image/png"}),
              client.get(f"/certify?pipeline={long}&image_sha256={'0' * 64}")):
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_pipeline", r.text
        assert len(r.text) < 600 and "ppp..." in r.json()["error"]["message"]
