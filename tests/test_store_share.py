"""The in-memory /certify store shares its count bound fairly between key-holders
(service/store.py: `_Bounded`, `owner_of_key`): over `max_items`, the least recently used entry
of the owner holding the most goes, so a key-holder within its share (max_items // owners
present) loses nothing to another's puts, and one tenant's flood cannot turn another's
`GET /certify?image_sha256=` into a 404. With one owner (no API keys) it is plain LRU."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.store import MemoryStore, _Bounded, image_key, owner_of_key


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def img(v: float) -> torch.Tensor:
    return torch.full((1, 2, 2), float(v))


def held(store: MemoryStore, owner: str | None, ids: range | list[int]) -> list[int]:
    """Which of `owner`'s images `ids` the store still holds (a get: refreshes them)."""
    return [i for i in ids if store.get_image(image_key(owner, digest(i))) is not None]


# --------------------------------------------------------------------------- owner_of_key
@pytest.mark.parametrize("owner", [None, "key:alice", "key:a:b", "key:", "key::", "key:a b:c"])
def test_the_owner_of_a_key_is_the_one_it_was_built_from(owner: str | None) -> None:
    # an API key's name is any string (settings.api_keys' names are not checked): ':' included
    d = digest(7)
    assert owner_of_key(image_key(owner, d)) == owner
    # a certificate's key: its image's store key first
    assert owner_of_key((image_key(owner, d), "smoothing", "abc", "v1", 0.25, 100, 1000, 0.001, None, 0)) == owner


def test_a_key_of_any_other_kind_has_no_owner() -> None:
    assert owner_of_key(()) is None and owner_of_key(3) is None and owner_of_key((3, "x")) is None
    assert owner_of_key(digest(1)) is None


def test_a_client_tag_with_a_colon_in_its_name_is_accepted_by_the_settings() -> None:
    # what makes owner_of_key split at the LAST ':': a key's name may hold one
    from service.settings import Settings  # the client tag is f"key:{name}" (api.clients.client_of)

    s = Settings(api_keys={"team:a": "0" * 64})
    assert "team:a" in s.api_keys
    assert owner_of_key(image_key("key:team:a", digest(3))) == "key:team:a"


# --------------------------------------------------------------------------- (a) one owner: LRU
def test_without_api_keys_the_store_is_exactly_lru() -> None:
    store = MemoryStore(max_images=4, max_certificates=4, max_age_s=3600.0)
    for i in range(4):
        store.put_image(digest(i), img(i))
    assert len(store.images) == 4
    assert store.get_image(digest(0)) is not None  # 0 is used: 1 is now the oldest
    store.put_image(digest(4), img(4))
    assert store.get_image(digest(1)) is None
    store.put_image(digest(5), img(5))  # then 2
    assert store.get_image(digest(2)) is None
    assert [i for i in range(6) if store.get_image(digest(i)) is not None] == [0, 3, 4, 5]
    store.put_image(digest(3), img(33))  # a put of a held key refreshes it, and replaces it
    store.put_image(digest(6), img(6))  # 0 was got first in the line above: 0 goes
    assert store.get_image(digest(0)) is None and float(store.get_image(digest(3))[0, 0, 0]) == 33
    assert len(store.images) == 4


def test_a_store_of_size_zero_keeps_nothing() -> None:
    store = MemoryStore(max_images=0, max_certificates=0)
    store.put_image(image_key("key:a", digest(0)), img(0))
    store.put_certificate((image_key("key:a", digest(0)), "p"), {"r": 1})
    assert store.get_image(image_key("key:a", digest(0))) is None and len(store.images) == 0
    assert store.get_certificate((image_key("key:a", digest(0)), "p")) is None


# --------------------------------------------------------------------------- (b), (c) two owners
def test_one_key_holders_flood_evicts_none_of_anothers_images() -> None:
    store = MemoryStore(max_images=8, max_certificates=8, max_age_s=3600.0)
    for i in range(3):
        store.put_image(image_key("key:alice", digest(i)), img(i))
    for i in range(1000, 2000):
        store.put_image(image_key("key:mallory", digest(i)), img(i))
    assert len(store.images) == 8
    assert held(store, "key:alice", range(3)) == [0, 1, 2]
    assert held(store, "key:mallory", range(1000, 2000)) == list(range(1995, 2000))  # its own newest 5


def test_the_key_holder_over_its_share_is_the_one_evicted() -> None:
    store = MemoryStore(max_images=8, max_certificates=8, max_age_s=3600.0)
    for i in range(6):
        store.put_image(image_key("key:a", digest(i)), img(i))
    for i in (100, 101):
        store.put_image(image_key("key:b", digest(i)), img(i))
    assert store.get_image(image_key("key:a", digest(0))) is not None  # used: 1 is a's oldest now
    store.put_image(image_key("key:b", digest(102)), img(102))
    assert len(store.images) == 8
    assert held(store, "key:b", [100, 101, 102]) == [100, 101, 102]
    assert held(store, "key:a", range(6)) == [0, 2, 3, 4, 5]  # a's least recently used went


def test_between_owners_holding_as_many_the_oldest_entry_goes() -> None:
    store = MemoryStore(max_images=8, max_certificates=8, max_age_s=3600.0)
    for owner, base in (("key:a", 0), ("key:b", 10), ("key:c", 20)):
        for i in range(base, base + 2):
            store.put_image(image_key(owner, digest(i)), img(i))
    store.put_image(image_key("key:a", digest(2)), img(2))
    store.put_image(image_key("key:b", digest(12)), img(12))
    for i in (0, 1):  # a's 0 and 1 used: b's 10 is now the least recently used of all
        assert store.get_image(image_key("key:a", digest(i))) is not None
    store.put_image(image_key("key:c", digest(22)), img(22))  # 3, 3, 3 = 9 > 8
    assert held(store, "key:b", [10, 11, 12]) == [11, 12]
    assert held(store, "key:a", [0, 1, 2]) == [0, 1, 2] and held(store, "key:c", [20, 21, 22]) == [20, 21, 22]


