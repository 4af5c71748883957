"""The user-facing contract (the README's HTTP, query monitor and metrics sections) checked through
the real request path, with outcomes the mechanism decides rather than training: API keys on
every image route, client identity behind trusted proxies, the metrics a rejection or an
abstention moves, no per-request value in a metric label, null fields of rejected and abstained
answers, readiness, the /certify store's bounds, the monitor's flag mode, the packaged monitor
coverage, the per-request image limit, /v2's outputs on a certifying pipeline, block mode's
429 on /v2 and POST /certify, and the packaged pipelines.

Forced outcomes: MagNet's thresholds set to -1 (every score is >= 0: rejected) or +inf
(never rejected); smoothing with a budget of n=1 sample (the Clopper-Pearson lower bound of
one sample is at most alpha = 0.001 < 1/2: an abstention whatever the network says); a near
copy of an image the monitor remembers (one pixel changed: nearly every hash shared, flagged);
smoothing's base network replaced by one that always answers the same class, with a normal
budget (every noise sample agrees whatever the seed: certified, the same radius every draw)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png

PNG = {"content-type": "image/png"}
KEY = "contract-key-" + "q8" * 12
KEY_NAME = "contract-client-zx"
PROXIES = ["10.0.0.0/8"]

# pipelines added to the packaged ones (monitor off where a test forces a defense's outcome)
LAB_PIPELINES = {
    # MagNet detection, then smoothing on a budget of one sample: a certifying pipeline
    "combo": {"defenses": [{"defense": "magnet", "reform": False},
                           {"defense": "smoothing", "sigma": 0.5, "n": 1}],
              "query_monitor": False},
    "flagmode": {"defenses": [], "query_monitor": {"action": "flag"}},
    "rejectmode": {"defenses": [], "query_monitor": {"action": "reject"}},
}
WATCH = {"watch": {"defenses": [], "query_monitor": {"action": "block", "block_after": 0, "cooldown_s": 60}}}


# --------------------------------------------------------------------------- helpers
@contextmanager
def _started(bundle: Path, peer: tuple[str, int] | None = None, **overrides: Any) -> Iterator[Any]:
    """A started TestClient on an app built from the packaged configuration plus `overrides`,
    its requests coming from `peer`."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    overrides.setdefault("warmup", False)
    app = create_app(load_settings(bundle=bundle, **overrides))
    kwargs = {"client": peer} if peer is not None else {}
    with TestClient(app, **kwargs) as client:
        yield client


@pytest.fixture(scope="module")
def lab(quick_bundle: Path) -> Iterator[Any]:
    with _started(quick_bundle, pipelines=LAB_PIPELINES, limits={"max_images_per_request": 2}) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(quick_bundle: Path) -> Iterator[Any]:
    with _started(quick_bundle, peer=("192.0.2.77", 4321),
                  api_keys={KEY_NAME: hashlib.sha256(KEY.encode()).hexdigest()}) as client:
        yield client


@pytest.fixture(scope="module")
def packaged(quick_bundle: Path) -> Iterator[Any]:
    with _started(quick_bundle) as client:
        yield client


def _files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]


def _near_copy(x: torch.Tensor) -> torch.Tensor:
    """x with one pixel changed: it shares nearly every fingerprint hash with x."""
    y = x.clone()
    y[..., 0, 0] = 0.5
    return y


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def _metrics(client: Any) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200
    return r.text


