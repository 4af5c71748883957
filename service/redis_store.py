"""The image and certificate store on Redis, shared by every replica, so `GET /certify?image_sha256=`
finds an image whichever replica it was posted through (`certify.store: redis`).

Keys (the prefix is `certify.redis_prefix`, "shieldserve:" by default; no key holds a secret):
  <prefix>img:<sha256 of the image bytes>       the decoded image: a small header (magic, shape)
                                                  then raw little-endian float32 pixels
  <prefix>img:key:<client name>:<sha256>        the same, with `api_keys` set: the key-holder's
                                                  own (service.store.image_key), never the key
  <prefix>cert:<sha256 of the cache key, JSON>  the certificate, JSON (the cache key holds the
                                                  image's store key: scoped as the image is)
Both expire `store_max_age_s` after they were written (Redis TTL; reading does not extend it).
Nothing is pickled: a value that does not parse is treated as missing. The count limits
(`store_max_images`, `store_max_certificates`) are not enforced per key on Redis: bound the
memory with Redis' own `maxmemory` and `allkeys-lru` (docker-compose.yml does); a limit of 0
still turns the store off. That LRU is global, not shared fairly between key-holders as
service.store.MemoryStore's count bound is: with `api_keys`, one tenant's writes can evict
another's images and certificates under memory pressure (its `GET /certify` then a 404).
Sizing `maxmemory` for keys x `store_max_images` x image size (about 3 KB a 28x28 digit),
plus the certificates, keeps Redis off that pressure, so only the TTL forgets an entry.
When Redis cannot be reached, every method raises
`StoreUnavailable` (503 `store_unavailable`, Retry-After: 1) within about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from urllib.parse import unquote_plus
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from service.store import StoreUnavailable

log = logging.getLogger("shieldserve")

_MAGIC = b"SSF1"  # shieldserve float32 tensor, version 1
_MAX_DIMS = 8


def redact(url: str) -> str:
    """The URL without its password, for messages and logs: the one in the authority
    (`redis://:PW@host`) and the `password=` query parameter redis-py also reads. Not through
    urlsplit, which ends the authority at the first '/', '?' or '#': a password holding one
    (a generated one often does) that was not percent-encoded would be left in. Everything
    between `://` and the last '@' is the user information; all of it but the user goes."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user if colon else ''}:***@{rest}"
    rest = _QUERY_PARAM.sub(_mask_password, rest)
    return f"{scheme}{sep}{rest}" if sep else rest


# a query parameter: its key and value, up to the next parameter or the fragment
_QUERY_PARAM = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def _mask_password(m: re.Match[str]) -> str:
    # redis-py reads the key percent-decoded: `pass%77ord=` sets the password too
    return f"{m[1]}{m[2]}=***" if unquote_plus(m[2]).strip().lower() == "password" else m[0]


def encode_tensor(x: torch.Tensor) -> bytes:
    a = np.require(x.detach().to("cpu", torch.float32).numpy(), dtype="<f4", requirements="C")
    if a.ndim > _MAX_DIMS:
        raise ValueError(f"a tensor of {a.ndim} dimensions cannot be stored")
    return _MAGIC + struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape) + a.tobytes()


def decode_tensor(data: bytes) -> torch.Tensor | None:
    """The tensor `encode_tensor` wrote, or None when `data` is not one."""
    if len(data) < 5 or data[:4] != _MAGIC:
        return None
    ndim = data[4]
    start = 5 + 4 * ndim
    if ndim > _MAX_DIMS or len(data) < start:
        return None
    shape = struct.unpack(f"<{ndim}I", data[5:start])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - start != 4 * count:
        return None
    a = np.frombuffer(data, dtype="<f4", count=count, offset=start).reshape(shape)
    return torch.from_numpy(a.astype(np.float32))  # a writable copy


def connect(url: str, timeout_s: float) -> Any:
    """A Redis client that fails fast: short timeouts and one immediate retry (a pooled
    connection Redis closed), so a caller waits about `timeout_s` at most for a Redis that is
    gone and can fall back (the certify store answers 503, the query monitor goes per-replica)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # the retry is for a connection error only: Retry's default also retries timeouts, and a
    # timeout inside the connection's handshake (its health-check PING) is retried there as
    # well, so a Redis that accepts and never answers held the caller 4 x timeout_s
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                    retry=retry, retry_on_timeout=False, health_check_interval=30)
    except ValueError:
        pass
    # redis-py's message quotes the part of the URL it could not read, which for a password
    # holding '/', '?' or '#' unencoded is the password: raised here, outside the handler, so
    # that not even the exception's context keeps it
    raise ValueError(f"cannot read the Redis URL {redact(url)}: percent-encode any '/', '?', '#', '@' "
                     f"or ':' in its password")


def refused_errors() -> tuple[type[BaseException], ...]:
    """What a Redis that answers but refuses the command raises (a full `noeviction` Redis: OOM);
    a subset of `unavailable_errors`."""
    import redis

    return (redis.exceptions.ResponseError,)


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a Redis that is down or refusing raises."""
    import redis

    return redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError


class RedisStore:
    """Images and certificates in Redis, expiring after `max_age_s`."""

    in_process = False  # network round trips: the API calls it from worker threads

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", max_images: int = 4096,
                 max_certificates: int = 4096, max_age_s: float = 3600.0, prefix: str = "shieldserve:",
                 timeout_s: float = 1.0, client: Any = None) -> None:
        self.url, self.prefix = redact(url), prefix
        self.max_images, self.max_certificates = max_images, max_certificates
        self.ttl_ms = max(1, int(round(max_age_s * 1000)))
        self.client = client or connect(url, timeout_s)  # a request waits ~timeout_s, then gets a 503
        self._errors = unavailable_errors()

    # ----------------------------------------------------------------------------- keys
    def image_key(self, digest: str) -> str:
        return f"{self.prefix}img:{digest}"

    def certificate_key(self, key: Hashable) -> str:
        text = json.dumps(list(key) if isinstance(key, tuple) else key, sort_keys=True, default=str)
        return f"{self.prefix}cert:{hashlib.sha256(text.encode()).hexdigest()}"

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            log.warning("redis store (%s) %s failed: %s", self.url, what, exc)
            raise StoreUnavailable(f"the shared image store (Redis) cannot be reached ({type(exc).__name__}); "
                                   f"retry later, or POST the image to /certify") from None

    # ----------------------------------------------------------------------------- Store
    def put_image(self, digest: str, x: torch.Tensor) -> None:
        if self.max_images <= 0:
            return
        self._call("put_image", self.client.set, self.image_key(digest), encode_tensor(x), px=self.ttl_ms)

    def get_image(self, digest: str) -> torch.Tensor | None:
        data = self._call("get_image", self.client.get, self.image_key(digest))
        if data is None:
            return None
        x = decode_tensor(bytes(data))
        if x is None:
            log.warning("redis store: %s does not hold an image; ignored", self.image_key(digest))
        return x

    def put_certificate(self, key: Hashable, certificate: dict[str, Any]) -> None:
        if self.max_certificates <= 0:
            return
        self._call("put_certificate", self.client.set, self.certificate_key(key),
                   json.dumps(certificate, separators=(",", ":")), px=self.ttl_ms)

    def get_certificate(self, key: Hashable) -> dict[str, Any] | None:
        data = self._call("get_certificate", self.client.get, self.certificate_key(key))
        if data is None:
            return None
        try:
            found = json.loads(data)
        except ValueError:
            found = None
        return found if isinstance(found, dict) else None

    def ping(self) -> bool:
        return bool(self._call("ping", self.client.ping))

    def close(self) -> None:
        self.client.close()