def test_a_key_holder_within_its_share_keeps_its_images_while_several_others_flood() -> None:
    store = MemoryStore(max_images=12, max_certificates=12, max_age_s=3600.0)
    for i in range(4):  # 4 owners present: a share of 3 (at most)
        store.put_image(image_key("key:quiet", digest(i)), img(i))
    for i in range(1000, 1600):
        store.put_image(image_key(f"key:flood{i % 3}", digest(i)), img(i))
    assert len(store.images) == 12
    # over its share of 3 when the flood began: it lost 1, its oldest, then kept its share
    assert held(store, "key:quiet", range(4)) == [1, 2, 3]


# --------------------------------------------------------------------------- (d) certificates
def test_certificates_follow_the_owner_of_their_image() -> None:
    store = MemoryStore(max_images=8, max_certificates=8, max_age_s=3600.0)

    def cert_key(owner: str, i: int) -> tuple:
        return (image_key(owner, digest(i)), "smoothing", "sd", "v1", 0.25, 100, 1000, 0.001, None, 0)

    for i in range(3):
        store.put_certificate(cert_key("key:alice", i), {"radius": i})
    for i in range(1000, 1500):
        store.put_certificate(cert_key("key:mallory", i), {"radius": i})
    assert len(store.certificates) == 8
    assert [store.get_certificate(cert_key("key:alice", i)) for i in range(3)] == [{"radius": i} for i in range(3)]
    assert store.get_certificate(cert_key("key:mallory", 1499)) == {"radius": 1499}
    assert store.get_certificate(cert_key("key:mallory", 1000)) is None


# --------------------------------------------------------------------------- (e) age
def test_entries_past_their_age_go_whoever_owns_them() -> None:
    now = [1000.0]
    store = MemoryStore(max_images=4, max_certificates=4, max_age_s=60.0, clock=lambda: now[0])
    a, b = image_key("key:a", digest(0)), image_key("key:b", digest(1))
    store.put_image(a, img(0))
    now[0] += 30.0
    store.put_image(b, img(1))
    now[0] += 29.0
    assert store.get_image(a) is not None and store.get_image(b) is not None  # a 59 s old
    now[0] += 2.0  # a 61 s old, b 31 s: a read does not extend an age
    assert store.get_image(a) is None and store.get_image(b) is not None
    assert len(store.images) == 1
    now[0] += 30.0  # b too: swept by the next put (the sweep runs at most every second)
    store.put_image(image_key("key:c", digest(2)), img(2))
    assert len(store.images) == 1 and store.get_image(b) is None
    # the sweep frees a's and b's places: c alone may now fill the store
    for i in range(3, 6):
        store.put_image(image_key("key:c", digest(i)), img(i))
    assert held(store, "key:c", range(2, 6)) == [2, 3, 4, 5]


# --------------------------------------------------------------------------- (f) property
OWNERS = [None, "key:alice", "key:a:b", "key:"]


def contents(store: _Bounded) -> dict[str | None, list[str]]:
    """Each owner's keys in the store, least recently used first (without a get: no use)."""
    return {o: list(items) for o, items in store._owners.items()}


def reference_evict(order: OrderedDict[str, str | None]) -> None:
    """The rule, stated on one global use order: the first (least recently used) entry of an
    owner holding the most entries."""
    counts: dict[str | None, int] = {}
    for o in order.values():
        counts[o] = counts.get(o, 0) + 1
    most = max(counts.values())
    victim = next(k for k, o in order.items() if counts[o] == most)
    del order[victim]


@settings(max_examples=int(os.environ.get("SHIELDSERVE_HYPOTHESIS_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(max_items=st.integers(1, 10), n_owners=st.integers(1, 4),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 11)), max_size=120))
def test_no_put_evicts_an_entry_of_another_owner_within_its_share(max_items: int, n_owners: int,
                                                                    ops: list[tuple[bool, int, int]]) -> None:
    owners = OWNERS[:n_owners]  # 1: None alone, no API keys: plain LRU
    store = _Bounded(max_items, 3600.0, clock=lambda: 0.0)
    model: OrderedDict[str, str | None] = OrderedDict()  # key -> owner, in use order
    for is_put, who, d in ops:
        owner = owners[who % len(owners)]
        key = image_key(owner, digest(d))
        if not is_put:
            got = store.get(key)
            assert (got is not None) == (key in model)
            if key in model:
                assert got == key
                model.move_to_end(key)
            continue
        # the owners present once this put is in (the putter counts): max_items // that is each one's share
        present = set(model.values()) | {owner}
        share = max_items // len(present)
        protected = {}
        for o in present - {owner}:
            mine = [k for k, ko in model.items() if ko == o]
            if len(mine) <= share:
                protected[o] = mine
        store.put(key, key)
        model[key] = owner
        model.move_to_end(key)
        while len(model) > max_items:
            reference_evict(model)
        assert len(store) == len(model) <= max_items
        held = contents(store)
        for o, mine in protected.items():
            assert set(mine) <= set(held.get(o, [])), (o, mine, held)  # none lost to this put
        # the store holds what the rule says, each owner's in its use order
        assert held == {o: [k for k, ko in model.items() if ko == o] for o in set(model.values())}
    # what the store holds is what the rule says, in the same order
    for key in list(model):
        assert store.get(key) == key