@pytest.fixture
def magnet_thresholds(lab: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set every MagNet detector threshold of the `combo` pipeline (restored after the test)."""
    detector = lab.app.state.runtime.pipelines["combo"].components[0]
    assert detector.defense == "magnet" and detector.role == "detector"

    def set_to(value: float) -> None:
        monkeypatch.setattr(detector, "thresholds", {n: value for n in detector.thresholds})

    return set_to


# --------------------------------------------------------------------------- 1. API keys
def _v2_body(mnist) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": mnist.test.x[0].flatten().tolist()}]}


@pytest.fixture(scope="module")
def keyed_digest(keyed: Any, mnist) -> str:
    """An image posted to /predict, so GET /certify can find it."""
    body = png(mnist.test.x[1])
    r = keyed.post("/predict?pipeline=baseline", content=body, headers={**PNG, "X-API-Key": KEY})
    assert r.status_code == 200, r.text
    return hashlib.sha256(body).hexdigest()


CREDENTIALS = {"missing": {}, "unknown": {"X-API-Key": "not-a-known-key"},
               "unknown_bearer": {"Authorization": "Bearer not-a-known-key"},
               "bearer": {"Authorization": f"Bearer {KEY}"}, "x_api_key": {"X-API-Key": KEY}}


@pytest.mark.parametrize("route", ["GET /certify", "POST /certify", "POST /v2/infer"])
@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_api_keys_gate_certify_and_v2(keyed, keyed_digest, mnist, route: str, credential: str) -> None:
    headers = CREDENTIALS[credential]
    if route == "GET /certify":
        r = keyed.get(f"/certify?image_sha256={keyed_digest}&pipeline=smoothing&n=1&n0=1", headers=headers)
    elif route == "POST /certify":
        r = keyed.post("/certify?pipeline=smoothing&n=1&n0=1", content=png(mnist.test.x[2]),
                       headers={**PNG, **headers})
    else:
        r = keyed.post("/v2/models/baseline/infer", json=_v2_body(mnist), headers=headers)
    if credential in ("bearer", "x_api_key"):
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    error = r.json()["error"]
    if route.endswith("/v2/infer"):
        assert isinstance(error, str) and error
    else:
        assert error["code"] == "unauthorized" and error["message"]


TENANT_KEYS = {"tenant-a": "tenant-a-key-" + "k3" * 10, "tenant-b": "tenant-b-key-" + "m7" * 10}


def _as(tenant: str) -> dict[str, str]:
    return {"X-API-Key": TENANT_KEYS[tenant]}


@pytest.fixture(scope="module")
def tenants(quick_bundle: Path) -> Iterator[Any]:
    """A service with two API keys (two tenants), both calling from the same address."""
    keys = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in TENANT_KEYS.items()}
    with _started(quick_bundle, peer=("192.0.2.80", 4321), api_keys=keys) as client:
        yield client


def _post_image(client: Any, route: str, body: bytes, headers: dict[str, str]) -> None:
    if route == "POST /predict":
        r = client.post("/predict?pipeline=baseline", content=body, headers={**PNG, **headers})
    else:
        r = client.post("/certify?pipeline=smoothing&n=1&n0=1", content=body, headers={**PNG, **headers})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ["POST /predict", "POST /certify"])
def test_with_api_keys_a_posted_image_is_its_key_holders_own(tenants, mnist, route: str) -> None:
    """Another key's GET /certify of an image tenant A posted is the 404 of an image never
    posted: neither the status nor the body tells tenant B what A sent, nor gives B A's label."""
    index = 20 if route == "POST /predict" else 21
    body = png(mnist.test.x[index])
    digest = hashlib.sha256(body).hexdigest()
    never = hashlib.sha256(body + b"never posted").hexdigest()
    query = "/certify?image_sha256={}&pipeline=smoothing&n=50&n0=10"
    _post_image(tenants, route, body, _as("tenant-a"))
    r_b = tenants.get(query.format(digest), headers=_as("tenant-b"))
    r_never = tenants.get(query.format(never), headers=_as("tenant-b"))
    assert r_b.status_code == r_never.status_code == 404, r_b.text
    assert r_b.json()["error"]["code"] == "unknown_image"
    assert r_b.json()["error"]["message"].replace(digest, "H") == r_never.json()["error"]["message"].replace(never, "H")
    assert set(r_b.headers.keys()) == set(r_never.headers.keys())
    r_a = tenants.get(query.format(digest), headers=_as("tenant-a"))
    assert r_a.status_code == 200, r_a.text
    assert r_a.json()["image_sha256"] == digest and not r_a.json()["cached"]
    assert tenants.get(query.format(digest), headers=_as("tenant-b")).status_code == 404  # still not B's


def test_with_api_keys_a_certificate_is_cached_for_its_key_holder_only(tenants, mnist) -> None:
    """Both tenants post the same bytes: each gets its own certificate, never the other's
    cached one (`cached` and the recorded seed would tell B that A had asked)."""
    body = png(mnist.test.x[22])
    digest = hashlib.sha256(body).hexdigest()
    query = f"/certify?image_sha256={digest}&pipeline=smoothing&n=50&n0=10"
    _post_image(tenants, "POST /certify", body, _as("tenant-a"))
    first = tenants.get(query, headers=_as("tenant-a")).json()
    again = tenants.get(query, headers=_as("tenant-a")).json()
    assert not first["cached"] and again["cached"] and again["seed"] == first["seed"]
    _post_image(tenants, "POST /certify", body, _as("tenant-b"))
    r = tenants.get(query, headers=_as("tenant-b"))
    assert r.status_code == 200 and not r.json()["cached"], r.text
    assert tenants.get(query, headers=_as("tenant-b")).json()["cached"]  # B's own, from now on


def test_the_store_key_is_scoped_by_the_key_holders_tag_only_with_api_keys(tenants, mnist) -> None:
    from types import SimpleNamespace

    from service.store import image_key, image_owner

    digest = "ab" * 32
    keyed, open_ = SimpleNamespace(api_keys={"a": "0" * 64}), SimpleNamespace(api_keys={})
    assert image_owner(open_, "ip:192.0.2.1") is None and image_key(None, digest) == digest
    assert image_owner(keyed, "key:a") == "key:a"
    keys = {image_key(image_owner(keyed, c), digest) for c in ("key:a", "key:b", "key:a:b")}
    assert len(keys) == 3 and digest not in keys and all(k.endswith(digest) for k in keys)
    # the tag the service derives for a key-holder names the key's client, never the key
    body = png(mnist.test.x[25])
    _post_image(tenants, "POST /certify", body, _as("tenant-a"))
    assert tenants.get(f"/certify?image_sha256={hashlib.sha256(body).hexdigest()}&pipeline=smoothing&n=1&n0=1",
                       headers=_as("tenant-a")).status_code == 200  # a certificate cached too
    store = tenants.app.state.store
    stored = " ".join(str(k) for k in store.images.keys() + store.certificates.keys())
    assert "key:tenant-a:" in stored
    for key in TENANT_KEYS.values():
        assert key not in stored and hashlib.sha256(key.encode()).hexdigest() not in stored


def test_without_api_keys_the_store_is_shared_by_every_client(quick_bundle, mnist) -> None:
    """An open service knows clients only by address, too weak to scope by: an image one
    address posted (to /predict or /certify) is found for any. But each client gets its own
    cached certificates: shared, one client could evict and re-draw (n=1 certificates, then
    asking again) the certificate another is then served as `cached`, choosing its noise,
    which alpha assumes nobody does."""
    body_p, body_c = png(mnist.test.x[23]), png(mnist.test.x[24])
    with _started(quick_bundle, peer=("10.0.0.5", 123), trusted_proxies=PROXIES) as client:
        one, two = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
        _post_image(client, "POST /predict", body_p, one)
        _post_image(client, "POST /certify", body_c, one)
        for body in (body_p, body_c):
            query = f"/certify?image_sha256={hashlib.sha256(body).hexdigest()}&pipeline=smoothing&n=50&n0=10"
            r = client.get(query, headers=two)
            assert r.status_code == 200 and not r.json()["cached"], r.text  # the image is shared
            first = client.get(query, headers=one).json()
            assert not first["cached"]  # two's certificate is not one's
            again = client.get(query, headers=one).json()
            assert again["cached"] and again["seed"] == first["seed"]
            assert client.get(query, headers=two).json()["cached"]  # two's own, from its first


def test_without_a_key_nothing_else_is_looked_at_first(keyed, mnist) -> None:
    """A missing or unknown key is 401 before the request's parameters are validated: a bad
    query parameter or header answered 422 first, which told a client without a key the routes'
    parameter rules. Counted as the handlers count a 401 (outcome unauthorized, under the served
    pipeline the request names, else unknown)."""
    body = png(mnist.test.x[0])
    before = _metrics(keyed)
    for r in (keyed.post("/predict?pipeline=magnet&radius=abc", content=body, headers=PNG),
              keyed.post("/predict", content=body, headers={**PNG, "X-Request-Timeout": "soon"}),
              keyed.get("/certify", params={"image_sha256": "0" * 64, "n": "abc"}),
              keyed.get("/certify"),
              keyed.post("/v2/models/baseline/infer", json={}, headers={"X-Request-Timeout": "x",
                                                                         "X-API-Key": "wrong"}),
              keyed.post("/predict?pipeline=no-such&radius=abc", content=body, headers=PNG)):
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (r.request.url, r.text)
    after = _metrics(keyed)

    def added(**labels: str) -> float:
        return (_sample(after, "shieldserve_requests_total", outcome="unauthorized", **labels)
                - _sample(before, "shieldserve_requests_total", outcome="unauthorized", **labels))

    assert added(endpoint="predict", pipeline="magnet") == 1
    assert added(endpoint="predict", pipeline="default") == 1  # the default pipeline
    assert added(endpoint="predict", pipeline="unknown") == 1  # a name not served: no new label
    assert added(endpoint="certify", pipeline="smoothing") == 2  # certify.pipeline
    assert added(endpoint="infer", pipeline="baseline") == 1
    # and timed, as a 401 inside the handler was
    assert (_sample(after, "shieldserve_request_duration_seconds_count", endpoint="predict", pipeline="magnet")
            - _sample(before, "shieldserve_request_duration_seconds_count", endpoint="predict", pipeline="magnet")) == 1
    # with the key, the same bad parameter is the 422 it always was
    r = keyed.post("/predict?pipeline=magnet&radius=abc", content=body, headers={**PNG, "X-API-Key": KEY})
    assert r.status_code == 422


def test_a_key_with_letters_beyond_ascii_is_accepted(quick_bundle: Path, mnist) -> None:
    """The docs have operators take `printf %s "$KEY" | sha256sum`, the digest of the key's
    UTF-8 bytes; Starlette decodes a header as latin-1, and the text re-encoded as UTF-8 never
    matched a key with a non-ASCII letter (the admin key likewise)."""
    key = "clé-carol-" + "ü" * 20
    admin = "clé-admin-" + "ß" * 20
    with _started(quick_bundle, api_keys={"carol": hashlib.sha256(key.encode()).hexdigest()},
                  admin_api_key=admin) as client:
        sent = key.encode()  # as a client sends it: the key's UTF-8 bytes
        r = client.post("/predict?pipeline=baseline", content=png(mnist.test.x[0]),
                        headers=[(b"content-type", b"image/png"), (b"x-api-key", sent)])
        assert r.status_code == 200, r.text
        r = client.post("/predict?pipeline=baseline", content=png(mnist.test.x[0]),
                        headers=[(b"content-type", b"image/png"), (b"authorization", b"Bearer " + sent)])
        assert r.status_code == 200, r.text
        r = client.post("/admin/rmc/reset?pipeline=rmc", headers=[(b"x-api-key", admin.encode())])
        assert r.status_code != 403, r.text  # past the key (the pipeline's own answer follows)
        r = client.post("/admin/rmc/reset?pipeline=rmc", headers=[(b"x-api-key", admin.encode()[:-2])])
        assert r.status_code == 403


def test_a_non_ascii_key_sent_as_latin_1_is_accepted_too() -> None:
    """Python's http.client (so requests and urllib) and browsers send a non-ASCII header as
    latin-1 bytes, curl as UTF-8: the key is matched either way (the test client re-encodes
    headers as UTF-8, so this calls the check on a request built from raw bytes)."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.api.clients import client_of
    from service.api.errors import ApiError

    key = "clé-carol-" + "ü" * 20
    settings = SimpleNamespace(api_keys={"carol": hashlib.sha256(key.encode()).hexdigest()})
    app = SimpleNamespace(state=SimpleNamespace(runtime=SimpleNamespace(settings=settings)))

    def request(raw: bytes) -> Request:
        return Request({"type": "http", "app": app, "headers": [(b"x-api-key", raw)], "client": ("192.0.2.1", 1)})

    assert client_of(request(key.encode("utf-8"))) == "key:carol"
    assert client_of(request(key.encode("latin-1"))) == "key:carol"
    with pytest.raises(ApiError):
        client_of(request("clé-carol".encode("latin-1")))


# --------------------------------------------------------------------------- 2. trusted proxies
def _post_watch(client: Any, x: torch.Tensor, forwarded_for: str | None) -> Any:
    headers = dict(PNG)
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return client.post("/predict?pipeline=watch", content=png(x), headers=headers)


def _flag_and_block(client: Any, x: torch.Tensor, forwarded_for: str | None) -> None:
    """x, then a near copy of it: flagged, and with block_after 0 the client is blocked."""
    r = _post_watch(client, x, forwarded_for)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
    r = _post_watch(client, _near_copy(x), forwarded_for)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["status"] == "rejected" and res["rejected_by"][0]["defense"] == "query_monitor", res


def test_forwarded_for_from_a_trusted_proxy_names_the_client(quick_bundle, mnist) -> None:
    other = mnist.test.x[10]
    with _started(quick_bundle, peer=("10.0.0.5", 123), trusted_proxies=PROXIES, pipelines=WATCH) as client:
        _flag_and_block(client, mnist.test.x[3], "198.51.100.7")
        # the same client whatever it forges on the left, or trusted hops on the right
        for xff in ("6.6.6.6, 198.51.100.7", "198.51.100.7, 10.0.0.9", " 1.2.3.4 ,198.51.100.7"):
            r = _post_watch(client, other, xff)
            assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", (xff, r.text)
            assert int(r.headers["Retry-After"]) >= 1
        # another right-most untrusted hop is another client; so is the proxy itself
        for xff in ("198.51.100.8", "198.51.100.7, 198.51.100.8", None):
            r = _post_watch(client, other, xff)
            assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", (xff, r.text)
        assert _sample(_metrics(client), "shieldserve_blocked_clients") == 1


def test_forwarded_for_in_several_header_lines_is_one_list(quick_bundle, mnist) -> None:
    """A gateway that appends its own X-Forwarded-For line after the client's (HAProxy's
    `option forwardfor`) sends two lines: one list (RFC 9110), read from the right. Reading
    the first line alone let a blocked client forge a new id per request, or name a victim."""
    real, victim = "198.51.100.7", "203.0.113.50"
    other = mnist.test.x[10]

    def lines(*values: str) -> list[tuple[str, str]]:
        return [("content-type", "image/png")] + [("x-forwarded-for", v) for v in values]

    with _started(quick_bundle, peer=("10.0.0.5", 123), trusted_proxies=PROXIES, pipelines=WATCH) as client:
        r = client.post("/predict?pipeline=watch", content=png(mnist.test.x[3]), headers=lines(victim, real))
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
        r = client.post("/predict?pipeline=watch", content=png(_near_copy(mnist.test.x[3])),
                        headers=lines(victim, real))
        assert r.json()["results"][0]["status"] == "rejected", r.text  # flagged: real is blocked
        for forged in ("1.1.1.1", "2.2.2.2", victim):  # a new forged line each time: still blocked
            r = client.post("/predict?pipeline=watch", content=png(other), headers=lines(forged, real))
            assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", (forged, r.text)
        r = _post_watch(client, other, victim)  # the victim, through the gateway: not blocked
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text


def test_forwarded_for_from_an_untrusted_peer_is_ignored(quick_bundle, mnist) -> None:
    other = mnist.test.x[10]
    with _started(quick_bundle, peer=("203.0.113.9", 123), trusted_proxies=PROXIES, pipelines=WATCH) as client:
        _flag_and_block(client, mnist.test.x[3], "198.51.100.7")
        for xff in ("198.51.100.8", "10.0.0.5", None):  # the peer is the client, blocked
            r = _post_watch(client, other, xff)
            assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", (xff, r.text)


def test_a_forwarded_for_hop_names_its_client_by_its_first_64_characters(quick_bundle, mnist) -> None:
    """The hop bound through a request: a client blocked under a 64-character forged hop is
    the same client at 65 or 100 characters (the rest is cut), and another at a 64-character
    hop that differs only in its last character (all 64 count)."""
    other = mnist.test.x[10]
    at_bound = "h" * 63 + "z"
    with _started(quick_bundle, peer=("10.0.0.5", 123), trusted_proxies=PROXIES, pipelines=WATCH) as client:
        _flag_and_block(client, mnist.test.x[3], at_bound)
        for xff in (at_bound + "q", at_bound + "q" * 36, f"6.6.6.6, {at_bound}qqq"):
            r = _post_watch(client, other, xff)
            assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", (xff, r.text)
        r = _post_watch(client, other, "h" * 64)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text


@pytest.mark.parametrize("prefix", [64, 128])
def test_an_ipv6_client_is_its_network(quick_bundle, mnist, prefix: int) -> None:
    """A host holds a whole /64: blocked from one address, it is blocked at every other
    address of its /64 (client_ipv6_prefix 64, the default), not in the next /64; an IPv4
    client as an IPv4-mapped IPv6 address is that IPv4 client. At 128 each address is its own."""
    other = mnist.test.x[10]
    with _started(quick_bundle, peer=("10.0.0.5", 123), trusted_proxies=PROXIES, pipelines=WATCH,
                  client_ipv6_prefix=prefix) as client:
        _flag_and_block(client, mnist.test.x[3], "2001:db8:1:2::5")
        same = ("2001:db8:1:2:ffff:abcd:0:9", "2001:DB8:1:2::6", "2001:db8:1:2::5")
        for xff in same:
            r = _post_watch(client, other, xff)
            blocked = prefix == 64 or xff == "2001:db8:1:2::5"
            assert r.status_code == (429 if blocked else 200), (xff, r.text)
        r = _post_watch(client, other, "2001:db8:1:3::5")  # the next /64: another client
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
        _flag_and_block(client, mnist.test.x[4], "198.51.100.20")
        r = _post_watch(client, other, "::ffff:198.51.100.20")
        assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", r.text


@pytest.mark.parametrize("peer", ["::ffff:10.0.0.5", "10.0.0.5"])
def test_a_gateway_seen_as_an_ipv4_mapped_address_is_still_trusted(quick_bundle, mnist, peer: str) -> None:
    """A dual-stack socket reports an IPv4 gateway as ::ffff:a.b.c.d: still the trusted proxy,
    so each client behind it is itself (not every client the gateway, blocked together), also
    where the gateway writes the client with a port or brackets."""
    other = mnist.test.x[10]
    with _started(quick_bundle, peer=(peer, 123), trusted_proxies=PROXIES, pipelines=WATCH) as client:
        _flag_and_block(client, mnist.test.x[3], "198.51.100.7")
        for xff in ("198.51.100.7:50123", "198.51.100.7, ::ffff:10.0.0.2"):  # the same client
            r = _post_watch(client, other, xff)
            assert r.status_code == 429, (xff, r.text)
        for xff in ("198.51.100.8", "[2001:db8::1]:443", None):  # others, the gateway itself too
            r = _post_watch(client, other, xff)
            assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", (xff, r.text)


CLIENT_IDS = {  # what a peer or hop is called, at client_ipv6_prefix 64
    "192.0.2.4": "192.0.2.4", "192.0.2.4:50123": "192.0.2.4", "::ffff:192.0.2.4": "192.0.2.4",
    "2001:db8:1:2:aaaa::5": "2001:db8:1:2::/64", "[2001:DB8:1:2::1]:443": "2001:db8:1:2::/64",
    "[2001:db8:1:2::1]": "2001:db8:1:2::/64", "2001:db8:1:2::%a": "2001:db8:1:2::/64",
    "2001:db8:1:2::%b": "2001:db8:1:2::/64",  # a zone is the writer's interface, not the client
    "64:ff9b::198.51.100.7": "198.51.100.7",  # NAT64: an IPv4 host
    "2002:c633:6407::1": "198.51.100.7", "2002:c633:6407:ffff::1": "198.51.100.7",  # 6to4: its IPv4 host
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "192.0.2.45",  # Teredo: its client's IPv4 address
    "fe80::1%eth0": "fe80::1", "fe80::2": "fe80::2", "::1": "::1",  # a /64 here is every host of a link
    "testclient": "testclient", "192.0.2.4:": "192.0.2.4:", "[2001:db8::1]x": "[2001:db8::1]x",  # no address
}


def test_client_ids_name_hosts_not_connections() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from service.api.clients import client_network

    assert {a: client_network(a, 64) for a in CLIENT_IDS} == CLIENT_IDS
    assert client_network("2001:db8:1:2:aaaa::5", 128) == "2001:db8:1:2:aaaa::5"
    assert client_network("2001:db8:1:2:aaaa::5", 48) == "2001:db8:1::/48"

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80) | st.from_regex(r"\[?[0-9a-fA-F:.%\]\[]{0,60}(:[0-9]{0,6})?", fullmatch=True))
    def never_raises(text: str) -> None:
        assert isinstance(client_network(text, 64), str)

    never_raises()


def test_client_ipv6_prefix_is_checked() -> None:
    from pydantic import ValidationError

    from service.settings import load_settings
    for bad in (0, 129):
        with pytest.raises(ValidationError):
            load_settings(client_ipv6_prefix=bad)
    assert load_settings().client_ipv6_prefix == 64


# --------------------------------------------------------------------------- 3. metrics
def test_a_detector_rejection_moves_rejection_score_and_stage_metrics(lab, mnist, magnet_thresholds) -> None:
    magnet_thresholds(-1.0)
    before = _metrics(lab)
    r = lab.post("/predict?pipeline=combo", files=_files([png(x) for x in mnist.test.x[:2]]))
    assert r.status_code == 200, r.text
    assert [res["status"] for res in r.json()["results"]] == ["rejected", "rejected"]
    after = _metrics(lab)
    labels = {"pipeline": "combo", "defense": "magnet"}
    assert (_sample(after, "shieldserve_rejections_total", **labels)
            - _sample(before, "shieldserve_rejections_total", **labels)) == 2
    assert _sample(after, "shieldserve_detector_score_count", **labels) > 0
    assert _sample(after, "shieldserve_stage_duration_seconds_count", **labels) > 0
    assert (_sample(after, "shieldserve_abstentions_total", pipeline="combo")
            == _sample(before, "shieldserve_abstentions_total", pipeline="combo"))


@pytest.mark.parametrize("route", ["POST /certify", "GET /certify"])
def test_a_detector_rejection_on_certify_moves_rejection_score_and_stage_metrics(lab, mnist, magnet_thresholds,
                                                                                 route: str) -> None:
    """/certify runs its pipeline outside the batcher; its results move the same metrics."""
    magnet_thresholds(-1.0)
    body = png(mnist.test.x[8 if route == "POST /certify" else 9])
    if route == "GET /certify":  # posted first (rejected too), then asked with another n: not cached
        assert lab.post("/certify?pipeline=combo&n=1&n0=1", content=body, headers=PNG).status_code == 200
    labels = {"pipeline": "combo", "defense": "magnet"}
    names = ("shieldserve_rejections_total", "shieldserve_detector_score_count",
             "shieldserve_stage_duration_seconds_count")
    before = _metrics(lab)
    if route == "POST /certify":
        r = lab.post("/certify?pipeline=combo&n=1&n0=1", content=body, headers=PNG)
    else:
        r = lab.get(f"/certify?image_sha256={hashlib.sha256(body).hexdigest()}&pipeline=combo&n=2&n0=1")
    assert r.status_code == 200, r.text
    cert = r.json()
    assert cert["status"] == "rejected" and cert["rejected_by"][0]["defense"] == "magnet" and not cert["cached"]
    assert (cert["n0"], cert["n"], cert["samples"]) == (0, 0, 0)  # rejected before any sample
    after = _metrics(lab)
    moved = {name: _sample(after, name, **labels) - _sample(before, name, **labels) for name in names}
    assert moved["shieldserve_rejections_total"] == 1, moved
    assert moved["shieldserve_detector_score_count"] >= 1 and moved["shieldserve_stage_duration_seconds_count"] == 1
    assert (_sample(after, "shieldserve_abstentions_total", pipeline="combo")
            == _sample(before, "shieldserve_abstentions_total", pipeline="combo"))


def test_a_certify_abstention_is_counted_once(lab, mnist, magnet_thresholds) -> None:
    magnet_thresholds(float("inf"))
    before = _metrics(lab)
    r = lab.post("/certify?pipeline=combo&n=1&n0=1", content=png(mnist.test.x[10]), headers=PNG)
    assert r.status_code == 200 and r.json()["status"] == "abstained", r.text
    after = _metrics(lab)
    assert (_sample(after, "shieldserve_abstentions_total", pipeline="combo")
            - _sample(before, "shieldserve_abstentions_total", pipeline="combo")) == 1
    assert (_sample(after, "shieldserve_stage_duration_seconds_count", pipeline="combo", defense="smoothing")
            - _sample(before, "shieldserve_stage_duration_seconds_count", pipeline="combo", defense="smoothing")) == 1


def test_a_smoothing_abstention_moves_the_abstention_counter(lab, mnist, magnet_thresholds) -> None:
    magnet_thresholds(float("inf"))
    before = _sample(_metrics(lab), "shieldserve_abstentions_total", pipeline="combo")
    r = lab.post("/predict?pipeline=combo", content=png(mnist.test.x[4]), headers=PNG)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "abstained", r.text
    text = _metrics(lab)
    assert _sample(text, "shieldserve_abstentions_total", pipeline="combo") - before == 1
    assert _sample(text, "shieldserve_stage_duration_seconds_count", pipeline="combo", defense="smoothing") > 0


# --------------------------------------------------------------------------- 4. metric labels
def test_no_image_hash_request_id_key_or_client_in_metric_labels(keyed, mnist) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    client_rid = "contract-rid-5c1d9e0b7a"
    body = png(mnist.test.x[5])
    r1 = keyed.post("/predict?pipeline=magnet", content=body, headers={**PNG, **auth, "X-Request-ID": client_rid})
    r2 = keyed.post("/predict?pipeline=default", content=body, headers={**PNG, **auth})
    r3 = keyed.post("/certify?pipeline=smoothing&n=1&n0=1", content=body, headers={**PNG, **auth})
    keyed.post("/predict?pipeline=magnet", content=body, headers={**PNG, "X-API-Key": "wrong-" + KEY})  # a 401
    assert (r1.status_code, r2.status_code, r3.status_code) == (200, 200, 200), (r1.text, r2.text, r3.text)
    assert r1.json()["request_id"] == client_rid
    server_rid = r2.json()["request_id"]
    digest = hashlib.sha256(body).hexdigest()
    assert r1.json()["results"][0]["image_sha256"] == digest
    text = _metrics(keyed)
    assert 'shieldserve_requests_total{endpoint="predict",outcome="unauthorized",pipeline="magnet"}' in text
    forbidden = [digest, digest[:16], client_rid, server_rid, KEY, hashlib.sha256(KEY.encode()).hexdigest(),
                 KEY_NAME, "192.0.2.77"]
    for value in forbidden:
        assert value not in text, value
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for value in s.labels.values():
                assert value not in forbidden and len(value) < 40, (s.name, s.labels)


# --------------------------------------------------------------------------- 5. null fields
@pytest.mark.parametrize("outcome", ["rejected", "abstained"])
def test_label_fields_are_null_unless_accepted(lab, mnist, magnet_thresholds, outcome: str) -> None:
    magnet_thresholds(-1.0 if outcome == "rejected" else float("inf"))
    pipelines = {p["name"]: p for p in lab.get("/pipelines").json()["pipelines"]}
    assert pipelines["combo"]["certifies"] is True  # a pipeline with a certificate
    r = lab.post("/predict?pipeline=combo", files=_files([png(mnist.test.x[6]), png(mnist.test.x[7])]))
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert res["status"] == outcome
        assert res["label"] is None and res["class_name"] is None and res["confidence"] is None
        assert res["certified_radius"] is None
        assert bool(res["rejected_by"]) == (outcome == "rejected")


# --------------------------------------------------------------------------- 6. readiness
def test_readyz_is_503_loading_until_the_runtime_is_ready(packaged) -> None:
    runtime = packaged.app.state.runtime
    assert packaged.get("/readyz").status_code == 200
    runtime.ready = False
    try:
        r = packaged.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        assert packaged.get("/healthz").status_code == 200  # live all the same
    finally:
        runtime.ready = True
    r = packaged.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# --------------------------------------------------------------------------- 7. the /certify store
def test_the_certify_store_evicts_the_least_recently_used_beyond_its_size() -> None:
    from service.store import MemoryStore

    store = MemoryStore(max_images=2, max_certificates=2, max_age_s=3600.0)
    for k in "abc":
        store.put_image(k, torch.full((1, 2, 2), float(ord(k))))
        store.put_certificate(("cert", k), {"k": k})
    assert store.get_image("a") is None and store.get_certificate(("cert", "a")) is None  # the oldest went
    assert float(store.get_image("b")[0, 0, 0]) == ord("b") and store.get_certificate(("cert", "c")) == {"k": "c"}
    store.put_image("d", torch.zeros(1, 2, 2))  # b was used last: c goes
    assert store.get_image("c") is None and store.get_image("b") is not None and store.get_image("d") is not None


def test_the_certify_store_forgets_entries_past_their_age() -> None:
    from service.store import MemoryStore

    now = [1000.0]
    store = MemoryStore(max_images=10, max_certificates=10, max_age_s=60.0, clock=lambda: now[0])
    store.put_image("a", torch.zeros(1, 2, 2))
    store.put_certificate("a", {"radius": 0.5})
    now[0] += 59.0
    assert store.get_image("a") is not None and store.get_certificate("a") == {"radius": 0.5}
    store.put_image("b", torch.zeros(1, 2, 2))
    now[0] += 2.0  # a is 61 s old, b 2 s
    assert store.get_image("a") is None and store.get_certificate("a") is None
    assert store.get_image("b") is not None
    # the store keeps a copy: changing the caller's tensor changes nothing stored
    x = torch.zeros(1, 2, 2)
    store.put_image("c", x)
    x += 1
    assert float(store.get_image("c").sum()) == 0
    # and hands out a copy: a pipeline changing its input in place changes nothing stored
    got = store.get_image("c")
    got += 5
    assert float(store.get_image("c").sum()) == 0


def test_the_certify_and_query_monitor_settings_reach_the_store_and_the_monitor(quick_bundle, mnist) -> None:
    """`certify.store_*` bound the app's /certify store (service/app.py -> service/store.py) and
    `query_monitor.{max_queries,memory_window_s,suspect_history}` the monitor's memory
    (QueryMonitor.from_settings): checked on the objects, and by what they then do."""
    import numpy as np

    certify = {"store_max_images": 2, "store_max_certificates": 4, "store_max_age_s": 60}
    monitor = {"max_queries": 123, "memory_window_s": 45, "suspect_history": 7}
    with _started(quick_bundle, certify=certify, query_monitor=monitor) as client:
        store = client.app.state.store
        assert (store.images.max_items, store.certificates.max_items) == (2, 4)
        assert store.images.max_age_s == store.certificates.max_age_s == 60
        qm = client.app.state.runtime.monitor
        assert qm is not None and qm.suspect_history == 7
        assert qm.memory.cap == 123 // 2 and qm.memory.half_s == 45 / 2  # two generations of half each
        # behaviour: /predict remembers each image it answers, 2 at most: the first of 3 is gone
        bodies = [png(x) for x in mnist.test.x[30:33]]
        r = client.post("/predict?pipeline=baseline", files=_files(bodies))
        assert r.status_code == 200, r.text
        first, last = (hashlib.sha256(b).hexdigest() for b in (bodies[0], bodies[-1]))
        r = client.get(f"/certify?image_sha256={first}&pipeline=smoothing&n=1&n0=1")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_image", r.text
        r = client.get(f"/certify?image_sha256={last}&pipeline=smoothing&n=1&n0=1")
        assert r.status_code == 200 and r.json()["image_sha256"] == last, r.text
        # the monitor remembers at most max_queries (two generations of max_queries // 2)
        n = 300
        qm.memory.match([f"q{i}".encode() for i in range(n)], np.arange(3 * n).reshape(n, 3))
        assert 123 // 2 <= qm.memory.remembered() <= 123


# --------------------------------------------------------------------------- 8. flag mode
def test_flag_mode_answers_a_flagged_query_and_reject_mode_rejects_it(lab, mnist) -> None:
    x = mnist.test.x[20]
    y = _near_copy(x)
    before = _metrics(lab)
    r = lab.post("/predict?pipeline=flagmode", content=png(x), headers=PNG)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
    r = lab.post("/predict?pipeline=flagmode", content=png(y), headers=PNG)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["status"] == "accepted" and res["label"] is not None and res["rejected_by"] == [], res
    mid = _metrics(lab)
    flags = "shieldserve_query_monitor_flags_total"
    assert _sample(mid, flags, pipeline="flagmode") - _sample(before, flags, pipeline="flagmode") == 1
    # the same query on a pipeline in the default mode (reject): a rejection by query_monitor
    r = lab.post("/predict?pipeline=rejectmode", content=png(y), headers=PNG)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["status"] == "rejected" and res["rejected_by"][0]["defense"] == "query_monitor", res
    assert res["label"] is None and res["confidence"] is None
    assert _sample(_metrics(lab), flags, pipeline="rejectmode") - _sample(mid, flags, pipeline="rejectmode") == 1


# --------------------------------------------------------------------------- 9. packaged monitor
def test_the_packaged_configuration_monitors_every_pipeline_but_baseline(packaged) -> None:
    from service.settings import PACKAGED_CONFIG, load_settings

    body = packaged.get("/pipelines").json()
    assert body["query_monitor_off"] is None
    served = {p["name"]: p["query_monitor"] for p in body["pipelines"]}
    configured = set(load_settings(bundle=packaged.app.state.settings.bundle).pipelines)
    assert PACKAGED_CONFIG.name == "default_config.yaml"
    assert set(served) | set(body["unavailable"]) == configured and "baseline" in served
    assert served["baseline"] is None
    for name, monitor in served.items():
        if name != "baseline":
            assert monitor is not None and monitor["enabled"] is True, name
            assert monitor["action"] == "reject", name  # the packaged policy


# --------------------------------------------------------------------------- 10. too many images
@pytest.mark.parametrize("count", [3, 4, 10])
def test_more_images_than_the_limit_is_413(lab, mnist, count: int) -> None:
    r = lab.post("/predict?pipeline=baseline", files=_files([png(x) for x in mnist.test.x[:count]]))
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large" and r.json()["error"]["message"]


# --------------------------------------------------------------------------- 11. /v2 outputs
def _v2_images(images: torch.Tensor) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.flatten().tolist()}]}


def _v2_outputs(r: Any) -> dict[str, tuple[str, list[int], list[Any]]]:
    """name -> (datatype, shape, data) of a JSON /v2 answer."""
    assert r.status_code == 200, r.text
    return {o["name"]: (o["datatype"], o["shape"], o["data"]) for o in r.json()["outputs"]}


@pytest.fixture
def certain(lab: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """certain(c): the `combo` pipeline's smoothing samples a network that always answers class
    c, on the packaged budget of 4,000 samples (restored after the test)."""
    decider = lab.app.state.runtime.pipelines["combo"].components[1]
    assert decider.defense == "smoothing" and decider.role == "decider" and not decider.use_denoiser

    def always(c: int) -> None:
        def f(z: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(z.shape[0], decider.num_classes)
            out[:, c] = 1.0
            return out

        monkeypatch.setattr(decider, "classifiers", {s: f for s in decider.classifiers})
        monkeypatch.setattr(decider, "n", 4000)

    return always


@pytest.mark.parametrize("outcome", ["rejected", "abstained"])
def test_v2_outputs_of_a_rejection_or_an_abstention(lab, mnist, magnet_thresholds, outcome: str) -> None:
    """README "Open Inference Protocol": label -1 unless accepted, certified_radius -1 without a
    certificate; probabilities all 0 on a rejection (service/api/oip.py: a row the decider never
    filled), the decider's (here the noise counts' shares: a row summing to 1) on an abstention."""
    magnet_thresholds(-1.0 if outcome == "rejected" else float("inf"))
    k = lab.app.state.runtime.input_spec.num_classes
    out = _v2_outputs(lab.post("/v2/models/combo/infer", json=_v2_images(mnist.test.x[8:10])))
    assert set(out) == {"label", "probabilities", "status", "certified_radius"}
    assert out["status"] == ("BYTES", [2], [outcome, outcome])
    assert out["label"] == ("INT64", [2], [-1, -1])
    assert out["certified_radius"] == ("FP32", [2], [-1.0, -1.0])
    datatype, shape, probs = out["probabilities"]
    assert (datatype, shape, len(probs)) == ("FP32", [2, k], 2 * k)
    rows = [probs[:k], probs[k:]]
    if outcome == "rejected":
        assert all(p == 0.0 for p in probs)
    else:
        assert all(0.0 <= p <= 1.0 for p in probs) and all(sum(row) == pytest.approx(1.0) for row in rows)


def test_v2_outputs_of_a_certified_answer_agree_with_predict(lab, mnist, magnet_thresholds, certain) -> None:
    """An accepted, certified image: /v2's label, status and radius are /predict's. Neither route
    takes a seed (the batcher draws one per batch, service/batcher.py), so the outcome is made
    seed-independent: every noise sample answers the digit's own class."""
    magnet_thresholds(float("inf"))
    x, y = mnist.test.x[11], int(mnist.test.y[11])
    certain(y)
    r = lab.post("/predict?pipeline=combo", content=png(x), headers=PNG)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["status"] == "accepted" and res["label"] == y and res["certified"] is True, res
    assert res["target_radius"] == 0.5 and res["certified_radius"] >= 0.5, res
    out = _v2_outputs(lab.post("/v2/models/combo/infer", json=_v2_images(x.unsqueeze(0))))
    assert out["status"] == ("BYTES", [1], ["accepted"])
    assert out["label"] == ("INT64", [1], [y])
    assert out["certified_radius"][:2] == ("FP32", [1])
    assert out["certified_radius"][2][0] == pytest.approx(res["certified_radius"], abs=1e-5)
    probs = out["probabilities"][2]
    assert probs[y] == pytest.approx(1.0) and sum(probs) == pytest.approx(1.0)


