"""The Redis store (service/redis_store.py) on a real redis-server started here on 127.0.0.1:
exact image round trips, certificates as JSON, expiry by TTL, a 503 `store_unavailable` when
Redis is gone, and two apps sharing images: posted to one, certified by the other."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from tests.conftest import png

pytest.importorskip("redis")

PNG = {"content-type": "image/png"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


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

    store = RedisStore(redis_url, max_age_s=0.3, prefix=prefix())
    store.put_image("ef" * 32, torch.zeros(1, 4, 4))
    store.put_certificate(("ef" * 32, "p"), {"label": 1})
    assert store.get_image("ef" * 32) is not None and store.get_certificate(("ef" * 32, "p")) == {"label": 1}
    assert 0 < store.client.pttl(store.image_key("ef" * 32)) <= 300
    time.sleep(0.6)
    assert store.get_image("ef" * 32) is None and store.get_certificate(("ef" * 32, "p")) is None
    # limits of 0 turn the store off, as in memory
    off = RedisStore(redis_url, max_images=0, max_certificates=0, prefix=prefix())
    off.put_image("ef" * 32, torch.zeros(1, 4, 4))
    off.put_certificate(("k",), {"label": 1})
    assert off.get_image("ef" * 32) is None and off.get_certificate(("k",)) is None


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
    # a prediction does not need the store
    r = client.post("/predict?pipeline=smoothing", content=body, headers=PNG)
    assert r.status_code == 200, r.text
    # nor does POST /certify (the store only caches there)
    r = client.post("/certify?n=500&n0=32", content=body, headers=PNG)
    assert r.status_code == 200 and not r.json()["cached"], r.text


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
