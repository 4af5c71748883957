"""Who is asking: the client id the query monitor counts queries and flags by.

  * `api_keys` set (client name -> sha256 of its key): the key from `Authorization: Bearer KEY`
    or `X-API-Key: KEY` names the client ("key:<name>"); a missing or unknown key is 401
    `unauthorized`. Only digests are configured, so a leaked config leaks no key.
  * otherwise the peer address ("ip:<address>"), or, when the peer is one of
    `trusted_proxies` (the gateway), the first address of `X-Forwarded-For` counted from the
    right that is not a trusted proxy: the hops a client can forge are left of it. An IPv6
    address stands for its network of `client_ipv6_prefix` bits ("ip:2001:db8:1:2::/64"): a
    host is usually given a whole /64, so one address per query would otherwise be a new
    client per query, out of reach of the monitor's blocks and suspect marks and of the
    admission share. An IPv4-mapped IPv6 address is its IPv4 address.

Call it with the request inside the endpoint's request count (`tracked`): a 401 is counted too.
"""

from __future__ import annotations

import hashlib
import ipaddress
from functools import lru_cache

from fastapi import Request

from service.api.errors import ApiError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def _networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: an IPv4 host's address


def parse_address(text: str) -> Address | None:
    """The address a peer or X-Forwarded-For hop names, or None: as gateways write it, with
    brackets (`[2001:db8::1]`), a port (`192.0.2.1:50123`, `[2001:db8::1]:443`) or a zone
    (`fe80::1%eth0`) left out: a port or zone names a connection or an interface, not a client,
    and kept they would make each connection a new client. An IPv4-mapped IPv6 address is its
    IPv4 address (a dual-stack socket reports IPv4 peers that way)."""
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        rest = t[end + 1:] if end > 0 else "x"
        if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
            return None
        t = t[1:end]
    elif t.count(":") == 1:  # IPv4 with a port; an IPv6 address has at least two colons
        t, _, port = t.partition(":")
        if not (port.isascii() and port.isdigit()):
            return None
    try:
        ip = ipaddress.ip_address(t.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    ip = parse_address(address)
    return ip is not None and any(ip in net for net in networks)


def peer_is_trusted(scope: dict, proxies: tuple[str, ...]) -> bool:
    """Whether the connection's peer is one of `proxies` (trusted_proxies: the gateway)."""
    client = scope.get("client")
    return client is not None and bool(proxies) and _trusted(client[0], _networks(proxies))


def from_trusted_proxy(scope: dict) -> bool:
    """peer_is_trusted, with the app's trusted_proxies."""
    return peer_is_trusted(scope, tuple(scope["app"].state.runtime.settings.trusted_proxies))


def forwarded_client(peer: str, forwarded_for: str | None, trusted_proxies: tuple[str, ...]) -> str:
    """The client address: the peer, or the first untrusted hop of X-Forwarded-For (from the
    right) when the peer is a trusted proxy."""
    networks = _networks(trusted_proxies)
    if not networks or not forwarded_for or not _trusted(peer, networks):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop[:64]  # a forged hop can be anything; keep the id short
    return hops[0][:64] if hops else peer


def forwarded_for(request: Request) -> str | None:
    """Every X-Forwarded-For line of the request, joined in order: several lines of one header
    are one comma-separated list (RFC 9110 5.3). A gateway that appends its own line after the
    client's (rather than extending it, as nginx does) must not leave the client's forged line
    as the one read."""
    lines = request.headers.getlist("x-forwarded-for")
    return ",".join(lines) if lines else None


def api_key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


async def require_api_key(request: Request) -> None:
    """A route dependency, resolved before the route's parameters are validated: with API keys
    on, a request without a known key is 401 `unauthorized` before anything else about it is
    looked at (a bad query parameter or header was a 422 first, which told a client without a
    key the routes' parameter rules). Counted as the handler counts a 401: outcome
    `unauthorized`, under the pipeline the request names where that is served. `async`: a plain
    function would cost every request a hop to the thread pool, and this does no blocking work."""
    check_api_key(request)


def check_api_key(request: Request) -> None:
    """require_api_key's check, also run by BodyLimitMiddleware (service/api/middleware.py) on
    the pipeline routes before it reads a body: there a request without a known key gets its
    401 from its headers alone, not after up to the body limit of bytes held in memory. The
    client id it finds is kept (client_of), so the route's dependency finds it again for free."""
    if not request.app.state.runtime.settings.api_keys:
        return
    try:
        client_of(request)
    except ApiError as exc:
        exc.outcome = "unauthorized"  # type: ignore[attr-defined]
        exc.pipeline = _named_pipeline(request)  # type: ignore[attr-defined]
        raise


def _named_pipeline(request: Request) -> str:
    """The served pipeline a request names (a metric label: anything else is `unknown`)."""
    runtime = request.app.state.runtime
    settings = runtime.settings
    model = request.path_params.get("model")
    path = request.scope["path"]
    if model is None and path.startswith("/v2/models/"):
        # checked before routing (BodyLimitMiddleware), the path has no path_params yet: the
        # segment the routes' {model} matches
        model = path.split("/")[3]
    name = model or request.query_params.get("pipeline")
    if name is None:
        name = settings.certify.pipeline if request.url.path == "/certify" else settings.default_pipeline
    return name if name in runtime.pipelines else "unknown"


def client_of(request: Request) -> str:
    """The request's client id; 401 `unauthorized` when API keys are on and none matches. Found
    once per request (require_api_key finds it first where keys are on)."""
    known = getattr(request.state, "client_id", None)
    if known is None:
        known = request.state.client_id = _client_of(request)
    return known


def key_digests(key: str) -> set[str]:
    """The sha256 hex digests an API key as received may be configured under: of the header's
    own bytes and of its text as UTF-8 (see _client_of)."""
    return {hashlib.sha256(key.encode(codec)).hexdigest() for codec in ("latin-1", "utf-8")}


def _client_of(request: Request) -> str:
    settings = request.app.state.runtime.settings
    if settings.api_keys:
        key = api_key_of(request)
        if key is None:
            raise ApiError(401, "unauthorized", "this service needs an API key: Authorization: Bearer KEY "
                                                "or X-API-Key: KEY", {"WWW-Authenticate": "Bearer"})
        # the digest the docs have operators take, `printf %s "$KEY" | sha256sum`, is of the key's
        # UTF-8 bytes. Starlette decodes a header as latin-1: a client that sent UTF-8 (curl) is
        # matched by the header's own bytes, one that sent latin-1 (Python's http.client, so
        # requests and urllib; browsers' fetch) by the text encoded as UTF-8. Both are tried.
        digests = key_digests(key)
        for name, known in settings.api_keys.items():
            if known in digests:
                return f"key:{name}"
        raise ApiError(401, "unauthorized", "unknown API key", {"WWW-Authenticate": "Bearer"})
    peer = request.client.host if request.client is not None else "unknown"
    address = forwarded_client(peer, forwarded_for(request), tuple(settings.trusted_proxies))
    return "ip:" + client_network(address, settings.client_ipv6_prefix)


@lru_cache(maxsize=4096)  # 6 us a parse, on the event loop for every request; clients repeat
def client_network(address: str, ipv6_prefix: int) -> str:
    """What names a client with this address (parse_address): an IPv4 address itself, also
    where an IPv6 address carries it (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo's
    client); a loopback or link-local IPv6 address itself (a /64 there is every host of the
    link); any other IPv6 address its network of `ipv6_prefix` bits; what is no address (a
    forged hop, a test client's name) as it is."""
    ip = parse_address(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return str(ip.sixtofour)
        if ip.teredo is not None:
            return str(ip.teredo[1])
        if ipv6_prefix < 128 and not (ip.is_loopback or ip.is_link_local):
            return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)