# --------------------------------------------------------------------------- 12. block mode on /v2, /certify
def test_a_blocked_client_gets_429_on_v2_infer_and_post_certify(quick_bundle, mnist) -> None:
    block = {"action": "block", "block_after": 0, "cooldown_s": 60}
    pipelines = {**WATCH, "certwatch": {"defenses": [{"defense": "smoothing", "sigma": 0.5, "n": 1}],
                                        "query_monitor": block}}
    other = mnist.test.x[12]
    with _started(quick_bundle, peer=("198.51.100.40", 999), pipelines=pipelines) as client:
        before = _metrics(client)
        _flag_and_block(client, mnist.test.x[13], None)
        r = client.post("/v2/models/watch/infer", json=_v2_images(other.unsqueeze(0)))
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
        r = client.post("/certify?pipeline=certwatch&n=1&n0=1", content=png(other), headers=PNG)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "attack_suspected" and error["message"], error
        after = _metrics(client)
        for endpoint, pipeline in (("infer", "watch"), ("certify", "certwatch")):
            labels = {"endpoint": endpoint, "pipeline": pipeline, "outcome": "attack_suspected"}
            assert (_sample(after, "shieldserve_requests_total", **labels)
                    - _sample(before, "shieldserve_requests_total", **labels)) == 1, labels


