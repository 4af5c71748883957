"""A client's share of a replica (`admission.max_client_cost`, service/admission.py): one
client holding its share (of the units, and the same fraction of the request slots and of a
pipeline's queue) is refused with 429 `overloaded` on every inference route (counted as
`over_share`) while other clients are still admitted; a client's request heavier than its
share runs when the client has nothing else in flight, and a request whose client left keeps
its share held while its batch still runs; the refusal never names the client (an API key's
name is an identity); unset, clients share the replica as before."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.admission import Admission
from service.batcher import Overloaded
from tests.conftest import png

KEYS = {"alice": "alice-secret-key-0123456789", "bob": "bob-secret-key-0123456789"}


def test_a_client_past_its_share_is_refused_others_are_not():
    a = Admission(10_000, 256, retry_after_s=2, max_client_cost=1_000)
    a.admit(600, "x", "ip:192.0.2.1")
    a.admit(400, "y", "ip:192.0.2.1")  # exactly its share
    with pytest.raises(Overloaded) as refused:
        a.admit(1, "one more image", "ip:192.0.2.1")
    assert refused.value.status == 429 and refused.value.retry_after >= 2
    assert "192.0.2.1" not in str(refused.value)
    a.admit(1_000, "another client's", "ip:192.0.2.2")  # its own share, untouched
    a.admit(5, "no client (an in-process caller)")  # not counted against anyone
    a.release(400, "ip:192.0.2.1")
    a.admit(400, "room again", "ip:192.0.2.1")
    for cost, client in ((600, "ip:192.0.2.1"), (400, "ip:192.0.2.1"), (1_000, "ip:192.0.2.2"), (5, None)):
        a.release(cost, client)
    assert a.clients == {} and a.cost_in_flight == 0 and a.requests_in_flight == 0


def test_a_request_heavier_than_the_share_runs_alone_for_its_client():
    a = Admission(10_000, 256, max_client_cost=1_000)
    a.admit(3_000, "a certification heavier than the share", "key:alice")  # nothing else of alice's
    with pytest.raises(Overloaded) as refused:
        a.admit(1, "an image beside it", "key:alice")
    assert refused.value.status == 429
    a.admit(1, "bob is not alice", "key:bob")
    with pytest.raises(Overloaded) as full:  # the replica's own rule still holds, with its 503
        a.admit(8_000, "over the replica's budget", "key:carol")
    assert full.value.status == 503
    a.release(3_000, "key:alice")
    a.admit(1, "after it", "key:alice")


def test_the_share_covers_request_slots_and_queued_images_too():
    """Cheap requests weigh little: a client inside its units could still take every request
    slot or fill a pipeline's queue. The share is the same fraction of those (here 10%)."""
    a = Admission(200_000, 256, max_client_cost=20_000, max_queue=1024)
    assert (a.max_client_requests, a.max_client_images) == (25, 102)
    for _ in range(25):
        a.admit(1, "a baseline image", "ip:192.0.2.1")
    with pytest.raises(Overloaded) as refused:
        a.admit(1, "a 26th", "ip:192.0.2.1")
    assert refused.value.status == 429 and "25 of its 25 requests" in str(refused.value)
    a.admit(1, "another client", "ip:192.0.2.2")
    a.admit(64, "64 baseline images", "ip:192.0.2.3", images=64)
    with pytest.raises(Overloaded) as refused:
        a.admit(64, "64 more", "ip:192.0.2.3", images=64)
    assert refused.value.status == 429 and "64 of its 102 images" in str(refused.value)
    a.admit(38, "38 more fit", "ip:192.0.2.3", images=38)
    one = Admission(200_000, 256, max_client_cost=20_000, max_queue=1024)
    one.admit(200, "a request larger than the image share, alone", "key:a", images=200)
    assert Admission(10, 3, max_client_cost=1, max_queue=5).max_client_requests == 1  # at least one


def test_a_departed_request_keeps_its_clients_share_while_its_batch_runs():
    """service.batcher.outlives: the batch that still computes a departed request's rows keeps
    what it holds, for its client too; released when the batch ends."""
    from service.batcher import outlives

    a = Admission(10_000, 256, max_client_cost=1_000)
    with a.hold(900, "a request", "key:alice", images=3):
        let_go = outlives.get()()  # the request leaves while its batch runs
    assert a.clients == {"key:alice": [900, 1, 3]}
    with pytest.raises(Overloaded):
        a.admit(200, "alice again, while that batch runs", "key:alice")
    let_go()  # the batch ends
    assert a.clients == {} and a.cost_in_flight == 0 and a.requests_in_flight == 0
    a.admit(200, "now it fits", "key:alice")


def test_unset_clients_share_the_replica_budget_as_before():
    a = Admission(10_000, 256)
    for _ in range(9):
        a.admit(1_000, "x", "ip:192.0.2.1")
    with pytest.raises(Overloaded) as refused:
        a.admit(2_000, "y", "ip:192.0.2.1")
    assert refused.value.status == 503
    assert a.clients == {}  # nothing tracked per client


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(1, 1_500), st.booleans()),
                max_size=60))
