"""The query monitor's bounds on Redis, against the memory store's (service/defenses/query_monitor.py),
on a real redis-server started here: a suspect's remembered images (`suspect_history`, the
`block_window_s` TTL) and all suspects' images together (NEAR_MEMORY_BYTES, least recently seen
first); how long a query is remembered (slots of half of `memory_window_s`: at least half of it,
never the whole), the same on both stores, on a hand-moved clock; and a full `noeviction` Redis
(writes refused) that still holds the blocks and suspect marks recorded in it."""

from __future__ import annotations

import time
import types
import uuid

import numpy as np
import pytest
import torch

import service.defenses.query_monitor as qm
from service.defenses.query_monitor import AttackSuspected, MemoryStore, MonitorPolicy, QueryMonitor, RedisStore
from tests.conftest import MovedClock
from tests.test_redis_store import redis_url  # noqa: F401 - the real redis-server fixture

DIGIT = 784  # bytes of one remembered 28x28 image


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}:"


def _near(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with pixel (0, k) changed: it shares nearly every fingerprint hash with x."""
    y = x.clone()
    y[..., 0, k] = 0.5
    return y


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, DIGIT), dtype=np.uint8)


def _store(kind: str, url: str):
    return MemoryStore(window_s=100.0, max_queries=100) if kind == "memory" else RedisStore(url, _prefix(), 100.0, 100)


# --------------------------------------------------------------------------- a suspect's images
def test_on_redis_a_suspects_images_are_bounded_by_count_and_time(redis_url) -> None:  # noqa: F811
    """suspect_history (`keep`) and block_window_s (`seconds`) on Redis, as
    tests/test_query_monitor.py checks them in memory: the last `keep` images, oldest first,
    under a TTL of `seconds`; gone once it has passed (a 0.05 s TTL, read 0.5 s later)."""
    store = RedisStore(redis_url, _prefix(), 100.0, 100)
    rows = _rows(10)
    assert store.recall("a", rows[:6], keep=4, seconds=60) == []
    back = store.recall("a", rows[6:], keep=4, seconds=60)
    assert [r.tolist() for r in back] == [r.tolist() for r in rows[2:6]]  # the last 4, oldest first
    key = store.prefix + "near:a"
    assert store.client.llen(key) == 4
    assert 0 < store.client.pttl(key) <= 60_000
    assert [r.tolist() for r in store.recall("a", rows[:1], keep=4, seconds=60)] == [r.tolist() for r in rows[6:]]
    store.recall("b", rows[:3], keep=4, seconds=0.05)
    time.sleep(0.5)  # ten times the TTL: Redis expires a key once its time has passed
    assert store.recall("b", rows[:1], keep=4, seconds=60) == []


def _held(store, client: str) -> int:
    """How many images the store holds for `client` (read without recalling, which writes)."""
    if isinstance(store, MemoryStore):
        return len(store._near.get(client, (0.0, []))[1])
    return int(store.client.llen(store.prefix + "near:" + client))


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_all_suspects_images_are_bounded_least_recently_seen_first(kind, redis_url, monkeypatch) -> None:  # noqa: F811
    """NEAR_MEMORY_BYTES over all suspects, on both stores alike (on Redis for all replicas
    together): past it the least recently seen suspects are forgotten, never the one just seen;
    one suspect alone over it keeps its images. Redis counts its bookkeeping too: the bound is
    room for 4 images of 2 suspects on either store."""
    image, suspect = (DIGIT, 0) if kind == "memory" else (DIGIT + qm.NEAR_REDIS_PER_IMAGE, qm.NEAR_REDIS_PER_SUSPECT)
    monkeypatch.setattr(qm, "NEAR_MEMORY_BYTES", 4 * image + 2 * suspect)
    store = _store(kind, redis_url)
    rows = _rows(12)
    assert store.recall("a", rows[:1], keep=4, seconds=60) == []
    assert store.recall("b", rows[1:3], keep=4, seconds=60) == []
    assert len(store.recall("a", rows[3:4], keep=4, seconds=60)) == 1  # at the bound; b is the oldest now
    store.recall("c", rows[4:5], keep=4, seconds=60)  # over it: b goes, not a
    assert [_held(store, c) for c in "abc"] == [2, 0, 1]
    store.recall("d", rows[5:9], keep=4, seconds=60)  # a goes, then c
    assert [_held(store, c) for c in "abcd"] == [0, 0, 0, 4]
    back = store.recall("d", rows[9:10], keep=8, seconds=60)  # alone and over the bound: kept
    assert [r.tolist() for r in back] == [r.tolist() for r in rows[5:9]] and _held(store, "d") == 5
    if kind == "memory":
        assert store._near_bytes == 5 * DIGIT
        return
    # Redis: the bookkeeping agrees with the lists, and no list is left that it does not count
    r, p = store.client, store.prefix
    sizes = {k.decode(): int(v) for k, v in r.hgetall(p + "near_bytes").items()}
    lists = {k.decode()[len(p + "near:"):]: r.llen(k) for k in r.scan_iter(p + "near:*")}
    assert sizes == {"d": 5 * image + suspect} and lists == {"d": 5}
    assert int(r.get(p + "near_total")) == 5 * image + suspect
    assert [m.decode() for m in r.zrange(p + "near_lru", 0, -1)] == ["d"]


def test_many_flagged_identities_keep_redis_within_the_bound(redis_url, monkeypatch) -> None:  # noqa: F811
    """The audit's flood (tmp near_oom.py): every new identity sends a near copy of one image,
    is flagged and has its images remembered; Redis keeps NEAR_MEMORY_BYTES of them in all,
    the latest suspects' (here room for 10 images of 2 suspects, 4 images a request)."""
    image, suspect = DIGIT + qm.NEAR_REDIS_PER_IMAGE, qm.NEAR_REDIS_PER_SUSPECT
    monkeypatch.setattr(qm, "NEAR_MEMORY_BYTES", 10 * image + 2 * suspect)
    m = QueryMonitor(store="redis", redis_url=redis_url, redis_prefix=_prefix(), secret="flood")
    policy = MonitorPolicy(action="reject")
    x = torch.zeros(1, 1, 28, 28)
    x[..., 4:24, 6:22] = torch.rand(1, 1, 20, 16, generator=torch.Generator().manual_seed(0))
    m.screen(policy, x, "ip:10.0.0.1")
    for i in range(2, 22):
        # four near copies, distinct from every other request's: one pixel of the top rows each
        batch = [x.clone() for _ in range(4)]
        for j, y in enumerate(batch):
            y[..., (4 * i + j) // 28, (4 * i + j) % 28] = 0.5
        v = m.screen(policy, torch.cat(batch), f"ip:10.0.0.{i}")
        assert all(v.flagged)
    assert m._down_since is None  # all of it on Redis
    r, p = m.redis.client, m.redis.prefix
    kept = {k: r.llen(k) for k in r.scan_iter(p + "near:*")}
    assert sorted(kept.values()) == [4, 4]  # 2 suspects' 4 images each: a third would be over
    assert int(r.get(p + "near_total")) == 8 * image + 2 * suspect
    assert r.exists(p + "near:" + m.client_tag("ip:10.0.0.21"))  # the latest is among them


# --------------------------------------------------------------------------- how long a query is remembered
def _clock(monkeypatch, start: float) -> list[float]:
    """Both of the module's clocks (time.time, which the Redis script is given, and
    time.monotonic, the memory store's) at `start`, moved by hand."""
    clock = [start]
    monkeypatch.setattr(qm, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=lambda: clock[0],
                                                          perf_counter=time.perf_counter))
    return clock


@pytest.mark.parametrize("kind", ["memory", "redis"])
@pytest.mark.parametrize("between", [False, True], ids=["alone", "another_query_between"])
@pytest.mark.parametrize("sent, asked, remembered", [
    (1000.0, 1099.999, True),    # sent as a slot began: still matched just short of the whole window
    (1000.0, 1100.0, False),     # never the whole window
    (1049.999, 1099.999, True),  # sent as a slot ended: matched half a window later...
    (1049.999, 1100.0, False),   # ...and not much longer: at least half the window, no more
])
def test_a_query_is_remembered_at_least_half_the_window_and_never_the_whole(
        kind, between, sent, asked, remembered, redis_url, mnist, monkeypatch) -> None:  # noqa: F811
    """memory_window_s 100 s: slots of 50 s (1000-1050, 1050-1100, ...). A query is matched
    until the end of the slot after its own, on both stores alike, whether the generation
    turned over in between (another query in the next slot) or not (both generations are
    dropped at once: the case where Redis used to keep the last one)."""
    clock = _clock(monkeypatch, 990.0)
    m = QueryMonitor(store=kind, redis_url=redis_url, redis_prefix=_prefix(), secret="window",
                     memory_window_s=100.0)
    policy = MonitorPolicy(action="flag", suspect_linf=0.0)
    x = mnist.test.x[3:4]
    clock[0] = sent
    assert m.screen(policy, x, "ip:1.1.1.1").matches == [0]
    if between:
        clock[0] = 1060.0  # a uniform image: it shares no hash with a digit
        assert m.screen(policy, torch.zeros(1, 1, 28, 28), "ip:2.2.2.2").matches == [0]
    clock[0] = asked
    matches = m.screen(policy, _near(x, 0), "ip:3.3.3.3").matches[0]
    assert (matches >= 40) if remembered else (matches == 0), matches
    assert m._down_since is None


# --------------------------------------------------------------------------- a full Redis
_Monotonic = MovedClock


def test_a_full_redis_keeps_its_blocks_and_suspects(redis_url, mnist, monkeypatch) -> None:  # noqa: F811
    """maxmemory 1 on a noeviction Redis: every write is refused (OOM), reads are answered. The
    monitor degrades to its own store, and still reads each client's block and suspect mark
    from Redis: in the request whose screen script failed and in those within retry_redis_s
    that do not try it; once Redis takes writes again it is used again."""
    import redis as redis_lib

    clock = _Monotonic()
    monkeypatch.setattr(qm, "time", clock)
    events: list[bool] = []
    m = QueryMonitor(store="redis", redis_url=redis_url, redis_prefix=_prefix(), secret="full", retry_redis_s=5.0,
                     on_degraded=events.append)
    block = MonitorPolicy(action="block", block_after=0, cooldown_s=900, suspect_linf=0.0)
    reject = MonitorPolicy(action="reject", suspect_linf=0.0)
    x, y = mnist.test.x[3:4], mnist.test.x[7:8]
    m.screen(block, x, "ip:6.6.6.6")
    assert m.screen(block, _near(x, 0), "ip:6.6.6.6").blocked_now  # blocked, in Redis
    m.screen(reject, y, "ip:7.7.7.7")
    assert m.screen(reject, _near(y, 0), "ip:7.7.7.7").flagged == [True]  # a suspect, in Redis
    admin = redis_lib.Redis.from_url(redis_url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(redis_lib.exceptions.ResponseError, match="maxmemory"):
            admin.set(m.redis.prefix + "probe", "1")  # the Redis is full
        with pytest.raises(AttackSuspected) as exc:  # blocked: the script only reads, nothing to refuse
            m.screen(block, mnist.test.x[20:21], "ip:6.6.6.6")
        assert 800 <= exc.value.retry_after <= 900
        assert events == [] and m._down_since is None
        v = m.screen(reject, mnist.test.x[50:51], "ip:7.7.7.7")  # its script writes: refused; the mark is read
        assert v.threshold == reject.suspect_threshold
        assert events == [True] and m._down_since is not None  # degraded
        clock.now += 1  # within retry_redis_s: the script is not tried, the block is still read
        with pytest.raises(AttackSuspected):
            m.screen(block, mnist.test.x[21:22], "ip:6.6.6.6")
        v = m.screen(reject, mnist.test.x[53:54], "ip:7.7.7.7")  # the suspect mark is read too
        assert v.threshold == reject.suspect_threshold
        v = m.screen(reject, mnist.test.x[51:52], "ip:8.8.8.8")  # anyone else is answered
        assert v.flagged == [False] and v.threshold == reject.threshold
        assert m.blocked_count() == 1
        clock.now += 5  # retry_redis_s later, still full: the blocked client's script (reads alone)
        with pytest.raises(AttackSuspected):  # succeeds, and is no sign that Redis takes writes again
            m.screen(block, mnist.test.x[23:24], "ip:6.6.6.6")
        assert events == [True] and m._down_since is not None  # it logged "Redis is back", then down again
    finally:
        admin.config_set("maxmemory", "0")
    clock.now += 5  # retry_redis_s later: Redis takes writes again
    with pytest.raises(AttackSuspected):
        m.screen(block, mnist.test.x[22:23], "ip:6.6.6.6")
    assert m.screen(reject, mnist.test.x[52:53], "ip:8.8.8.8").flagged == [False]
    assert events == [True, False] and m._down_since is None and not m._refused