# --------------------------------------------------------------------------- 13. the packaged pipelines
# README "Defenses and pipelines": the table's nine (feature squeezing is a detector a pipeline
# can add, not a packaged pipeline)
PACKAGED_PIPELINES = {"baseline", "magnet", "defensegan", "neuralfp", "rmc", "smoothing", "denoised", "robust",
                      "default"}


def test_the_packaged_configuration_serves_the_documented_pipelines(packaged) -> None:
    from service.settings import load_settings

    configured = set(load_settings(bundle=packaged.app.state.settings.bundle).pipelines)
    assert configured == PACKAGED_PIPELINES
    body = packaged.get("/pipelines").json()
    served = {p["name"]: p for p in body["pipelines"]}
    assert set(served) | set(body["unavailable"]) == PACKAGED_PIPELINES
    assert not set(served) & set(body["unavailable"])
    for name in served:  # each served pipeline is a /v2 model
        assert packaged.get(f"/v2/models/{name}").status_code == 200, name
    assert packaged.get("/v2/models/squeeze").status_code == 404
    # `default`: MagNet detection, then smoothing deciding, with a certificate
    assert body["default"] == "default"
    default = served["default"]
    assert default["certifies"] is True
    assert [(d["defense"], d["role"]) for d in default["defenses"]] == [("magnet", "detector"),
                                                                         ("smoothing", "decider")]
    smoothing = default["defenses"][1]["settings"]
    assert smoothing["sigma"] == 0.5 and smoothing["target_radius"] == 0.5 and smoothing["norm"] == "L2"
    assert {p: served[p]["certifies"] for p in served} == {
        p: p in ("default", "smoothing", "denoised") for p in served}


