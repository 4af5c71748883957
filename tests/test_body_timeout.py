"""A request body that stops arriving is answered, and its connection closed: 408
`request_timeout` after `limits.body_idle_timeout_s` without a part, 504 `deadline_exceeded`
when the request's deadline (X-Request-Timeout, counted from its arrival) comes first, on
/predict, /certify and /v2 infer. A route that takes no body (health, metadata, admin, a path
with no route) reads at most NO_BODY_BYTES (64 KiB) of one: a larger one is 413 from its
headers, unread, so a client without a key holds no more than that there either (before: up to
max_body_bytes on every path, for as long as it stalled). Over real sockets (a uvicorn
server in a thread, as `shieldserve serve` configures it) and, for what is read, through the
app's ASGI interface."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png
from tests.live_server import config_file, live_server

KEY = "body-timeout-key-" + "z7" * 10
IDLE_S = 1.0
BODY = 8 * 1024 * 1024  # what the clients below say they will send: the body limit
# an image the baseline pipeline classifies (any 28x28 one; MNIST takes ~10 s to load)
DIGIT = png(torch.linspace(0, 1, 28 * 28).reshape(1, 28, 28))


@pytest.fixture(scope="module")
def server(quick_bundle, tmp_path_factory) -> Iterator[tuple[str, Any]]:
    """Keys on, a short idle timeout; the other limits as packaged (8 MiB bodies)."""
    from service.settings import load_settings

    config = config_file(tmp_path_factory.mktemp("body_timeout"), {"baseline"}, default_pipeline="baseline")
    settings = load_settings(config, bundle=quick_bundle, warmup=False, log_level="warning",
                             api_keys={"ci": hashlib.sha256(KEY.encode()).hexdigest()},
                             limits={"body_idle_timeout_s": IDLE_S})
    with live_server(settings) as running:
        yield running


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _head(path: str, length: int = BODY, key: bool = True, **extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: image/png", f"Content-Length: {length}"]
    lines += [f"X-API-Key: {KEY}"] if key else []
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket, closing: bool = True) -> tuple[int, dict[str, str], bytes, bool]:
    """The response (status, headers, body) and, `closing`, whether the server then closed the
    connection (end of stream within 2 s of the response)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"closed without an answer: {data!r}"
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
    while len(body) < int(headers["content-length"]):
        part = sock.recv(65536)
        assert part, "closed in the middle of the response"
        body += part
    sock.settimeout(2)
    try:
        closed = closing and sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    sock.close()
    return int(head.split(b" ", 2)[1]), headers, body, closed


def _count(url: str, endpoint: str, outcome: str) -> float:
    import httpx

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "shieldserve_requests_total" and s.labels == {
                    "pipeline": "unknown", "endpoint": endpoint, "outcome": outcome}:
                return s.value
    return 0.0


# ------------------------------------------------------------------ a stalled body
@pytest.mark.parametrize("path, endpoint", [("/predict?pipeline=baseline", "predict"),
                                            ("/v2/models/baseline/infer", "infer")])
