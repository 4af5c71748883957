"""A bounded store of recently posted images (by the sha256 of their bytes) and of the
certificates computed for them, so `GET /certify?image_sha256=...` can find an image that was
posted to /predict or /certify.

`Store` is the interface; `MemoryStore` (the default) keeps both maps in memory, bounded by
count and by age, least recently used out first. `service.redis_store.RedisStore`, shared by
several replicas, implements the same four methods: images as raw float32 bytes plus shape,
certificates as JSON, both expiring after `max_age_s`. A store that cannot be reached raises
`StoreUnavailable`: a 503 `store_unavailable` answer, with `Retry-After`.

With `api_keys` set, every image (and so every certificate) is the posting key-holder's own:
it is stored under `image_key(owner, sha256)`, owner being the key's client tag, so another
key's `GET /certify` of the same sha256 misses it exactly as it misses an image never posted
(a 404 or a 200 must not tell one tenant what another posted). Without API keys a client is
only an address, too weak to scope by (a client whose address changes would lose its images),
and the store stays shared: `image_owner` is None.

The count bound is shared fairly between key-holders (`owner_of_key`): over `max_items`, the
store evicts the least recently used entry of the owner holding the most entries, so a
key-holder holding no more than its share (max_items // the owners present) loses entries
only to its own puts and to age, never to another's: one tenant's flood of images must not
turn another's `GET /certify` into a 404. With a single owner (no API keys) this is plain LRU.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from service.api.errors import ApiError


def image_owner(settings: Any, client: str | None) -> str | None:
    """Whose images `client` sees: its own client tag ("key:<name>", from api.clients.client_of;
    never the key itself) when the service has API keys, else None (one store shared by all)."""
    return client if settings.api_keys and client else None


def image_key(owner: str | None, digest: str) -> str:
    """The store key of the image with sha256 `digest` posted by `owner` (image_owner). The
    digest is last and of fixed length, so two (owner, digest) pairs never share a key."""
    return digest if owner is None else f"{owner}:{digest}"


def owner_of_key(key: Hashable) -> str | None:
    """The owner `image_key` built `key` from, for sharing the store's count bound fairly
    (_Bounded): a str key's part before its last ':' (the digest, last, is hex: it holds none,
    while a client tag may, "key:<name>" with any name), None for a bare digest; a tuple key
    (a certificate's: its image's store key first) is its first element's; anything else None."""
    if isinstance(key, tuple):
        key = key[0] if key else None
    if isinstance(key, str):
        owner, sep, _ = key.rpartition(":")
        return owner if sep else None
    return None


