"""The image and certificate store on Redis, shared by every replica, so `GET /certify?image_sha256=`
finds an image whichever replica it was posted through (`certify.store: redis`).

Keys (the prefix is `certify.redis_prefix`, "shieldserve:" by default; no key holds a secret):
  <prefix>img:<sha256 of the image bytes>       the decoded image: a small header (magic, shape)
                                                  then raw little-endian float32 pixels
  <prefix>img:key:<client name>:<sha256>        the same, with `api_keys` set: the key-holder's
                                                  own (service.store.image_key), never the key
  <prefix>cert:<sha256 of the cache key, JSON>  the certificate, JSON (the cache key holds the
                                                  image's store key: scoped as the image is)
  <prefix>idx:img:<owner> / idx:cert:<owner>   each owner's entries by the time they were
                                                  written (a sorted set), for its count bound
Both expire `store_max_age_s` after they were written (Redis TTL; reading does not extend it).
Nothing is pickled: a value that does not parse is treated as missing. The count limits hold per
owner (`service.store.owner_of_key`: each API key-holder, or the one shared store without
keys): an owner keeps at most `store_max_images` images and `store_max_certificates`
certificates, its oldest going first, in one server-side script per write (atomic with the
write, whichever replica makes it). Before, the limits were not enforced on Redis, and with
`api_keys` one tenant's writes could push Redis into its global `allkeys-lru` eviction and evict
another tenant's images (its `GET /certify` then a 404). Size Redis' `maxmemory` for owners x
`store_max_images` x image size (about 3 KB a 28x28 digit), plus the certificates, and keep
`allkeys-lru` (docker-compose.yml does) as the backstop: then only an owner's own writes and the
TTL forget its entries. A limit of 0 still turns the store off.
When Redis cannot be reached, every method raises
`StoreUnavailable` (503 `store_unavailable`, Retry-After: 1) within about a second; after such a
failure every call raises it at once for `retry_s` (5 s), then one call at a time tries Redis
again while the others keep failing at once (a Redis that hangs held every /predict of the
replica for its timeout, and as many worker threads, for the whole outage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import threading
import time
from urllib.parse import unquote_plus
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

from service.store import StoreUnavailable, owner_of_key

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
    head, q, query = rest.partition("?")
    rest = head + q + _mask_query(query)
    return f"{scheme}{sep}{rest}" if sep else rest


_SEPARATOR = re.compile(r"[&;#]")


def _mask_query(query: str) -> str:
    """The query string with everything from the first password parameter's value on masked:
    redis-py reads `password=` with its key percent-decoded (`pass%77ord=`); a password that
    holds an unencoded '&' or '#' runs past where a parser ends it, so nothing after it is
    shown (a `;password=` or `password%3D...` that redis-py ignores is masked too)."""
    start = 0
    for m in [*_SEPARATOR.finditer(query), None]:
        token = query[start:m.start() if m is not None else len(query)]
        if unquote_plus(token).split("=", 1)[0].strip().lower() == "password":
            return f"{query[:start]}{token.split('=', 1)[0] if '=' in token else 'password'}=***"
        start = m.end() if m is not None else start
    return query


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
    try:
        import redis
    except ImportError as exc:  # an extra: `make install` installs the service's core packages only
        raise ImportError("a Redis store (certify.store or query_monitor.store: redis) needs the redis package: "
                          "pip install 'shieldserve[redis]' (the Dockerfile installs it)") from exc
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
    """What a Redis that is down, refusing, or not Redis raises. A URL answered by something else
    (an HTTP server, a proxy) raises InvalidResponse, which is neither a ConnectionError nor a
    ResponseError: it was a 500 on every monitored request, and on /predict with the certify
    store, where the store was to degrade. Not every RedisError: DataError is redis-py refusing
    an argument of ours, a bug to see, not an outage."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError,
            redis.exceptions.InvalidResponse)


