"""The Redis store (service/redis_store.py) on a real redis-server started here on 127.0.0.1:
exact image round trips, certificates as JSON, expiry by TTL, a 503 `store_unavailable` when
Redis is gone, and two apps sharing images: posted to one, certified by the other."""

from __future__ import annotations

import hashlib
import selectors
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from tests.conftest import free_ports, png, stop_process

pytest.importorskip("redis")

PNG = {"content-type": "image/png"}


def free_port() -> int:
    [port] = free_ports(1)
    return port


class SilentRedis:
    """A TCP server on 127.0.0.1 that accepts connections and reads what they send, and never
    answers: a Redis that hangs (stopped, swapping, behind a network that drops its replies),
    which a refused port does not stand for. `connections` counts the accepted ones, so a test
    can tell how often a client tried."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.setblocking(False)
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-redis", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    if sock is self._listener:
                        try:
                            conn, _ = self._listener.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ)
                        self.connections += 1
                        continue
                    try:
                        data = sock.recv(65536)  # type: ignore[union-attr]  # read, never answered
                    except BlockingIOError:
                        continue
                    except ConnectionError:  # reset by the client: as closed
                        data = b""
                    if not data:  # the client closed it
                        sel.unregister(sock)
                        sock.close()  # type: ignore[union-attr]
            for key in list(sel.get_map().values()):
                if key.fileobj is not self._listener:
                    key.fileobj.close()  # type: ignore[union-attr]

    def connections_after(self, at_least: int, wait_s: float = 5.0) -> int:
        """The count once it reaches `at_least` (the thread accepts a moment after the client
        connects), or after `wait_s`: generous, never a bound a test times."""
        deadline = time.monotonic() + wait_s
        while self.connections < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.connections

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()


class NotRedis:
    """A server at a redis:// URL that is not Redis: it answers every command as an HTTP server
    would (a URL pointing at the wrong service)."""

    def __init__(self) -> None:
        import socketserver

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while self.request.recv(65536):
                    self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"redis://127.0.0.1:{self.server.server_address[1]}/0"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def not_redis() -> Iterator[NotRedis]:
    server = NotRedis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def silent_redis() -> Iterator[SilentRedis]:
    server = SilentRedis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not binary:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    import redis

    port = free_port()
    tmp = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                if redis.Redis.from_url(url, socket_connect_timeout=1).ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, timeout=10)


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


def test_image_and_certificate_round_trip(redis_url: str) -> None:
    from service.redis_store import RedisStore

    store = RedisStore(redis_url, prefix=prefix())
    assert store.ping()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 28, 28, generator=g) * 2 - 0.5  # any float32, negative included
    x[0, 0, 0] = float("inf")
    digest = "ab" * 32
    assert store.get_image(digest) is None
    store.put_image(digest, x)
    y = store.get_image(digest)
    assert y is not None and y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(x, y)  # bit for bit
    y[0, 0, 1] = 7.0  # writable, and a copy
    assert torch.equal(store.get_image(digest), x)
    # the stored value is raw float32 plus a header, never a pickle
    raw = store.client.get(store.image_key(digest))
    assert raw[:4] == b"SSF1" and len(raw) == 4 + 1 + 3 * 4 + 28 * 28 * 4
    assert store.client.pttl(store.image_key(digest)) > 3_500_000
    # a value that is not an image reads as missing
    store.client.set(store.image_key("cd" * 32), b"\x80\x04garbage")
    assert store.get_image("cd" * 32) is None

    key = (digest, "smoothing", "v1", 0.25, 100, 1000, 0.001, None, 123)
    cert = {"image_sha256": digest, "label": 7, "radius": 0.4312345678901234, "abstained": False,
            "p_a_lower": 0.9981, "seed": 123, "rejected_by": [], "class_name": None}
    assert store.get_certificate(key) is None
    store.put_certificate(key, cert)
    assert store.get_certificate(key) == cert
    assert store.get_certificate((*key[:-1], 124)) is None  # every part of the key counts
    ckey = store.certificate_key(key)
    assert ckey.startswith(store.prefix + "cert:") and digest not in ckey[len(store.prefix) + 5:]
    # another store with the same URL and prefix (another replica) sees both
    other = RedisStore(redis_url, prefix=store.prefix)
    assert torch.equal(other.get_image(digest), x) and other.get_certificate(key) == cert
    # a different prefix does not
    assert RedisStore(redis_url, prefix=prefix()).get_image(digest) is None


def test_entries_expire_after_max_age(redis_url: str) -> None:
    from service.redis_store import RedisStore

    # 1 s: a pause of the test process longer than that between put and get would expire them
    store = RedisStore(redis_url, max_age_s=1.0, prefix=prefix())
    store.put_image("ef" * 32, torch.zeros(1, 4, 4))
    store.put_certificate(("ef" * 32, "p"), {"label": 1})
    assert store.get_image("ef" * 32) is not None and store.get_certificate(("ef" * 32, "p")) == {"label": 1}
    assert 0 < store.client.pttl(store.image_key("ef" * 32)) <= 1000
    time.sleep(1.3)
    assert store.get_image("ef" * 32) is None and store.get_certificate(("ef" * 32, "p")) is None
    # limits of 0 turn the store off, as in memory
    off = RedisStore(redis_url, max_images=0, max_certificates=0, prefix=prefix())
    off.put_image("ef" * 32, torch.zeros(1, 4, 4))
    off.put_certificate(("k",), {"label": 1})
    assert off.get_image("ef" * 32) is None and off.get_certificate(("k",)) is None


def test_each_owner_keeps_its_newest_entries_and_no_other_owner_evicts_them(redis_url: str) -> None:
    """The count limits hold per owner on Redis (they were not enforced there at all: one
    key-holder's writes could push Redis into its global LRU and evict another's images)."""
    from service.redis_store import RedisStore
    from service.store import image_key

    store = RedisStore(redis_url, max_images=3, max_certificates=2, prefix=prefix())
    mine = [image_key("key:alice", f"{i:064x}") for i in range(5)]
    theirs = [image_key("key:bob", f"{i:064x}") for i in range(2)]
    shared = [f"{i + 100:064x}" for i in range(4)]
    for k in theirs:
        store.put_image(k, torch.zeros(1, 2, 2))
    for k in mine + shared:
        store.put_image(k, torch.full((1, 2, 2), 0.5))
        time.sleep(0.002)  # the server's clock orders them
    assert [store.get_image(k) is not None for k in mine] == [False, False, True, True, True]
    assert all(store.get_image(k) is not None for k in theirs)  # untouched by alice's five
    assert [store.get_image(k) is not None for k in shared] == [False, True, True, True]
    for owner, held in (("owner:key:alice", 3), ("owner:key:bob", 2), ("shared", 3)):
        index = f"{store.prefix}idx:img:{owner}"
        assert store.client.zcard(index) == held and 0 < store.client.pttl(index) <= store.ttl_ms
    for i in range(3):  # certificates: their image's owner, the certificates' own limit
        store.put_certificate((mine[i], "smoothing", i), {"label": i})
        time.sleep(0.002)
    store.put_certificate((theirs[0], "smoothing", 0), {"label": 9})
    assert [store.get_certificate((mine[i], "smoothing", i)) for i in range(3)] == [None, {"label": 1}, {"label": 2}]
    assert store.get_certificate((theirs[0], "smoothing", 0)) == {"label": 9}
    # the same image written again is one entry, now the newest
    store.put_image(mine[2], torch.ones(1, 2, 2))
    store.put_image(image_key("key:alice", "f" * 64), torch.ones(1, 2, 2))
    assert store.get_image(mine[2]) is not None and store.get_image(mine[3]) is None


def test_unreachable_redis_is_a_503_store_unavailable() -> None:
    from service.redis_store import RedisStore
    from service.store import StoreUnavailable

    store = RedisStore(f"redis://:secret@127.0.0.1:{free_port()}/0", prefix=prefix())
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get_image("ab" * 32)
    assert time.monotonic() - t0 < 5
    err = info.value
    assert (err.status, err.code, err.headers) == (503, "store_unavailable", {"Retry-After": "1"})
    assert "secret" not in err.message and "secret" not in store.url
    with pytest.raises(StoreUnavailable):
        store.put_certificate(("k",), {"label": 1})


def test_a_call_after_redis_closed_the_pooled_connection_reconnects(redis_url: str) -> None:
    """Redis closed the pooled connection (a restart, its `timeout`, CLIENT KILL): the next call
    reconnects and succeeds. It stays so now that a timeout is not retried (next test): the
    pool replaces a connection found closed, and a connection error still gets one retry."""
    import redis

    from service.redis_store import RedisStore

    store = RedisStore(redis_url, prefix=prefix())
    store.put_image("ab" * 32, torch.zeros(1, 2, 2))
    killed = redis.Redis.from_url(redis_url).client_kill_filter(_id=store.client.client_id())
    assert killed == 1
    assert torch.equal(store.get_image("ab" * 32), torch.zeros(1, 2, 2))


def test_a_redis_that_never_answers_is_a_503_store_unavailable_after_one_timeout(silent_redis, caplog) -> None:
    """The store's 1 s socket timeout against a Redis that accepts and hangs: a call raises
    StoreUnavailable after one connection and one timeout. A timeout is not retried (that is
    for a pooled connection Redis closed): redis-py's default retry did, inside the handshake's
    health check too, and held each call 4 s. Then every call fails at once for `retry_s`,
    without trying Redis (each waited the timeout: 8 requests/s where 177 were served, and one
    warning per request), and after it one call tries again; one warning for the outage."""
    import logging

    from service.redis_store import RedisStore
    from service.store import StoreUnavailable

    store = RedisStore(silent_redis.url, prefix=prefix(), retry_s=1.5)  # timeout_s: the default 1.0
    calls = (lambda: store.get_image("ab" * 32), lambda: store.put_certificate(("k",), {"label": 1}))
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        for i, call in enumerate(calls, start=1):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            elapsed = time.monotonic() - t0
            assert silent_redis.connections_after(i) == i  # one try per call
            # about 1 s; the bound is generous for a loaded machine, yet under the 4 s of retries
            assert elapsed < 3.5
            err = info.value
            assert (err.status, err.code, err.headers) == (503, "store_unavailable", {"Retry-After": "1"})
            assert "TimeoutError" in err.message
            # within retry_s of that failure: at once, Redis not tried
            t0 = time.monotonic()
            for _ in range(20):
                with pytest.raises(StoreUnavailable):
                    store.put_image("cd" * 32, torch.zeros(1, 2, 2))
            assert time.monotonic() - t0 < 0.5
            assert silent_redis.connections == i
            time.sleep(1.6)  # past retry_s: the next call tries Redis again
    warnings = [r.getMessage() for r in caplog.records if "redis store" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_a_store_back_from_an_outage_is_used_again(redis_url: str) -> None:
    """After retry_s, the call that tries Redis again and succeeds ends the outage."""
    from service.redis_store import RedisStore
    from service.store import StoreUnavailable

    store = RedisStore(redis_url, prefix=prefix(), retry_s=0.3)
    store._down_since = time.monotonic()  # as a failure leaves it
    with pytest.raises(StoreUnavailable):
        store.get_image("ab" * 32)
    time.sleep(0.35)
    store.put_image("ab" * 32, torch.ones(1, 2, 2))
    assert store._down_since is None and torch.equal(store.get_image("ab" * 32), torch.ones(1, 2, 2))


def test_an_outage_is_told_once_when_it_begins_and_once_when_it_ends(redis_url: str) -> None:
    """`on_down` (the app's `certify_store_down` gauge and outage counter): True at the first
    failure of an outage, nothing for the calls failed at once or tried again in vain, False
    at the call that finds Redis back."""
    import redis

    from service.redis_store import RedisStore
    from service.store import StoreUnavailable

    told: list[bool] = []
    store = RedisStore(redis_url, prefix=prefix(), retry_s=0.2, on_down=told.append)
    real_get, failing = store.client.get, [3]

    def get(key):
        if failing[0] > 0:
            failing[0] -= 1
            raise redis.exceptions.ConnectionError("refused")
        return real_get(key)

    store.client.get = get
    for _ in range(2):  # one failure that begins the outage, then one failed at once
        with pytest.raises(StoreUnavailable):
            store.get_image("ab" * 32)
    assert told == [True]
    for _ in range(2):  # past retry_s: Redis tried again in vain, twice
        time.sleep(0.25)
        with pytest.raises(StoreUnavailable):
            store.get_image("ab" * 32)
    assert told == [True] and failing == [0]
    time.sleep(0.25)
    assert store.get_image("ab" * 32) is None  # back
    store.get_image("ab" * 32)
    assert told == [True, False]


@pytest.fixture(scope="module")
def digit(mnist) -> tuple[bytes, int]:
    test = mnist.test.per_class(1)
    return png(test.x[3]), int(test.y[3])


def test_two_apps_share_images_and_certificates(make_client, redis_url: str, digit) -> None:
    """Two apps (two replicas) on one Redis: a digit posted to /predict on one is certified by
    GET /certify on the other, and the certificate is then cached for both."""
    from service.redis_store import RedisStore

    shared = {"store": "redis", "redis_url": redis_url, "redis_prefix": prefix()}
    one = make_client(warmup=False, certify=shared)
    two = make_client(warmup=False, certify=shared)
    assert isinstance(one.app.state.store, RedisStore) and one.app.state.store is not two.app.state.store
    body, y = digit
    digest = hashlib.sha256(body).hexdigest()
    query = f"/certify?image_sha256={digest}&n=500&n0=32"
    r = two.get(query)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_image"
    r = one.post("/predict?pipeline=smoothing", content=body, headers=PNG)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["image_sha256"] == digest
    r = two.get(query)
    assert r.status_code == 200, r.text
    cert = r.json()
    assert cert["image_sha256"] == digest and cert["label"] == y and not cert["cached"]
    assert (cert["n"], cert["n0"]) == (500, 32)
    again = one.get(query).json()  # the certificate two computed, from the shared cache
    assert again["cached"] and (again["label"], again["radius"], again["seed"]) == \
        (cert["label"], cert["radius"], cert["seed"])
    # memory stays the default
    from service.store import MemoryStore

    assert isinstance(make_client(warmup=False).app.state.store, MemoryStore)


def test_with_api_keys_replicas_keep_each_key_holders_images_its_own(make_client, redis_url: str, digit) -> None:
    """With api_keys, an image one key posted through one replica is found by that key through
    another, and by no other key (a 404, as for an image never posted); the Redis keys name the
    key's client, never the key or its digest."""
    import redis

    keys = {"tenant-a": "redis-tenant-a-" + "x4" * 10, "tenant-b": "redis-tenant-b-" + "y5" * 10}
    shared = {"store": "redis", "redis_url": redis_url, "redis_prefix": prefix()}
    api_keys = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in keys.items()}
    one = make_client(warmup=False, certify=shared, api_keys=api_keys)
    two = make_client(warmup=False, certify=shared, api_keys=api_keys)
    body, y = digit
    digest = hashlib.sha256(body).hexdigest()
    query = f"/certify?image_sha256={digest}&n=500&n0=32"
    r = one.post("/certify?n=500&n0=32", content=body, headers={**PNG, "X-API-Key": keys["tenant-a"]})
    assert r.status_code == 200 and r.json()["label"] == y, r.text
    r = two.get(query, headers={"X-API-Key": keys["tenant-b"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_image", r.text
    r = two.get(query, headers={"X-API-Key": keys["tenant-a"]})
    assert r.status_code == 200 and r.json()["cached"], r.text  # A's own certificate, from A's POST
    stored = [k.decode() for k in redis.Redis.from_url(redis_url).keys(shared["redis_prefix"] + "*")]
    assert f"{shared['redis_prefix']}img:key:tenant-a:{digest}" in stored
    assert not any(digest in k and "tenant-b" in k for k in stored)
    for key in keys.values():
        assert not any(key in k or hashlib.sha256(key.encode()).hexdigest() in k for k in stored)


def test_app_with_redis_down_answers_503_and_still_predicts(make_client, digit) -> None:
    body, _ = digit
    digest = hashlib.sha256(body).hexdigest()
    client = make_client(warmup=False, certify={"store": "redis", "redis_prefix": prefix(),
                                                 "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    r = client.get(f"/certify?image_sha256={digest}&n=500&n0=32")
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    # the operator sees it (docker/alerts.yml, CertifyStoreDown)
    metrics = client.get("/metrics").text
    assert "shieldserve_certify_store_down 1.0" in metrics and "shieldserve_certify_store_outages_total 1.0" in metrics
    # a prediction does not need the store
    r = client.post("/predict?pipeline=smoothing", content=body, headers=PNG)
    assert r.status_code == 200, r.text
    # nor does POST /certify (the store only caches there)
    r = client.post("/certify?n=500&n0=32", content=body, headers=PNG)
    assert r.status_code == 200 and not r.json()["cached"], r.text


def test_app_with_a_redis_that_never_answers_answers_503_and_still_predicts(make_client, digit,
                                                                           silent_redis) -> None:
    """GET /certify on a store whose Redis hangs: 503 `store_unavailable` with Retry-After,
    after the store's timeout, not the client's; /predict is still answered."""
    body, _ = digit
    digest = hashlib.sha256(body).hexdigest()
    client = make_client(warmup=False, certify={"store": "redis", "redis_prefix": prefix(),
                                                 "redis_url": silent_redis.url})
    t0 = time.monotonic()
    r = client.get(f"/certify?image_sha256={digest}&n=500&n0=32")
    assert time.monotonic() - t0 < 5  # about the 1 s timeout; generous
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    r = client.post("/predict?pipeline=smoothing", content=body, headers=PNG)  # remembering it fails quietly
    assert r.status_code == 200, r.text


def test_a_store_that_hangs_does_not_hold_an_answer_past_its_deadline(quick_bundle, digit) -> None:
    """/predict waited for its images to be stored (for a later GET /certify) before answering:
    a Redis that hangs made a 300 ms deadline a 200 after its 1 s timeout. The write is waited
    for until the deadline, then goes on in its thread."""
    import threading

    from service.store import MemoryStore

    class Hanging(MemoryStore):
        in_process = False  # as Redis: called from a worker thread
        release = threading.Event()

        def put_image(self, digest, x):  # type: ignore[no-untyped-def]
            self.release.wait(10)
            super().put_image(digest, x)

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    body, _ = digit
    store = Hanging(16, 16, 60.0)
    with TestClient(create_app(load_settings(bundle=quick_bundle, warmup=False), store=store)) as c:
        t0 = time.monotonic()
        r = c.post("/predict?pipeline=baseline", content=body, headers={**PNG, "X-Request-Timeout": "300ms"})
        took = time.monotonic() - t0
        Hanging.release.set()
        assert r.status_code == 200, r.text
        assert took < 3, took  # the deadline (0.3 s) and some; it was the store's wait (10 s here)


def test_app_whose_store_url_is_not_redis_answers_503_and_still_predicts(make_client, digit, not_redis) -> None:
    """A store URL answered by something that is not Redis (redis-py's InvalidResponse): GET
    /certify a 503 `store_unavailable`, /predict answered; both were 500s."""
    body, _ = digit
    digest = hashlib.sha256(body).hexdigest()
    client = make_client(warmup=False, certify={"store": "redis", "redis_prefix": prefix(), "redis_url": not_redis.url})
    r = client.get(f"/certify?image_sha256={digest}&n=500&n0=32")
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
    r = client.post("/predict?pipeline=smoothing", content=body, headers=PNG)
    assert r.status_code == 200, r.text


def test_the_memory_store_keeps_its_own_copy_of_each_image() -> None:
    """put_image copies (by numpy for CPU float32 tensors, by torch otherwise): the caller may
    reuse or change its tensor, and a view of a batch does not keep the batch alive."""
    import torch

    from service.store import MemoryStore

    store = MemoryStore()
    batch = torch.rand(3, 1, 28, 28)
    store.put_image("a", batch[1])
    store.put_image("b", batch[2].double().requires_grad_())
    want_a, want_b = batch[1].clone(), batch[2].clone()
    batch.zero_()
    a, b = store.get_image("a"), store.get_image("b")
    assert torch.equal(a, want_a) and a.dtype == torch.float32 and a.is_contiguous()
    assert a.untyped_storage().nbytes() == 28 * 28 * 4  # its own storage, not the batch's
    assert torch.allclose(b, want_b) and b.dtype == torch.float32 and not b.requires_grad


def test_without_the_redis_package_the_error_names_the_extra(monkeypatch) -> None:
    """`make install` leaves the extras out: a Redis store then failed start-up with a bare
    ModuleNotFoundError and no hint."""
    import sys

    from service.redis_store import connect

    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'shieldserve\[redis\]'"):
        connect("redis://127.0.0.1:1/0", 0.1)