class StoreUnavailable(ApiError):
    """The shared store cannot be reached: 503 `store_unavailable`, retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(503, "store_unavailable", message, {"Retry-After": str(retry_after_s)})


class Store(Protocol):
    # True only for a store whose calls never block (no I/O): the API calls those on the event
    # loop and every other store's in a worker thread (api.predict.store_call)
    in_process: bool

    def put_image(self, digest: str, x: torch.Tensor) -> None: ...

    def get_image(self, digest: str) -> torch.Tensor | None: ...

    def put_certificate(self, key: Hashable, certificate: dict[str, Any]) -> None: ...

    def get_certificate(self, key: Hashable) -> dict[str, Any] | None: ...


class _Bounded:
    """An LRU map with a size limit and a maximum age; safe to use from several threads.

    The size limit is shared fairly between owners (`owner_of_key`): over it, the least
    recently used entry of the owner holding the most entries goes (between owners holding as
    many, the one whose least recently used entry was used longest ago). One OrderedDict per
    owner, in use order: a put or get is the one map's few dict operations plus finding its
    owner's, and only an eviction looks at every owner, O(owners): bounded by the configured
    API keys (one owner without them: exactly LRU)."""

    def __init__(self, max_items: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_items, self.max_age_s, self.clock = max_items, max_age_s, clock
        # owner -> key -> (time put, use tick, value), least recently used first; an owner
        # with no entries left is dropped, so the owners present are the dict's keys
        self._owners: dict[str | None, OrderedDict[Hashable, tuple[float, int, Any]]] = {}
        self._count = 0
        self._tick = 0  # a counter of uses, ordering entries of different owners
        self._lock = threading.Lock()
        self._swept = float("-inf")
        self._sweep_every = min(1.0, max_age_s / 4)

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_items <= 0:
            return
        owner = owner_of_key(key)
        with self._lock:
            now = self.clock()
            self._tick += 1
            items = self._owners.get(owner)
            if items is None:
                items = self._owners[owner] = OrderedDict()
            if key in items:
                items.move_to_end(key)
            else:
                self._count += 1
            items[key] = (now, self._tick, value)
            self._sweep(now)
            while self._count > self.max_items:
                self._evict()

    def get(self, key: Hashable) -> Any | None:
        owner = owner_of_key(key)
        with self._lock:
            now = self.clock()
            self._sweep(now)
            items = self._owners.get(owner)
            item = None if items is None else items.get(key)
            if item is None:
                return None
            if item[0] < now - self.max_age_s:  # stale, not swept yet
                self._delete(owner, items, key)
                return None
            self._tick += 1
            items[key] = (item[0], self._tick, item[2])
            items.move_to_end(key)
            return item[2]

    def _evict(self) -> None:
        # the least recently used entry of the owner holding the most; ties: the oldest such
        owners = self._owners
        if len(owners) == 1:
            owner, items = next(iter(owners.items()))
        else:  # C-level scans of the sizes: this runs for every put into a full store
            sizes = list(map(len, owners.values()))
            most = max(sizes)
            if sizes.count(most) == 1:
                owner = list(owners)[sizes.index(most)]
            else:
                owner = min((o for o, n in zip(owners, sizes) if n == most),
                            key=lambda o: next(iter(owners[o].values()))[1])
            items = owners[owner]
        items.popitem(last=False)
        self._count -= 1
        if not items:
            del owners[owner]

    def _delete(self, owner: str | None, items: OrderedDict[Hashable, tuple[float, int, Any]],
                key: Hashable) -> None:
        del items[key]
        self._count -= 1
        if not items:
            del self._owners[owner]

    def _sweep(self, now: float) -> None:
        # Entries are in use order, not age order, so a sweep scans them all: at most every
        # `_sweep_every` seconds (get() checks the entry it returns itself), not on every
        # request, where a full store made it ~0.2 ms of the event loop per image.
        if now - self._swept < self._sweep_every:
            return
        self._swept = now
        cutoff = now - self.max_age_s
        for owner, items in list(self._owners.items()):
            for k in [k for k, (t, _, _) in items.items() if t < cutoff]:
                self._delete(owner, items, k)

    def __len__(self) -> int:
        return self._count

    def keys(self) -> list[Hashable]:
        """Every key held, each owner's in use order (for tests and inspection; no entry is used)."""
        with self._lock:
            return [k for items in self._owners.values() for k in items]


class MemoryStore:
    """Images and certificates in process memory, bounded by count and age."""

    in_process = True  # its calls never block: the API calls it on the event loop

    def __init__(self, max_images: int = 4096, max_certificates: int = 4096, max_age_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.images = _Bounded(max_images, max_age_s, clock)
        self.certificates = _Bounded(max_certificates, max_age_s, clock)

    def put_image(self, digest: str, x: torch.Tensor) -> None:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            # a copy made by numpy: no torch call (each lets go of the GIL; this runs on the
            # event loop for every image /predict answers: api.predict.store_call)
            copy = torch.from_numpy(x.numpy().copy())
        else:
            copy = x.detach().to("cpu", torch.float32, copy=True)
        self.images.put(digest, copy)

    def get_image(self, digest: str) -> torch.Tensor | None:
        # a copy: whatever a pipeline does to its input, the next client's GET /certify of
        # this image starts from the bytes that were posted
        found = self.images.get(digest)
        return None if found is None else found.clone()

    def put_certificate(self, key: Hashable, certificate: dict[str, Any]) -> None:
        self.certificates.put(key, dict(certificate))

    def get_certificate(self, key: Hashable) -> dict[str, Any] | None:
        found = self.certificates.get(key)
        return dict(found) if found is not None else None