def test_a_body_that_stalls_is_408_and_the_connection_closed(server, path, endpoint):
    """Half of an image, then nothing: 408 `request_timeout` after the idle timeout (the
    request's deadline, 60 s, is far), in the route's error shape; the connection closed, the
    rest of the body never read. Before, nothing was ever answered."""
    url, _ = server
    before = _count(url, endpoint, "error")
    body = DIGIT
    sock = _connect(url)
    started = time.monotonic()
    sock.sendall(_head(path, len(body)) + body[: len(body) // 2])
    status, headers, payload, closed = _answer(sock)
    took = time.monotonic() - started
    assert status == 408, payload
    assert IDLE_S * 0.9 <= took < IDLE_S + 2, took
    assert headers["connection"] == "close" and closed
    error = json.loads(payload)["error"]
    if path.startswith("/v2"):
        assert isinstance(error, str) and "stopped arriving" in error
    else:
        assert error["code"] == "request_timeout" and "1 s" in error["message"]
    assert headers["x-request-id"]
    assert _count(url, endpoint, "error") == before + 1  # a refused request, as a 413 is


def test_a_deadline_before_the_idle_timeout_is_504(server):
    """X-Request-Timeout counts from the request's arrival, reading included: a body that
    stalls is 504 `deadline_exceeded` at the deadline, though the idle timeout is longer. It is
    counted as the client's (`client_deadline`): the server only waited for its bytes."""
    url, _ = server
    before = _count(url, "predict", "client_deadline")
    body = DIGIT
    sock = _connect(url)
    started = time.monotonic()
    sock.sendall(_head("/predict?pipeline=baseline", len(body), X_Request_Timeout="300ms") + body[:50])
    status, headers, payload, closed = _answer(sock)
    took = time.monotonic() - started
    assert status == 504 and json.loads(payload)["error"]["code"] == "deadline_exceeded", payload
    assert 0.25 <= took < IDLE_S * 0.9, took  # the deadline's answer, not the idle timeout's
    assert headers["connection"] == "close" and closed
    assert _count(url, "predict", "client_deadline") == before + 1


def test_the_deadline_bounds_a_body_that_trickles(server):
    """A part every 0.3 s never trips the 1 s idle timeout; the deadline (X-Request-Timeout: 1)
    still ends the read at 1 s: a client cannot hold its upload's memory longer by trickling."""
    url, _ = server
    body = DIGIT
    sock = _connect(url)
    started = time.monotonic()
    sock.sendall(_head("/predict?pipeline=baseline", len(body), X_Request_Timeout="1") + body[:10])
    sent = 10
    sock.settimeout(0.3)
    data = b""
    while not data and time.monotonic() - started < 5:
        try:
            data = sock.recv(65536, socket.MSG_PEEK)
        except TimeoutError:
            if sent < len(body) - 1:
                sock.sendall(body[sent:sent + 1])
                sent += 1
    sock.settimeout(10)
    status, headers, payload, closed = _answer(sock)
    took = time.monotonic() - started
    assert status == 504 and json.loads(payload)["error"]["code"] == "deadline_exceeded", payload
    assert "still arriving" in json.loads(payload)["error"]["message"]
    assert 0.9 <= took < 2.5, took
    assert headers["connection"] == "close" and closed


def test_a_whole_body_is_served_as_before(server):
    """A body that arrives in parts, each within the idle timeout, is served; so is one with a
    short deadline that it meets."""
    url, _ = server
    body = DIGIT
    sock = _connect(url)
    sock.sendall(_head("/predict?pipeline=baseline", len(body), X_Request_Timeout="5") + body[:50])
    time.sleep(IDLE_S / 2)
    sock.sendall(body[50:])
    status, _, payload, _ = _answer(sock, closing=False)
    assert status == 200 and json.loads(payload)["results"][0]["status"] == "accepted", payload


def test_the_request_duration_includes_the_upload(server):
    """shieldserve_request_duration_seconds times a request from its arrival, as a refused
    one's is timed and as its deadline counts: an answered request's clock started in its
    handler, so an upload of 0.6 s was observed as a few ms."""
    import httpx

    url, _ = server

    def observed() -> tuple[float, float]:
        got = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for s in family.samples:
                if s.labels == {"pipeline": "baseline", "endpoint": "predict"} and s.name in (
                        "shieldserve_request_duration_seconds_sum", "shieldserve_request_duration_seconds_count"):
                    got[s.name.rsplit("_", 1)[1]] = s.value
        return got.get("sum", 0.0), got.get("count", 0.0)

    before = observed()
    sock = _connect(url)
    sock.sendall(_head("/predict?pipeline=baseline", len(DIGIT)) + DIGIT[:50])
    time.sleep(0.6)
    sock.sendall(DIGIT[50:])
    status, _, payload, _ = _answer(sock, closing=False)
    assert status == 200, payload
    after = observed()
    assert after[1] == before[1] + 1 and after[0] - before[0] >= 0.55, (before, after)


# ------------------------------------------------------------------ routes that take no body
@pytest.mark.parametrize("path", ["/healthz", "/admin/rmc/reset?pipeline=baseline", "/no/such/route",
                                  "/v2/models/baseline", "/metrics"])
def test_a_keyless_upload_to_a_route_without_a_body_is_answered_from_its_headers(server, path):
    """An 8 MiB body declared to a route that takes none, by a client without a key: 413 at
    once, before a byte of it is sent, closed, so none of it is held (before: read up to the
    8 MiB limit on every path, then held as long as the client stalled)."""
    url, _ = server
    sock = _connect(url)
    started = time.monotonic()
    sock.sendall(_head(path, key=False))
    status, headers, payload, closed = _answer(sock)
    assert status == 413 and time.monotonic() - started < 5, payload  # no byte of the body was sent
    assert headers["connection"] == "close" and closed
    error = json.loads(payload)["error"]
    message = error if path.startswith("/v2") else error["message"]
    assert "takes no request body" in message
    if not path.startswith("/v2"):
        assert error["code"] == "payload_too_large"


def test_a_small_body_on_a_route_without_one_is_ignored(server):
    """Up to NO_BODY_BYTES of a body on such a route is read and ignored: the route answers as
    it would without it (clients that POST `{}` to an admin route keep working)."""
    from service.api.middleware import NO_BODY_BYTES

    url, _ = server
    for length, expected in ((2, 403), (NO_BODY_BYTES, 403), (NO_BODY_BYTES + 1, 413)):
        sock = _connect(url)
        # the admin route without its key: 403 (no admin_api_key), answered only once the body is in
        sock.sendall(_head("/admin/query-monitor/unblock?client=ip:192.0.2.1", length, key=False)
                     + ((b"{}" + b" " * (length - 2)) if length <= NO_BODY_BYTES else b""))
        status, _, payload, _ = _answer(sock, closing=False)
        assert status == expected, (length, payload)


# ------------------------------------------------------------------ through the ASGI interface
@pytest.fixture(scope="module")
def asgi(quick_bundle, tmp_path_factory) -> Iterator[Any]:
    """The app behind a trusted gateway (the harness's peer, 192.0.2.43), idle timeout 0.3 s."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    config = config_file(tmp_path_factory.mktemp("body_timeout_asgi"), {"baseline"}, default_pipeline="baseline")
    settings = load_settings(config, bundle=quick_bundle, warmup=False, log_level="warning",
                             api_keys={"ci": hashlib.sha256(KEY.encode()).hexdigest()},
                             trusted_proxies=["192.0.2.0/24"], limits={"body_idle_timeout_s": 0.3})
    with TestClient(create_app(settings)) as c:
        yield c


GATEWAY, CLIENT = "192.0.2.43", "203.0.113.9"  # trusted, not


def _call(client: Any, path: str, headers: list[tuple[bytes, bytes]], messages: list[dict],
          then_stall: bool = False, peer: str = GATEWAY) -> tuple[list[dict], int]:
    """One POST from `peer` through the whole app, its `receive` handing out `messages` in
    turn, then a disconnect (`then_stall`: after 5 s, far past the idle timeout): what was sent
    back and how often `receive` was called."""
    import anyio

    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(b"host", b"testserver"), *headers],
             "client": (peer, 4343), "server": ("testserver", 80)}
    pending, sent, calls = list(messages), [], 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if pending:
            return pending.pop(0)
        if then_stall:
            await anyio.sleep(5)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    client.portal.call(client.app, scope, receive, send)
    return sent, calls


def test_a_route_without_a_body_reads_none_of_a_large_one(asgi):
    """Declared: not one `receive`. Chunked (no Content-Length): read up to NO_BODY_BYTES,
    then 413, closed. From the trusted gateway the refused rest is read and thrown away to keep
    the connection (as for /predict's 413), each part within the idle timeout."""
    from service.api.middleware import NO_BODY_BYTES

    part = {"type": "http.request", "body": b"\0" * 16384, "more_body": True}
    last = {"type": "http.request", "body": b"", "more_body": False}
    read_to_the_limit = NO_BODY_BYTES // 16384 + 1
    for path in ("/healthz", "/no/such/route", "/admin/rmc/reset"):
        sent, calls = _call(asgi, path, [(b"content-length", str(BODY).encode())], [part] * 600, peer=CLIENT)
        assert sent[0]["status"] == 413 and calls == 0, (path, calls)
        assert dict(sent[0]["headers"])[b"connection"] == b"close"
        sent, calls = _call(asgi, path, [], [part] * 600, peer=CLIENT)
        assert sent[0]["status"] == 413 and calls == read_to_the_limit, (path, calls)
        assert dict(sent[0]["headers"])[b"connection"] == b"close"
    sent, calls = _call(asgi, "/healthz", [], [part] * 20 + [last])  # the gateway's: drained, kept
    assert sent[0]["status"] == 413 and calls == 21 and b"connection" not in dict(sent[0]["headers"])
    started = time.monotonic()
    sent, calls = _call(asgi, "/healthz", [], [part] * 20, then_stall=True)  # the gateway stalls
    assert sent[0]["status"] == 413 and calls == 21 and time.monotonic() - started < 2
    assert dict(sent[0]["headers"])[b"connection"] == b"close"


def test_a_stalled_gateway_is_not_drained_for_ever(asgi):
    """A keyless request's 401 from the trusted gateway reads the body to keep the connection;
    a gateway that stops sending is closed on after the idle timeout (before, the drain waited
    for ever)."""
    part = {"type": "http.request", "body": b"\0" * 1000, "more_body": True}
    started = time.monotonic()
    sent, calls = _call(asgi, "/predict?pipeline=baseline", [(b"content-type", b"image/png")], [part] * 3,
                        then_stall=True)
    assert sent[0]["status"] == 401 and calls == 4
    assert dict(sent[0]["headers"])[b"connection"] == b"close"
    assert time.monotonic() - started < 2


def test_a_part_already_in_is_taken_past_the_deadline(asgi):
    """The deadline ends only a wait for more of the body: a whole body that is in is handed
    on, and past its deadline the route's own 504 counts it under its pipeline (a 1 ms
    deadline was `client_deadline` on pipeline `baseline` before this change, and still is)."""
    body = DIGIT
    r = asgi.post("/predict?pipeline=baseline", content=body,
                  headers={"Content-Type": "image/png", "X-API-Key": KEY, "X-Request-Timeout": "1ms"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert "still arriving" not in r.json()["error"]["message"]


def test_a_body_handed_on_just_past_a_short_deadline_reaches_the_route(asgi):
    """Ray's replica receives a whole body from its proxy a few ms after the request arrived:
    with a 1 ms deadline that wait was cut, and the 504 said the body "was still arriving",
    counted under pipeline `unknown`. The wait runs DEADLINE_GRACE_S past the deadline: the
    route's own 504 answers it, counted under its pipeline."""
    import anyio

    from service.api.middleware import DEADLINE_GRACE_S

    def count(pipeline: str) -> float:
        for family in text_string_to_metric_families(asgi.get("/metrics").text):
            for s in family.samples:
                if s.name == "shieldserve_requests_total" and s.labels == {
                        "pipeline": pipeline, "endpoint": "predict", "outcome": "client_deadline"}:
                    return s.value
        return 0.0

    before = count("baseline"), count("unknown")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"pipeline=baseline",
             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"image/png"),
                                          (b"x-api-key", KEY.encode()), (b"x-request-timeout", b"1ms")],
             "client": (CLIENT, 4343), "server": ("testserver", 80)}
    sent: list[dict] = []
    handed = False

    async def receive() -> dict:
        nonlocal handed
        if not handed:
            handed = True
            await anyio.sleep(DEADLINE_GRACE_S / 5)  # as Ray's replica gets it from its proxy
            return {"type": "http.request", "body": DIGIT, "more_body": False}
        await anyio.sleep(5)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asgi.portal.call(asgi.app, scope, receive, send)
    assert sent[0]["status"] == 504
    message = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["message"]
    assert "still arriving" not in message, message
    assert (count("baseline"), count("unknown")) == (before[0] + 1, before[1])


def test_the_setting_must_be_positive():
    from pydantic import ValidationError

    from service.settings import LimitsConfig

    assert LimitsConfig().body_idle_timeout_s == 15.0  # nginx's client_body_timeout, the Ray proxy's
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="body_idle_timeout_s"):
            LimitsConfig(body_idle_timeout_s=bad)


def test_the_timeout_is_a_setting_in_the_environment(monkeypatch, quick_bundle):
    from service.settings import load_settings

    monkeypatch.setenv("SHIELDSERVE_LIMITS__BODY_IDLE_TIMEOUT_S", "2.5")
    assert load_settings(bundle=quick_bundle).limits.body_idle_timeout_s == 2.5

