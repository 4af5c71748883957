"""The request edge, audit 43: a keyless request's 401 comes before its body is read; a client
gone during its upload is `client_closed` and a 499; GET routes answer HEAD; /predict and
/certify refuse compressed bodies; /v2 reads every Content-Encoding line; /v2's UINT8 pixels are
the PNG path's float32 values, bit for bit."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png

KEY = "audit43-key-" + "q8" * 10
PNG = {"Content-Type": "image/png"}
INFER = "/v2/models/baseline/infer"


def _client(quick_bundle, tmp_path_factory, **overrides: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings
    from tests.live_server import config_file

    config = config_file(tmp_path_factory.mktemp("audit43"), {"baseline", "smoothing"}, default_pipeline="baseline")
    settings = load_settings(config, bundle=quick_bundle, log_level="warning", warmup=False, **overrides)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(quick_bundle, tmp_path_factory) -> Iterator[Any]:
    yield from _client(quick_bundle, tmp_path_factory, api_keys={"alice": hashlib.sha256(KEY.encode()).hexdigest()})


@pytest.fixture(scope="module")
def client(quick_bundle, tmp_path_factory) -> Iterator[Any]:
    yield from _client(quick_bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def digit(mnist) -> bytes:
    return png(mnist.test.x[0])


def _count(client: Any, pipeline: str, endpoint: str, outcome: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shieldserve_requests_total" and s.labels == {
                    "pipeline": pipeline, "endpoint": endpoint, "outcome": outcome}:
                return float(s.value)
    return 0.0


def _call(client: Any, method: str, path: str, headers: list[tuple[bytes, bytes]],
          messages: list[dict]) -> tuple[list[dict], int]:
    """Run one request through the whole app (every middleware) on the client's event loop,
    its `receive` handing out `messages` in turn (then a disconnect): what was sent back, and
    how many times `receive` was called."""
    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(b"host", b"testserver"), *headers],
             "client": ("192.0.2.43", 4343), "server": ("testserver", 80)}
    pending, sent, calls = list(messages), [], 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    client.portal.call(client.app, scope, receive, send)
    return sent, calls


# ------------------------------------------------------------------ 1. a keyless request's 401
@pytest.mark.parametrize("path, endpoint, pipeline", [
    ("/predict?pipeline=baseline", "predict", "baseline"), ("/certify?pipeline=smoothing", "certify", "smoothing"),
    (INFER, "infer", "baseline"), ("/v2/models/baseline/versions/1/infer", "infer", "baseline"),
    ("/v2/models/nope/infer", "infer", "unknown")])
def test_a_keyless_request_is_refused_before_its_body_is_read(keyed, path, endpoint, pipeline):
    """With api_keys set, a pipeline route's 401 comes from the headers alone: the body (8 MB
    declared) is never asked for, so a client without a key holds no memory; the 401 is the
    route dependency's (body, WWW-Authenticate, /v2 shape), counted as that counts it."""
    before = _count(keyed, pipeline, endpoint, "unauthorized")
    headers = [(b"content-type", b"image/png"), (b"content-length", b"8000000")]
    for credential in ([], [(b"x-api-key", b"not-a-known-key")]):
        sent, calls = _call(keyed, "POST", path, headers + credential,
                            [{"type": "http.request", "body": b"\0" * 65536, "more_body": True}])
        assert calls == 0, "the body was read before the 401"
        start = sent[0]
        assert start["type"] == "http.response.start" and start["status"] == 401, sent
        head = {k.lower(): v for k, v in start["headers"]}
        assert head[b"www-authenticate"].lower().startswith(b"bearer")
        assert head[b"connection"] == b"close"  # the unread body is not the connection's next request
        assert head[b"x-request-id"]
        error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
        if path.startswith("/v2"):
            assert isinstance(error, str) and error
        else:
            assert error["code"] == "unauthorized" and error["message"]
    assert _count(keyed, pipeline, endpoint, "unauthorized") == before + 2


@pytest.fixture(scope="module")
def keyed_behind_gateway(quick_bundle, tmp_path_factory) -> Iterator[Any]:
    """The keyed app with _call's client address (192.0.2.43) as its trusted proxy."""
    yield from _client(quick_bundle, tmp_path_factory, api_keys={"alice": hashlib.sha256(KEY.encode()).hexdigest()},
                       trusted_proxies=["192.0.2.0/24"], limits={"max_body_bytes": 100_000})