def test_no_client_holds_more_than_its_share_in_two_requests(ops):
    """Whatever the order of admissions and releases: a client with two or more requests in
    flight holds at most its share, what is held adds up, and everything given back leaves
    nothing behind."""
    a = Admission(4_000, 16, max_client_cost=1_000)
    live: list[tuple[int, str | None]] = []
    for client, cost, release_first in ops:
        if release_first and live:
            c, who = live.pop(0)
            a.release(c, who)
        try:
            a.admit(cost, "op", client)
        except Overloaded:
            continue
        live.append((cost, client))
        for who, (held, n, images) in a.clients.items():
            mine = [c for c, w in live if w == who]
            assert n == len(mine) == images and held == pytest.approx(sum(a.held(c) for c in mine))
            assert n <= a.max_client_requests == 4  # a quarter of the 16 slots
            if n >= 2:
                assert held <= 1_000
        assert a.cost_in_flight == pytest.approx(sum(a.held(c) for c, _ in live))
    for c, who in live:
        a.release(c, who)
    assert a.clients == {} and a.cost_in_flight == pytest.approx(0) and a.requests_in_flight == 0


# --------------------------------------------------------------------------- over HTTP
@pytest.fixture
def keyed(make_client):
    keys = {name: hashlib.sha256(k.encode()).hexdigest() for name, k in KEYS.items()}
    return make_client(api_keys=keys, admission={"max_client_cost": 500, "retry_after_s": 3}, warmup=False)


def _v2_body(x) -> str:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": [float(v) for v in x.flatten()]}]})


def test_every_inference_route_refuses_a_client_holding_its_share(keyed, mnist):
    c = keyed
    adm = c.app.state.runtime.admission
    body = png(mnist.test.x[0])
    img = {"content-type": "image/png"}
    alice, bob = {"X-API-Key": KEYS["alice"]}, {"X-API-Key": KEYS["bob"]}
    r = c.post("/predict?pipeline=baseline", content=body, headers={**img, **alice})  # stored: hers
    assert r.status_code == 200, r.text
    digest = hashlib.sha256(body).hexdigest()
    adm.admit(499, "alice's request in flight", "key:alice")  # what a running request of hers holds
    try:
        refusals = [
            c.post("/predict?pipeline=magnet", content=body, headers={**img, **alice}),
            c.post("/predict?pipeline=smoothing", content=body, headers={**img, **alice}),
            c.post("/certify?pipeline=smoothing&n=1000&n0=32", content=body, headers={**img, **alice}),
            c.post("/v2/models/magnet/infer", content=_v2_body(mnist.test.x[0]),
                   headers={"Content-Type": "application/json", **alice}),
            c.get(f"/certify?image_sha256={digest}&pipeline=smoothing&n=1000&n0=32", headers=alice),
        ]
        for r in refusals:
            assert r.status_code == 429, (r.request.url, r.text)
            assert int(r.headers["Retry-After"]) >= 3
            text = r.text + json.dumps(dict(r.headers))
            assert "alice" not in text and KEYS["alice"] not in text  # the identity is not echoed
        for r in refusals[:3] + refusals[4:]:
            assert r.json()["error"]["code"] == "overloaded"
        assert "error" in refusals[3].json()  # /v2: the protocol's error body
        # bob is admitted beside her on the same replica
        r = c.post("/predict?pipeline=magnet", content=body, headers={**img, **bob})
        assert r.status_code == 200, r.text
        r = c.post("/certify?pipeline=smoothing&n=1000&n0=32", content=body, headers={**img, **bob})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
        # counted as the client's excess, not as the replica's load (no "add replicas" alert)
        assert 'shieldserve_requests_total{endpoint="predict",outcome="over_share",pipeline="magnet"} 1.0' in metrics
        assert 'shieldserve_requests_total{endpoint="certify",outcome="over_share",pipeline="smoothing"} 2.0' in metrics
        assert 'outcome="overloaded"' not in metrics
        assert "alice" not in metrics
    finally:
        adm.release(499, "key:alice")
    r = c.post("/predict?pipeline=magnet", content=body, headers={**img, **alice})
    assert r.status_code == 200, r.text
    assert adm.clients == {} and adm.cost_in_flight == 0 and adm.requests_in_flight == 0


def test_a_clients_costly_request_runs_when_it_has_nothing_else_in_flight(keyed, mnist):
    c = keyed
    rt = c.app.state.runtime
    n = 10_000
    assert rt.cost("smoothing", 1, {"n": n, "n0": 32, "certify": True}) > rt.admission.max_client_cost
    r = c.post(f"/certify?pipeline=smoothing&n={n}&n0=32", content=png(mnist.test.x[1]),
               headers={"content-type": "image/png", "X-API-Key": KEYS["alice"]})
    assert r.status_code == 200, r.text
    assert rt.admission.clients == {}


def test_the_setting_is_checked():
    from pydantic import ValidationError

    from service.settings import load_settings
    for bad in (0, -5):
        with pytest.raises(ValidationError):
            load_settings(admission={"max_client_cost": bad})
    assert load_settings().admission.max_client_cost is None