# KEYS: the entry, its owner's index; ARGV: value, TTL in ms, the owner's cap. The index scores
# entries by the server's clock in microseconds (one clock for every replica; < 2^53, exact as
# a score); entries the TTL has removed are dropped from it first, then the oldest beyond the
# cap are deleted with their index entries. (Keys not in KEYS are deleted: standalone Redis, not Cluster.)
_BOUNDED_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
end
redis.call('PEXPIRE', KEYS[2], ttl)
return over
"""


class RedisStore:
    """Images and certificates in Redis, expiring after `max_age_s`."""

    in_process = False  # network round trips: the API calls it from worker threads

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", max_images: int = 4096,
                 max_certificates: int = 4096, max_age_s: float = 3600.0, prefix: str = "shieldserve:",
                 timeout_s: float = 1.0, client: Any = None, retry_s: float = 5.0,
                 on_down: Callable[[bool], None] | None = None) -> None:
        self.url, self.prefix = redact(url), prefix
        self.max_images, self.max_certificates = max_images, max_certificates
        self.ttl_ms = max(1, int(round(max_age_s * 1000)))
        self.client = client or connect(url, timeout_s)  # a request waits ~timeout_s, then gets a 503
        self._errors = unavailable_errors()
        self._bounded_put: Any = None  # the registered _BOUNDED_PUT script (at the first write)
        self.retry_s = retry_s
        self._down_since: float | None = None  # the last failure of an outage (None: up)
        self._probe = threading.Lock()  # held by the one call that tries a Redis found down
        self._state = threading.Lock()  # guards _down_since's changes
        # told True when an outage begins and False when it ends (the app's metrics)
        self._on_down = on_down or (lambda down: None)

    # ----------------------------------------------------------------------------- keys
    def image_key(self, digest: str) -> str:
        return f"{self.prefix}img:{digest}"

    def certificate_key(self, key: Hashable) -> str:
        text = json.dumps(list(key) if isinstance(key, tuple) else key, sort_keys=True, default=str)
        return f"{self.prefix}cert:{hashlib.sha256(text.encode()).hexdigest()}"

    def _index_key(self, kind: str, owner: str | None) -> str:
        return f"{self.prefix}idx:{kind}:{'shared' if owner is None else 'owner:' + owner}"

    def _put(self, what: str, kind: str, key: str, owner: str | None, value: bytes | str, cap: int) -> None:
        """SET key value with the TTL, and keep the owner's `cap` newest entries of `kind`."""
        script = self._bounded_put
        if script is None:
            script = self._bounded_put = self.client.register_script(_BOUNDED_PUT)
        self._call(what, script, keys=[key, self._index_key(kind, owner)], args=[value, self.ttl_ms, cap])

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        probing = False
        if self._down_since is not None:
            if time.monotonic() - self._down_since < self.retry_s or not self._probe.acquire(blocking=False):
                raise self._unavailable("down")
            probing = True
        try:
            result = fn(*args, **kwargs)
        except self._errors as exc:
            # calls that fail together begin one outage; the callback inside the lock, so that
            # an outage's end told by a call that succeeded meanwhile is never told before it
            with self._state:
                began = self._down_since is None
                self._down_since = time.monotonic()
                if began:
                    self._on_down(True)
            if began:  # once an outage, not once a request
                log.warning("redis store (%s) %s failed: %s; its calls fail at once for %g s, then one tries again",
                            self.url, what, exc, self.retry_s)
            raise self._unavailable(type(exc).__name__) from None
        finally:
            if probing:
                self._probe.release()
        if self._down_since is not None:
            with self._state:
                ended = self._down_since is not None
                self._down_since = None
                if ended:
                    self._on_down(False)
            if ended:
                log.warning("redis store (%s) is back", self.url)
        return result

    @staticmethod
    def _unavailable(why: str) -> StoreUnavailable:
        return StoreUnavailable(f"the shared image store (Redis) cannot be reached ({why}); retry later, "
                                f"or POST the image to /certify")

    # ----------------------------------------------------------------------------- Store
    def put_image(self, digest: str, x: torch.Tensor) -> None:
        if self.max_images <= 0:
            return
        self._put("put_image", "img", self.image_key(digest), owner_of_key(digest), encode_tensor(x), self.max_images)

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
        self._put("put_certificate", "cert", self.certificate_key(key), owner_of_key(key),
                  json.dumps(certificate, separators=(",", ":")), self.max_certificates)

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
