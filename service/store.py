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
    """An LRU map with a size limit and a maximum age; safe to use from several threads."""

    def __init__(self, max_items: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_items, self.max_age_s, self.clock = max_items, max_age_s, clock
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._swept = float("-inf")
        self._sweep_every = min(1.0, max_age_s / 4)

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            now = self.clock()
            self._items[key] = (now, value)
            self._items.move_to_end(key)
            self._sweep(now)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            now = self.clock()
            self._sweep(now)
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] < now - self.max_age_s:  # stale, not swept yet
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def _sweep(self, now: float) -> None:
        # Entries are in use order, not age order, so a sweep scans them all: at most every
        # `_sweep_every` seconds (get() checks the entry it returns itself), not on every
        # request, where a full store made it ~0.2 ms of the event loop per image.
        if now - self._swept < self._sweep_every:
            return
        self._swept = now
        cutoff = now - self.max_age_s
        stale = [k for k, (t, _) in self._items.items() if t < cutoff]
        for k in stale:
            del self._items[k]

    def __len__(self) -> int:
        return len(self._items)


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