# --------------------------------------------------------------------------- the operator's unblock
def test_an_operator_lifts_a_block_with_the_admin_key(quick_bundle, mnist, caplog) -> None:
    """POST /admin/query-monitor/unblock?client=ip:ADDRESS: a blocked client (a false alarm)
    is answered again at once, not after its cooldown; the admin key gates it, a client id the service cannot name is a 422, and the log line names
    the client, never the admin key. Before it, an operator's only ways were a restart or
    waiting out `cooldown_s`."""
    admin = "admin-key-for-unblock-" + "k" * 16
    with _started(quick_bundle, peer=("198.51.100.60", 999), pipelines=WATCH, admin_api_key=admin) as client:
        _flag_and_block(client, mnist.test.x[20], None)
        r = _post_watch(client, mnist.test.x[22], None)
        assert r.status_code == 429, r.text
        assert client.post("/admin/query-monitor/unblock?client=ip:198.51.100.60").status_code == 401
        r = client.post("/admin/query-monitor/unblock?client=ip:198.51.100.60", headers={"X-API-Key": "wrong"})
        assert r.status_code == 403
        for bad in ("198.51.100.60", "key:alice", "ip:", "ip:1.2.3.4 5", "x" * 300):
            r = client.post("/admin/query-monitor/unblock", params={"client": bad}, headers={"X-API-Key": admin})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", (bad, r.text)
        with caplog.at_level(logging.WARNING, logger="shieldserve"):
            r = client.post("/admin/query-monitor/unblock?client=ip:198.51.100.60", headers={"X-API-Key": admin})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["client"] == "ip:198.51.100.60" and body["was_blocked"] is True and body["scope"] == "process"
        lines = [rec.getMessage() for rec in caplog.records if "query monitor unblock" in rec.getMessage()]
        assert len(lines) == 1 and "client=ip:198.51.100.60" in lines[0] and admin not in lines[0]
        r = _post_watch(client, mnist.test.x[22], None)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
        assert "shieldserve_blocked_clients 0.0" in client.get("/metrics").text
        r = client.post("/admin/query-monitor/unblock?client=ip:198.51.100.60", headers={"X-API-Key": admin})
        assert r.status_code == 200 and r.json()["was_blocked"] is False
    with _started(quick_bundle, query_monitor={"policy": {"enabled": False}}, admin_api_key=admin) as client:
        r = client.post("/admin/query-monitor/unblock?client=ip:1.2.3.4", headers={"X-API-Key": admin})
        assert r.status_code == 422 and "query monitor is off" in r.json()["error"]["message"]