def test_a_refused_body_from_the_trusted_gateway_is_read_and_the_connection_kept(keyed_behind_gateway):
    """From a trusted proxy (nginx, which has the whole body buffered and is still sending it)
    the refused body is read and thrown away before the 401 or 413, which then keep the
    connection: answered with `Connection: close` and the body unread, nginx took the broken
    pipe for a failed replica and, keyless 8 MiB uploads 3 in 5 s, took every replica out
    (every client's request a 503). The body is read to its end, never past DRAIN_BYTES."""
    from service.api.middleware import DRAIN_BYTES

    part = {"type": "http.request", "body": b"\0" * 65536, "more_body": True}
    last = {"type": "http.request", "body": b"\0" * 100, "more_body": False}
    cases = [  # headers, the 401 or 413 expected
        ([(b"content-length", str(3 * 65536 + 100).encode())], 401),  # no key
        ([(b"x-api-key", KEY.encode()), (b"content-length", str(3 * 65536 + 100).encode())], 413),  # declared
        ([(b"x-api-key", KEY.encode())], 413),  # chunked: found past the limit while reading
    ]
    for headers, status in cases:
        sent, calls = _call(keyed_behind_gateway, "POST", "/predict?pipeline=baseline",
                            [(b"content-type", b"image/png"), *headers], [part, part, part, last])
        assert sent[0]["status"] == status, sent
        assert calls == 4, (status, calls)  # every part read, no more
        assert b"connection" not in {k.lower() for k, _ in sent[0]["headers"]}, sent[0]["headers"]
    # a body declared past DRAIN_BYTES is not read at all; one that goes on past it (chunked) is
    # read up to there; both then closed as for any client
    big = {"type": "http.request", "body": b"\0" * (1 << 20), "more_body": True}
    for headers, reads in (([(b"content-length", str(DRAIN_BYTES * 2).encode())], 0),
                           ([], DRAIN_BYTES // (1 << 20) + 1)):
        sent, calls = _call(keyed_behind_gateway, "POST", "/predict?pipeline=baseline",
                            [(b"content-type", b"image/png"), *headers], [big] * (DRAIN_BYTES // (1 << 20) + 5))
        assert sent[0]["status"] == 401 and calls == reads, (headers, calls)
        assert dict(sent[0]["headers"])[b"connection"] == b"close"


def test_a_request_with_a_key_is_served_as_before(keyed, digit):
    assert keyed.post("/predict?pipeline=baseline", content=digit, headers={**PNG, "X-API-Key": KEY}).status_code == 200
    r = keyed.post("/predict?pipeline=baseline", content=digit, headers=PNG)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].lower().startswith("bearer")


# ------------------------------------------------------------------ 2. gone during the upload
@pytest.mark.parametrize("path, endpoint", [("/predict?pipeline=baseline", "predict"), ("/certify", "certify"),
                                            (INFER, "infer"), ("/healthz", None)])
def test_a_client_gone_during_its_upload_is_client_closed_and_a_499(client, path, endpoint, access_records):
    before = _count(client, "unknown", endpoint, "client_closed") if endpoint else 0.0
    access_records.clear()  # the scrape's line
    sent, _ = _call(client, "POST", path, [(b"content-type", b"image/png"), (b"content-length", b"1000")],
                    [{"type": "http.request", "body": b"x" * 10, "more_body": True},
                     {"type": "http.disconnect"}])
    assert sent == []  # nobody to answer
    assert [r.status for r in access_records] == [499]
    if endpoint:
        assert _count(client, "unknown", endpoint, "client_closed") == before + 1


# ------------------------------------------------------------------ 3. HEAD on GET routes
HEAD_ROUTES = ["/healthz", "/readyz", "/pipelines", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2",
               "/v2/models/baseline", "/v2/models/baseline/ready", "/v2/models/nope"]


@pytest.mark.parametrize("path", HEAD_ROUTES)
def test_get_routes_answer_head_without_a_body(client, path):
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code and head.status_code in (200, 404), head.status_code
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_routes_leave_the_openapi_document_as_it_was(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/readyz", "/pipelines", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2",
                 "/v2/models/{model}", "/v2/models/{model}/ready"):
        assert set(paths[path]) == {"get"}, (path, set(paths[path]))
    assert paths["/healthz"]["get"]["operationId"] == "healthz_healthz_get"


# ------------------------------------------------------------------ 4. compressed images
@pytest.mark.parametrize("route", ["/predict?pipeline=baseline", "/certify?pipeline=smoothing&n=1&n0=1"])
def test_predict_and_certify_refuse_a_compressed_body(client, digit, route):
    """Neither inflates: any Content-Encoding but identity, on any line, is a 415 (a gzipped PNG
    was a 400 invalid_image, a plain PNG labelled br a 200)."""
    cases = [([("Content-Encoding", c)], digit) for c in ("gzip", "br", "x-whatever", "identity, gzip")]
    cases += [([("Content-Encoding", "gzip")], gzip.compress(digit)),
              ([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")], digit)]
    for encoding, body in cases:
        r = client.post(route, content=body, headers=[("Content-Type", "image/png"), *encoding])
        assert r.status_code == 415, (encoding, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "unsupported_media_type"
    for encoding in ([], [("Content-Encoding", "identity")],
                     [("Content-Encoding", "Identity"), ("Content-Encoding", "")]):
        r = client.post(route, content=digit, headers=[("Content-Type", "image/png"), *encoding])
        assert r.status_code == 200, (encoding, r.text[:200])


@pytest.mark.parametrize("route", ["/predict?pipeline=baseline", "/certify?pipeline=smoothing&n=1&n0=1"])
def test_two_content_type_lines_are_refused_whatever_their_order(client, digit, route):
    """Only the first line was read: `text/plain` then `image/png` was a 415, the other order a
    200 (stop 49's audit). Two lines are one 400, in either order, as for one line of each."""
    for first, second in (("text/plain", "image/png"), ("image/png", "text/plain"), ("image/png", "image/png")):
        r = client.post(route, content=digit, headers=[("Content-Type", first), ("Content-Type", second)])
        assert r.status_code == 400, (first, second, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "bad_request" and "Content-Type" in r.json()["error"]["message"]
    assert client.post(route, content=digit, headers=[("Content-Type", "image/png")]).status_code == 200


# ------------------------------------------------------------------ 5. every Content-Encoding line
def test_v2_reads_every_content_encoding_line(client, mnist):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                   "data": mnist.test.x[0].flatten().tolist()}]}).encode()
    ok = client.post(INFER, content=gzip.compress(body), headers=[("Content-Encoding", "gzip")])
    assert ok.status_code == 200, ok.text
    for lines, sent in ([("gzip", "gzip"), gzip.compress(gzip.compress(body))], [("gzip", "br"), gzip.compress(body)],
                        [("gzip", "identity"), gzip.compress(body)]):
        r = client.post(INFER, content=sent, headers=[("Content-Encoding", line) for line in lines])
        # as the same list on one line ("gzip, br"): one coding is accepted, not a list
        one_line = client.post(INFER, content=sent, headers={"Content-Encoding": ", ".join(lines)})
        assert r.status_code == one_line.status_code == 415, (lines, r.status_code, r.text)
        assert isinstance(r.json()["error"], str)


# ------------------------------------------------------------------ 6. UINT8 as the PNG path
def test_v2_uint8_pixels_are_the_png_paths_float32_values(client):
    """Every 8-bit value reaches the model as the same float32 from /v2 UINT8 as from a gray PNG
    (imaging divides by 255; `* (1/255)` differed in the last bit for 126 of them), so the query
    monitor's exact-repeat digest sees one image either way."""
    from service.api.oip import InferRequest, _decode_input
    from service.imaging import decode_image

    rt = client.app.state.runtime
    c, h, w = rt.input_spec.shape
    assert c == 1 and h * w >= 256
    pixels = (np.arange(h * w) % 256).astype(np.uint8).reshape(h, w)  # every 8-bit value
    assert len(np.unique(pixels)) == 256
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    from_png = decode_image(buf.getvalue(), rt.input_spec, rt.image_limits)
    req = InferRequest.model_validate({"inputs": [{"name": "input", "shape": [1, h * w], "datatype": "UINT8",
                                                   "data": pixels.flatten().tolist()}]})
    from_json = _decode_input(req, b"", rt)[0]
    binary = InferRequest.model_validate({"inputs": [{"name": "input", "shape": [1, c, h, w], "datatype": "UINT8",
                                                      "parameters": {"binary_data_size": h * w}}]})
    from_binary = _decode_input(binary, pixels.tobytes(), rt)[0]
    assert from_png.dtype == from_json.dtype == from_binary.dtype == torch.float32
    bits = from_png.numpy().view(np.uint32)
    assert np.array_equal(from_json.numpy().view(np.uint32), bits)
    assert np.array_equal(from_binary.numpy().view(np.uint32), bits)
