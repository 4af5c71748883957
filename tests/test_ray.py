"""Ray Serve: the same app on a local Ray instance (num_cpus=2), a real predict on real
digits through Ray's HTTP proxy.

Skipped when Ray Serve is not installed: it is the `ray` extra, not a test extra (a ~70 MB
wheel and ~30 dependencies, and a Ray start-up per run); install it with
`pip install -e ".[ray]"` to run this file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import free_ports, png, tampered_copy

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
ray = pytest.importorskip("ray")

from service.ray_app import PROXY_ENV, RayOptions, deployment_options, start_serve  # noqa: E402
from service.settings import load_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# a monitored pipeline without defenses that blocks a client at its first flag
WATCH = {"watch": {"defenses": [], "query_monitor": {"action": "block", "block_after": 0, "cooldown_s": 600}}}
LIMITS = {"max_body_bytes": 1 << 20}  # the module's Ray: 1 MiB bodies, at the proxy and the replicas
# the module's deployment: up to 2 replicas of 16 request slots each
OPTIONS = RayOptions(min_replicas=1, max_replicas=2, target_ongoing_requests=4, max_ongoing_requests=16, num_cpus=0.5)


def free_port() -> int:
    [port] = free_ports(1)
    return port


def test_secrets_stay_out_of_the_replicas_runtime_env(monkeypatch) -> None:
    # Ray shows a runtime_env in its dashboard and job metadata: the replicas read secrets from
    # their own environment instead
    from service.ray_app import _runtime_env

    for k in [k for k in os.environ if k.startswith("SHIELDSERVE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SHIELDSERVE_ADMIN_API_KEY", "adm-secret-1")
    monkeypatch.setenv("SHIELDSERVE_QUERY_MONITOR__SECRET", "salt-secret-2")
    monkeypatch.setenv("SHIELDSERVE_CERTIFY__REDIS_URL", "redis://:pw-secret-3@10.0.0.2:6379/0")
    monkeypatch.setenv("SHIELDSERVE_QUERY_MONITOR__REDIS_URL", "redis://10.0.0.2:6379/1")  # no password: passed
    monkeypatch.setenv("SHIELDSERVE_BATCHING__MAX_BATCH_SIZE", "16")
    # not settings, so no settings' secret check covered them: a client's key for the
    # evaluation, and docker-compose's name for the monitor's key
    monkeypatch.setenv("SHIELDSERVE_EVAL_API_KEY", "eval-secret-4")
    monkeypatch.setenv("SHIELDSERVE_MONITOR_SECRET", "compose-secret-5")
    monkeypatch.setenv("SHIELDSERVE_PROGRESS", "0")  # read by the replicas: passed
    env = _runtime_env()["env_vars"]
    assert "secret" not in repr(env) and env["SHIELDSERVE_PROGRESS"] == "0"
    assert env["SHIELDSERVE_QUERY_MONITOR__REDIS_URL"] == "redis://10.0.0.2:6379/1"
    assert env["SHIELDSERVE_BATCHING__MAX_BATCH_SIZE"] == "16" and "PYTHONPATH" in env


def test_secrets_in_json_sections_or_odd_case_names_stay_out_of_the_runtime_env(monkeypatch) -> None:
    """pydantic-settings also takes a whole section as one JSON variable, and matches names and
    JSON keys whatever their case: a variable that sets a secret any of these ways stays out."""
    import json

    from service.ray_app import _runtime_env

    for k in [k for k in os.environ if k.upper().startswith("SHIELDSERVE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SHIELDSERVE_QUERY_MONITOR", json.dumps({"SECRET": "salt-secret-1", "store": "redis"}))
    # the threat is real: the settings read the section's secret
    assert load_settings().query_monitor.secret.get_secret_value() == "salt-secret-1"
    monkeypatch.setenv("SHIELDSERVE_CERTIFY", json.dumps({"redis_url": "redis://:pw-secret-2@10.0.0.2:6379/0"}))
    monkeypatch.setenv("SHIELDSERVE_Query_Monitor__Secret", "salt-secret-3")
    monkeypatch.setenv("SHIELDSERVE_Admin_Api_Key", "adm-secret-4")
    monkeypatch.setenv("SHIELDSERVE_Certify__Redis_Url", "redis://10.0.0.2:6379/0?password=pw-secret-5")
    # sections without a secret in them pass
    passed = {"SHIELDSERVE_QUERY_MONITOR__POLICY": json.dumps({"action": "block"}),
              "SHIELDSERVE_BATCHING": json.dumps({"max_batch_size": 16}),
              "SHIELDSERVE_LIMITS__FORMATS": json.dumps(["PNG"])}
    for k, v in passed.items():
        monkeypatch.setenv(k, v)
    env = _runtime_env()["env_vars"]
    assert "secret" not in repr(env)
    assert {k: v for k, v in env.items() if k.startswith("SHIELDSERVE_")} == passed
    monkeypatch.setenv("SHIELDSERVE_CERTIFY", json.dumps({"redis_url": "redis://10.0.0.2:6379/0", "store": "redis"}))
    monkeypatch.setenv("SHIELDSERVE_QUERY_MONITOR", json.dumps({"store": "redis", "secret": None}))
    env = _runtime_env()["env_vars"]
    assert "SHIELDSERVE_CERTIFY" in env and "SHIELDSERVE_QUERY_MONITOR" in env  # no password, no secret
    monkeypatch.setenv("SHIELDSERVE_CERTIFY", "{not json")  # unreadable here: kept out (the replica reads its own)
    assert "SHIELDSERVE_CERTIFY" not in _runtime_env()["env_vars"]
    # Ray Serve's proxy must not rewrite the client from X-Forwarded-For (the service decides)
    assert env["FORWARDED_ALLOW_IPS"] == ""


def test_deployment_options_autoscaling_and_gpu_fractions(quick_bundle: Path) -> None:
    cpu = deployment_options(load_settings(bundle=quick_bundle, device="cpu", graceful_timeout_s=7),
                             RayOptions(min_replicas=2, max_replicas=6, target_ongoing_requests=4,
                                        max_ongoing_requests=16))
    assert cpu["autoscaling_config"]["min_replicas"] == 2 and cpu["autoscaling_config"]["max_replicas"] == 6
    assert cpu["graceful_shutdown_timeout_s"] == 7  # the service's graceful period, not Ray's own
    assert cpu["autoscaling_config"]["target_ongoing_requests"] == 4
    assert cpu["max_ongoing_requests"] == 16 and "num_gpus" not in cpu["ray_actor_options"]
    gpu = deployment_options(load_settings(bundle=quick_bundle, device="cuda"), RayOptions())
    assert gpu["ray_actor_options"]["num_gpus"] == 0.5  # two replicas per GPU by default
    quarter = deployment_options(load_settings(bundle=quick_bundle, device="cuda:0"), RayOptions(num_gpus=0.25))
    assert quarter["ray_actor_options"]["num_gpus"] == 0.25
    with pytest.raises(ValueError):
        RayOptions(min_replicas=3, max_replicas=2).validated()
    with pytest.raises(ValueError):
        RayOptions(body_timeout_s=0).validated()
    os.environ["SHIELDSERVE_RAY_MAX_REPLICAS"] = "7"
    os.environ["SHIELDSERVE_RAY_BODY_TIMEOUT_S"] = "30"
    try:
        assert RayOptions.from_env().max_replicas == 7 and RayOptions.from_env().body_timeout_s == 30
    finally:
        del os.environ["SHIELDSERVE_RAY_MAX_REPLICAS"], os.environ["SHIELDSERVE_RAY_BODY_TIMEOUT_S"]


def test_a_bad_bundle_is_refused_before_ray_starts(quick_bundle: Path, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    """The driver verifies the bundle as every replica would: a corrupted artifact is one line
    and exit 2 from `serve --ray`, before Ray starts (it was a failed deployment after the
    replicas had tried, 260 lines and a RuntimeError, 34 s)."""
    from models.bundle import BundleError
    from service import cli, ray_app
    from service.ray_app import build_app

    bad = tampered_copy(quick_bundle, tmp_path / "bundle", "classifier.safetensors")
    with pytest.raises(BundleError, match="sha256"):
        build_app(options=RayOptions(max_replicas=1), bundle=bad)
    ray_init = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: ray_init.append(a))
    monkeypatch.setattr(ray_app, "start_serve", lambda *a: ray_init.append(a))
    monkeypatch.setenv("SHIELDSERVE_BUNDLE", str(bad))
    assert cli.main(["serve", "--ray", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shieldserve: error: ") and "classifier" in err[-1], err
    assert not ray_init


def test_a_config_the_runtime_refuses_is_refused_before_a_local_ray_starts(quick_bundle: Path, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    """What only the runtime refuses (here a monitor window larger than the bundle's images) is
    found on the driver when the replicas run on this machine: one line and exit 2 before Ray
    starts (it was each replica failing in turn, then a RuntimeError after a minute and ~300
    lines of their tracebacks, exit 1). With a cluster's address it is left to the replicas."""
    from service import cli, ray_app

    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: {quick_bundle}\nquery_monitor:\n  window: 1000\n")
    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(k.get("address")))
    monkeypatch.setattr(ray_app, "start_serve", lambda *a: started.append("serve"))

    def deployed(*a, **k):
        raise SystemExit("deployed")

    monkeypatch.setattr(ray_app.serve, "run", deployed)
    monkeypatch.delenv("SHIELDSERVE_RAY_ADDRESS", raising=False)
    assert cli.main(["serve", "--ray", "--config", str(config), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shieldserve: error: query_monitor.window (1000) is larger"), err
    assert not started
    # a cluster: the replicas, on its nodes, decide (the driver is not where they run)
    checked = []
    monkeypatch.setattr(ray_app, "check_runtime", lambda settings: checked.append(settings))
    with pytest.raises(SystemExit, match="deployed"):
        ray_app.run(str(config), port=free_port(), address="ray://10.0.0.1:10001")
    assert started == ["ray://10.0.0.1:10001", "serve"] and not checked


def test_a_replica_sets_up_logging_as_serve_does(quick_bundle: Path, monkeypatch, logging_restored_all) -> None:
    """A replica's app is built after logging is configured from its settings (`log_level`,
    `json_logs`): the service's access lines and JSON logs behind Ray too."""
    import logging

    import service.server
    from service import ray_app
    from service.logs import JsonFormatter, TextFormatter

    root = logging.getLogger()
    monkeypatch.setattr(service.server, "apply_process_settings", lambda settings: None)
    monkeypatch.setattr(ray_app, "replica_app", lambda settings: settings)
    settings = ray_app.build_replica(None, {"bundle": str(quick_bundle), "log_level": "error", "json_logs": False})
    assert settings.log_level == "error" and root.level == logging.ERROR
    assert isinstance(root.handlers[-1].formatter, TextFormatter)
    ray_app.build_replica(None, {"bundle": str(quick_bundle), "log_level": "debug"})
    assert root.level == logging.DEBUG and isinstance(root.handlers[-1].formatter, JsonFormatter)


def test_several_replicas_with_per_replica_stores_warn_at_start(caplog, default_bundle: Path) -> None:
    """Each replica's `memory` stores are its own (the query monitor's queries, blocks and key;
    the /certify images): with more than one replica the driver warns, once, and names the fix;
    it still starts (a default `serve --ray` runs up to 4 replicas on memory stores)."""
    import logging

    from service.ray_app import build_app, unshared_state_warning

    default = load_settings(bundle=default_bundle)
    assert default.query_monitor.store == "memory" and default.certify.store == "memory"
    warning = unshared_state_warning(default, max_replicas=4)
    assert warning is not None and "up to 4 replicas" in warning
    for needed in ("query_monitor.store: redis", "query_monitor.secret", "certify.store: redis",
                   "a block holds on one replica only", "GET /certify answers 404"):
        assert needed in warning, needed
    assert unshared_state_warning(default, max_replicas=1) is None
    shared = load_settings(bundle=default_bundle, query_monitor={"store": "redis"}, certify={"store": "redis"})
    assert unshared_state_warning(shared, max_replicas=8) is None
    only_certify = unshared_state_warning(load_settings(bundle=default_bundle, query_monitor={"store": "redis"}),
                                          max_replicas=2)
    assert only_certify is not None and "certify.store: redis" in only_certify and "query monitor" not in only_certify
    # a /certify store turned off (store_max_images 0) holds nothing to miss
    assert unshared_state_warning(load_settings(bundle=default_bundle, query_monitor={"store": "redis"},
                                                certify={"store_max_images": 0}), max_replicas=2) is None

    # build_app (on the driver, without starting Ray) logs it once, and still builds the app
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        app = build_app(options=RayOptions(max_replicas=3), bundle=default_bundle)
    assert app is not None
    warned = [r for r in caplog.records if r.name == "shieldserve" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "up to 3 replicas" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        build_app(options=RayOptions(max_replicas=1), bundle=default_bundle)
        build_app(options=RayOptions(max_replicas=3), bundle=default_bundle,
                  query_monitor={"store": "redis", "secret": "s3cret-key"}, certify={"store": "redis"})
    assert not [r for r in caplog.records if r.name == "shieldserve" and r.levelno >= logging.WARNING]


def test_rays_own_503_and_timeout_follow_the_services_settings(default_bundle: Path) -> None:
    """Past max_queued_requests Ray's proxy answers by itself: with the status and Retry-After
    of the service's 503 `overloaded`. Its timeout lies past the longest deadline a client may
    ask for, so the replica's 504 comes first."""
    from service.ray_app import RAY_TIMEOUT_MARGIN_S, http_options

    settings = load_settings(bundle=default_bundle, admission={"retry_after_s": 3}, max_request_timeout_s=90,
                             host="0.0.0.0", port=8123)
    backpressure = deployment_options(settings, RayOptions())["backpressure_config"]
    assert backpressure.status_code == 503 and backpressure.retry_after_s == 3
    options = http_options(settings)
    assert options == {"host": "0.0.0.0", "port": 8123, "request_timeout_s": 90 + RAY_TIMEOUT_MARGIN_S}
    assert RAY_TIMEOUT_MARGIN_S > 0
    from ray.serve.config import HTTPOptions

    HTTPOptions.model_validate(options)  # what serve.start does with it


def _asgi(app, path: str, headers: dict[str, str] | None = None, body: list[bytes] | None = None,
          method: str = "POST") -> tuple[dict, dict, bytes, list[int]]:
    """One request through an ASGI app, its body in the parts given (None: a client that sends
    nothing more). Returns the response's start message, its headers (lower-cased names; the
    values of a repeated one joined by ", "), its body, and how many parts the app read."""
    import asyncio

    parts, read, sent = list(body or [b""]), [0], []
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "scheme": "http",
             "http_version": "1.1", "root_path": ""}

    async def receive() -> dict:
        if body is None or read[0] >= len(parts):
            await asyncio.sleep(3600)  # the client sends nothing more
        read[0] += 1
        return {"type": "http.request", "body": parts[read[0] - 1], "more_body": read[0] < len(parts)}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    hdrs: dict[str, str] = {}
    for k, v in start["headers"]:
        name = bytes(k).decode().lower()
        hdrs[name] = f"{hdrs[name]}, {bytes(v).decode()}" if name in hdrs else bytes(v).decode()
    return start, hdrs, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read


def test_proxy_edge_checks_the_key_and_the_size_before_reading_the_body() -> None:
    """Ray's proxy read a body whole, with no limit, before the replica's limit and key check
    saw it; in front of it (service.ray_proxy) the key is checked from the headers, the size
    from Content-Length and then from the bytes received, and the body is read whole (each
    part within body_timeout_s) before Ray gets the request."""
    import hashlib
    import json

    from service.ray_proxy import ProxyConfig, ProxyEdgeMiddleware

    seen = []

    async def ray_proxy(scope, receive, send):  # stands for Ray's proxy app: echoes the body it got
        message = await receive()
        seen.append(message)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": message["body"]})

    key = hashlib.sha256(b"k-1").hexdigest()
    edge = ProxyEdgeMiddleware(ray_proxy, ProxyConfig(max_body_bytes=100, body_timeout_s=0.2, api_keys=(key,)))
    # no key, or a wrong one, on a pipeline route: 401 from the headers, nothing of the body read
    for path, headers in (("/predict", {}), ("/certify", {"X-API-Key": "nope"}),
                          ("/v2/models/default/infer", {"Authorization": "Bearer nope"})):
        start, h, body, read = _asgi(edge, path, {"Content-Length": "1000000", **headers}, [b"x" * 50] * 40)
        assert start["status"] == 401 and read == [0] and not seen, (path, body)
        assert h["content-type"] == "application/json" and h["connection"] == "close"
        assert h["www-authenticate"] == "Bearer" and len(h["x-request-id"]) == 36  # the id Ray would make
        error = json.loads(body)["error"]
        assert error == "unknown API key" if path.startswith("/v2/") else error["code"] == "unauthorized", error
    # with the key: too large by Content-Length (not read), or by the bytes received (read up to the limit)
    start, h, body, read = _asgi(edge, "/predict", {"X-API-Key": "k-1", "Content-Length": "101", "X-Request-ID": "t-1"},
                                 [b"x" * 101])
    assert start["status"] == 413 and read == [0] and h["x-request-id"] == "t-1" and h["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    start, h, body, read = _asgi(edge, "/predict", {"X-API-Key": "k-1"}, [b"x" * 60] * 40)
    assert start["status"] == 413 and read == [2] and not seen
    # a body that stops arriving: 408 after body_timeout_s, Ray never saw the request
    start, h, body, read = _asgi(edge, "/predict", {"X-API-Key": "k-1"}, None)
    assert start["status"] == 408 and json.loads(body)["error"]["code"] == "request_timeout" and not seen
    # within the limits: Ray gets the whole body in one message (no replica slot held while it arrives)
    start, h, body, read = _asgi(edge, "/predict", {"Authorization": "Bearer k-1"}, [b"ab", b"cd", b"e"])
    assert start["status"] == 200 and body == b"abcde" and seen[-1]["more_body"] is False
    # keys are for the pipeline routes only (as the replica checks them); the size limit is for all
    assert _asgi(edge, "/healthz", {}, [b"x" * 100])[0]["status"] == 200
    assert _asgi(edge, "/healthz", {}, [b"x" * 101])[0]["status"] == 413
    # a Content-Length of 5,000 digits is over the limit (int() raised on it), leading zeros are not
    assert _asgi(edge, "/healthz", {"Content-Length": "9" * 5000}, [b"x"])[0]["status"] == 413
    assert _asgi(edge, "/healthz", {"Content-Length": "0" * 5000 + "3"}, [b"xyz"])[0]["status"] == 200


def test_proxy_edge_drops_rays_timeout_header_and_counts_a_client_gone_mid_upload() -> None:
    """X-Request-Timeout-Seconds is Ray's own per-request timeout: 0 turned it off, a few ms had
    Ray cancel the request at the replica (which counted it as a client gone); dropped, as the
    nginx gateway drops it. A client gone during its upload was neither counted nor logged
    (Ray never saw it); it is `client_closed` 499, as the replica counts one."""
    import asyncio

    from service.ray_proxy import ProxyConfig, ProxyEdgeMiddleware

    headers_seen: list[list[bytes]] = []

    class Counter:
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def inc(self, tags: dict) -> None:
            self.seen.append(tags)

    counter = Counter()

    async def ray_proxy(scope, receive, send):
        headers_seen.append([k for k, _ in scope["headers"]])
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    edge = ProxyEdgeMiddleware(ray_proxy, ProxyConfig(max_body_bytes=100, body_timeout_s=0.2), counter)
    for name in ("X-Request-Timeout-Seconds", "x-request-timeout-seconds"):
        assert _asgi(edge, "/predict", {name: "0", "X-Request-Timeout": "2"}, [b"x"])[0]["status"] == 200
    assert all(b"x-request-timeout-seconds" not in seen and b"x-request-timeout" in seen for seen in headers_seen)
    assert counter.seen == []

    messages = [{"type": "http.request", "body": b"x" * 10, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"50")],
             "client": ("127.0.0.1", 5000)}
    asyncio.run(edge(scope, receive, send))
    assert sent == [] and counter.seen == [{"status": "499", "code": "client_closed"}] and len(headers_seen) == 2


def test_proxy_edge_counts_and_logs_what_it_refuses(caplog) -> None:
    """The proxy's own 401/400/413/408 never reach Ray's proxy, so neither Ray's metrics nor
    the replicas' saw them: each is counted (the Ray counter, by status and code) and logged in
    the proxy's log (Ray Serve's logger), without the key; a client's request id is written only
    when the service would take it and its path quoted, so neither can pass for fields of the
    line; what passes to Ray is neither counted nor logged."""
    import hashlib
    import logging

    from service.ray_proxy import REFUSED_METRIC, ProxyConfig, ProxyEdgeMiddleware, _refused_counter

    class Counter:
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def inc(self, tags: dict) -> None:
            self.seen.append(tags)

    async def ray_proxy(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    counter = Counter()
    key = hashlib.sha256(b"k-secret-1").hexdigest()
    edge = ProxyEdgeMiddleware(ray_proxy, ProxyConfig(max_body_bytes=10, body_timeout_s=0.2, api_keys=(key,)), counter)
    with caplog.at_level(logging.INFO, logger="ray.serve.shieldserve"):
        assert _asgi(edge, "/predict", {"X-API-Key": "k-wrong-2"}, [b"x"])[0]["status"] == 401
        assert _asgi(edge, "/predict", {"X-API-Key": "k-secret-1", "Content-Length": "2x"}, [b"x"])[0]["status"] == 400
        assert _asgi(edge, "/predict", {"X-API-Key": "k-secret-1", "X-Request-ID": "z, client 10.0.0.7) forged"},
                     [b"x" * 11])[0]["status"] == 413
        assert _asgi(edge, "/predict", {"Authorization": "Bearer k-secret-1"}, None)[0]["status"] == 408
        assert _asgi(edge, "/predict", {"X-API-Key": "k-secret-1"}, [b"x"])[0]["status"] == 200
    assert counter.seen == [{"status": "401", "code": "unauthorized"}, {"status": "400", "code": "bad_request"},
                            {"status": "413", "code": "payload_too_large"}, {"status": "408", "code": "request_timeout"}]
    lines = [r.getMessage() for r in caplog.records if r.name == "ray.serve.shieldserve"]
    assert len(lines) == 4 and all(line.startswith("refused at the proxy: POST ") for line in lines), lines
    assert all(line.endswith(", path '/predict')") for line in lines), lines
    assert lines[2].startswith("refused at the proxy: POST 413 payload_too_large (request id (not shown: not a token), "
                               "client 127.0.0.1, path"), lines[2]
    assert "forged" not in "".join(lines)
    assert not any("k-wrong-2" in line or "k-secret-1" in line or key in line for line in lines)
    # outside a Ray worker there is no counter to record to (a metric recorded there fails)
    if not ray.is_initialized():
        assert _refused_counter() is None
    assert REFUSED_METRIC == "shieldserve_proxy_refused_requests"


def test_proxy_edge_reads_a_refused_body_from_a_trusted_proxy_and_keeps_the_connection() -> None:
    """Behind the nginx gateway (docs/operations.md), a 401 or 413 answered with the body unread
    and `Connection: close` made nginx take Ray's proxy for a failed upstream, as it did the
    replicas (tests/test_deploy.py): from a trusted proxy the body is read and thrown away, the
    connection kept; from anyone else, as before."""
    import hashlib

    from service.ray_proxy import ProxyConfig, ProxyEdgeMiddleware

    async def ray_proxy(scope, receive, send):  # never reached here
        raise AssertionError("Ray got a refused request")

    key = hashlib.sha256(b"k-1").hexdigest()
    for trusted, kept in ((("127.0.0.1",), True), (("10.0.0.0/8",), False)):
        edge = ProxyEdgeMiddleware(ray_proxy, ProxyConfig(max_body_bytes=100, body_timeout_s=0.2, api_keys=(key,),
                                                          trusted_proxies=trusted))
        for headers, status in (({}, 401), ({"X-API-Key": "k-1", "Content-Length": "200"}, 413),
                                ({"X-API-Key": "k-1"}, 413)):
            start, h, _, read = _asgi(edge, "/predict", headers, [b"x" * 50] * 4)
            assert start["status"] == status and ("connection" not in h) == kept, (trusted, headers, h)
            assert read == [4 if kept else (3 if "Content-Length" not in headers and status == 413 else 0)], read


def test_proxy_edge_answers_rays_own_errors_in_the_contracts_json() -> None:
    """Ray's proxy answers its own errors in text/plain (backpressure 503, its timeout 408, an
    application not deployed 404) or not at all (a replica died with the request: uvicorn's bare
    500): each becomes the contract's JSON error, with an X-Request-ID; the service's own
    answers, and Ray's /-/ routes, pass untouched."""
    import json

    from ray.serve._private.http_util import RequestIdMiddleware as RaysRequestIdMiddleware

    from service.ray_proxy import ProxyConfig, ProxyEdgeMiddleware, middlewares

    def rays(status: int | None, headers=(), content_type=b"text/plain; charset=utf-8"):
        async def app(scope, receive, send):
            await receive()
            if status is not None:
                await send({"type": "http.response.start", "status": status,
                            "headers": [[b"content-type", content_type], *headers]})
                await send({"type": "http.response.body", "body": b"Ray's own words"})
        # as in the proxy: the service's middleware outside Ray's RequestIdMiddleware
        return ProxyEdgeMiddleware(RaysRequestIdMiddleware(app), ProxyConfig(retry_after_s=3))

    cases = [  # Ray's answer -> the contract's
        (rays(503, [[b"retry-after", b"2"]]), 503, "overloaded", "2"),  # backpressure
        (rays(503), 503, "unavailable", "3"),  # no replica (a deployment that failed)
        (rays(408), 504, "deadline_exceeded", None),  # Ray's request_timeout_s
        (rays(404), 503, "unavailable", "3"),  # the application deleted (serve --ray stopping)
        (rays(None), 503, "unavailable", "3"),  # the replica died: Ray answered nothing
    ]
    for app, status, code, retry_after in cases:
        start, h, body, _ = _asgi(app, "/predict", {}, [b"png"])
        assert (start["status"], json.loads(body)["error"]["code"]) == (status, code), body
        assert h["content-type"] == "application/json" and h.get("retry-after") == retry_after
        assert len(h["x-request-id"]) == 36 and "," not in h["x-request-id"]  # one id, Ray's kind
        start, h, body, _ = _asgi(app, "/v2/models/default/infer", {"X-Request-ID": "t-2"}, [b"{}"])
        assert start["status"] == status and isinstance(json.loads(body)["error"], str) and h["x-request-id"] == "t-2"
    service_503 = rays(503, [[b"retry-after", b"1"]], content_type=b"application/json")  # the service's own
    assert _asgi(service_503, "/predict", {}, [b""])[2] == b"Ray's own words"
    assert _asgi(rays(503), "/-/healthz", {}, [b""], method="GET")[2] == b"Ray's own words"
    # what Ray's proxy wants from the callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert validate_http_proxy_callback_return(middlewares())


def test_the_proxys_environment_carries_its_limits_and_no_key(quick_bundle: Path) -> None:
    import hashlib
    import json

    from service.ray_app import proxy_env
    from service.ray_proxy import CONFIG_ENV, ProxyConfig

    digest = hashlib.sha256(b"key-secret-1").hexdigest()
    settings = load_settings(bundle=quick_bundle, api_keys={"ci": digest}, limits={"max_body_bytes": 4096},
                             admission={"retry_after_s": 2})
    env = proxy_env(settings, RayOptions(body_timeout_s=9))
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "service.ray_proxy:middlewares"
    assert env["FORWARDED_ALLOW_IPS"] == "" and "secret" not in repr(env) and all(isinstance(v, str) for v in env.values())
    assert ProxyConfig.from_env(env) == ProxyConfig(max_body_bytes=4096, body_timeout_s=9, api_keys=(digest,),
                                                    retry_after_s=2)
    assert ProxyConfig.from_env({}) == ProxyConfig()  # unset: the settings' defaults
    with pytest.raises(ValueError):
        ProxyConfig.from_env({CONFIG_ENV: json.dumps({"max_body_bytes": 0})})


def request_ids(response) -> list[str]:
    return [v for k, v in response.headers.multi_items() if k.lower() == "x-request-id"]


def test_one_request_id_behind_rays_proxy_middleware(default_bundle: Path) -> None:
    """Ray's proxy (its RequestIdMiddleware: always there, no option) gives every request an
    X-Request-ID and appends that id to every response; the replica leaves its own copy out when
    it is the same id, so a response carries one. Checked with Ray's own middleware in process."""
    from fastapi.testclient import TestClient
    from ray.serve._private.http_util import RequestIdMiddleware as RaysRequestIdMiddleware

    from service.ray_app import replica_app

    app = replica_app(load_settings(bundle=default_bundle, warmup=False))
    through_ray = TestClient(RaysRequestIdMiddleware(app))  # no lifespan: /healthz and 404s need none
    for path in ("/healthz", "/no-such-route"):
        ids = request_ids(through_ray.get(path))  # no id: Ray makes one (a uuid4), the service takes it
        assert len(ids) == 1 and len(ids[0]) == 36, ids
        assert request_ids(through_ray.get(path, headers={"X-Request-ID": "abc-123"})) == ["abc-123"]
    # an id the service refuses (not a sane token): its own first, then the client's that Ray echoes
    for bad in ("has space/slash", "x" * 300):
        ids = request_ids(through_ray.get("/healthz", headers={"X-Request-ID": bad}))
        assert len(ids) == 2 and ids[1] == bad and ids[0] != bad and len(ids[0]) == 32, ids
    # a request with no id at all (which Ray's proxy never passes on) keeps the service's
    assert len(request_ids(TestClient(app).get("/healthz"))) == 1


@pytest.fixture(scope="module")
def ray_serve(quick_bundle: Path):
    from service.ray_app import APP_NAME, build_app

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # Serve's controller kills a proxy that is not ready within 5 s (then serve.start fails with
    # ActorDiedError): on a loaded 2-core machine a proxy's start takes longer than that
    patience = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    os.environ.update(patience)
    # the proxy's environment as `serve --ray` (service.ray_app.run) gives it
    forwarded = os.environ.get("FORWARDED_ALLOW_IPS")
    os.environ.update(PROXY_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "SHIELDSERVE_PROGRESS": "0", **patience,
                                       **PROXY_ENV}})
    try:
        port = free_port()  # once Ray's own sockets are bound (below the kernel's range: free_ports)
        # as `serve --ray` starts it: the proxies' options and environment (service.ray_proxy's
        # middleware and its limits) through Serve's controller
        start_serve(load_settings(bundle=quick_bundle, host="127.0.0.1", port=port, limits=LIMITS), OPTIONS)
        started = time.perf_counter()
        app = build_app(options=OPTIONS, bundle=quick_bundle, torch_threads=1, log_level="warning",
                        pipelines=WATCH, limits=LIMITS)
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"\n[ray] application running in {time.perf_counter() - started:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if forwarded is None:
            os.environ.pop("FORWARDED_ALLOW_IPS", None)
        else:
            os.environ["FORWARDED_ALLOW_IPS"] = forwarded


def test_rays_proxy_leaves_the_client_to_the_service(ray_serve: str, mnist) -> None:
    """Ray Serve's proxy runs uvicorn, whose X-Forwarded-For handling (trusting 127.0.0.1 by
    default) would rewrite the client it hands the replica; with FORWARDED_ALLOW_IPS empty it
    does not, so a local client forging X-Forwarded-For stays its peer address (trusted_proxies
    is empty here): blocked whatever it claims next."""
    import httpx

    with httpx.Client(base_url=ray_serve, timeout=60) as c:
        def post(x, forwarded_for):
            return c.post("/predict?pipeline=watch", content=png(x),
                          headers={"content-type": "image/png", "X-Forwarded-For": forwarded_for})

        x = mnist.test.x[3]
        near = x.clone()
        near[..., 0, 0] = 0.5
        assert post(x, "203.0.113.9").json()["results"][0]["status"] == "accepted"
        assert post(near, "203.0.113.9").json()["results"][0]["status"] == "rejected"
        r = post(mnist.test.x[10], "198.51.100.8")
        assert r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected", r.text


def test_predict_through_ray_serve(ray_serve: str, mnist) -> None:
    import httpx

    from service.ray_app import APP_NAME, DEPLOYMENT_NAME

    with httpx.Client(base_url=ray_serve, timeout=60) as c:
        assert c.get("/readyz").json()["status"] == "ok"
        correct, n = 0, 10
        for i in range(n):
            r = c.post("/predict", content=png(mnist.test.x[i]), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["pipeline"] == "default" and len(body["results"]) == 1
            correct += body["results"][0]["label"] == int(mnist.test.y[i])
        # several images in one request, multipart, as with the plain server
        files = [("file", (f"{i}.png", png(mnist.test.x[i]), "image/png")) for i in range(3)]
        r = c.post("/predict", files=files)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        # errors keep the contract's shape behind Ray's proxy
        r = c.post("/predict?pipeline=nope", content=png(mnist.test.x[0]), headers={"content-type": "image/png"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_pipeline"
        # one X-Request-ID through Ray's real proxy: the client's, or the one Ray made, which the
        # service took (it is in the body)
        r = c.post("/predict", content=png(mnist.test.x[0]), headers={"content-type": "image/png",
                                                                      "X-Request-ID": "trace-42"})
        assert request_ids(r) == ["trace-42"] and r.json()["request_id"] == "trace-42"
        r = c.post("/predict", content=png(mnist.test.x[0]), headers={"content-type": "image/png"})
        assert request_ids(r) == [r.json()["request_id"]]
    print(f"[ray] {correct}/{n} real digits classified correctly through Ray Serve")
    assert correct >= 8
    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    assert status.deployments[DEPLOYMENT_NAME].status == "HEALTHY"


def _open(base: str, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    """A raw HTTP/1.1 request to Ray's proxy at `base`, its head and `body` sent; the socket."""
    import socket

    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _answer(sock) -> tuple[int, dict[str, str], bytes]:
    """The response on `sock` (Content-Length framed): status, headers (lower-cased), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = f"{headers[k.strip().lower()]}, {v.strip()}" if k.strip().lower() in headers \
            else v.strip()
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    sock.close()
    return int(lines[0].split()[1]), headers, body


def test_rays_proxy_stops_reading_a_body_over_the_limit(ray_serve: str) -> None:
    """A chunked upload with no Content-Length: the proxy answers 413 in JSON once the bytes
    received pass limits.max_body_bytes (1 MiB here) and reads no more; Ray's own proxy read
    all of it (300 MiB, held in the proxy's memory) before a replica could refuse it."""
    import json
    import select

    sock = _open(ray_serve, "POST", "/predict", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
    chunk, sent, stopped = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n", 0, None
    try:
        while sent < 64 and not select.select([sock], [], [], 0)[0]:  # up to 64 MiB, until an answer comes
            sock.sendall(chunk)
            sent += 1
    except OSError as exc:  # the proxy closed the connection: it reads no more
        stopped = exc
    status, headers, body = _answer(sock)
    assert status == 413 and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "payload_too_large" and "x-request-id" in headers
    # the proxy stopped reading: the client got its answer before all 64 MiB went (what the
    # socket buffers take in on both sides, a few MiB here, depends on the kernel's tuning)
    assert sent < 64, f"{sent} MiB sent before the proxy answered ({stopped!r})"


def test_slow_uploads_hold_no_replica_slot(ray_serve: str, mnist) -> None:
    """More slow uploads (a byte, then nothing) than all replicas' request slots (2 x 16): the
    proxy reads each body whole before Ray routes the request, so none holds a slot while it
    trickles in (each is cut with 408 after body_timeout_s, 15 s); another client is answered
    at once (behind Ray's own proxy it waited for the slots)."""
    import select

    held = [_open(ray_serve, "POST", "/predict", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"},
                  b"1\r\nx\r\n") for _ in range(2 * OPTIONS.max_ongoing_requests + 4)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        status, _, body = _answer(_open(ray_serve, "POST", "/predict", {"Content-Type": "image/png",
                                        "Content-Length": str(len(png(mnist.test.x[0])))}, png(mnist.test.x[0])))
        waited = time.monotonic() - started
        assert status == 200, (status, body[:200], waited)
        # answered while every slow upload still waits (none cut by the 15 s body timeout yet,
        # which would have freed the slots): what the guarantee is, whatever this machine's speed
        assert not select.select(held, [], [], 0)[0]
    finally:
        for sock in held:
            sock.close()


def test_rays_own_errors_answer_in_the_contracts_json(ray_serve: str) -> None:
    """Ray's backpressure 503 (text/plain before) is the contract's `overloaded` with its
    Retry-After; a replica that dies with a request (a bare text 500 without X-Request-ID
    before) is 503 `unavailable`. A second application on the module's Serve, one slot and one
    queue place, stands for a replica under load."""
    import asyncio
    import json

    from ray.serve.config import BackpressureConfig

    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0},
                      backpressure_config=BackpressureConfig(status_code=503, retry_after_s=2))
    class Probe:
        async def __call__(self, request):
            if "die" in request.query_params:
                os._exit(1)  # as the OOM killer or a lost node ends a replica
            await asyncio.sleep(float(request.query_params.get("sleep", 0)))
            return "done"

    serve.run(Probe.bind(), name="probe", route_prefix="/probe")
    try:
        busy = _open(ray_serve, "GET", "/probe?sleep=20", {})  # on the replica's one slot
        time.sleep(1)
        queued = _open(ray_serve, "GET", "/probe?sleep=20", {})  # in the proxy's queue
        # on a loaded machine the two may take a while to reach their places: ask until the
        # third is refused (it is answered at once, 200, only while a place is still free)
        deadline = time.monotonic() + 15
        while True:
            probe = _open(ray_serve, "GET", "/probe", {})
            probe.settimeout(2)
            try:
                status, headers, body = _answer(probe)
            except TimeoutError:  # it took the queue's place itself (`queued` not there yet): again
                probe.close()
                status = 200
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert (status, headers["content-type"], headers["retry-after"]) == (503, "application/json", "2"), body
        assert json.loads(body)["error"]["code"] == "overloaded" and len(headers["x-request-id"]) == 36
        for sock in (busy, queued):
            sock.close()  # Ray cancels them at the replica
        deadline = time.monotonic() + 30
        while _answer(_open(ray_serve, "GET", "/probe", {}))[0] != 200:  # until the cancellations land
            assert time.monotonic() < deadline, "the probe's slot stayed taken"
            time.sleep(0.2)
        status, headers, body = _answer(_open(ray_serve, "GET", "/probe?die=1", {"X-Request-ID": "dies-1"}))
        assert (status, headers["content-type"], headers["x-request-id"]) == (503, "application/json", "dies-1"), body
        assert json.loads(body)["error"]["code"] == "unavailable" and "retry-after" in headers
    finally:
        serve.delete("probe")


def test_serve_ray_cli_on_a_cluster_starts_its_own_serve_and_drains_on_sigterm(
        ray_serve: str, quick_bundle: Path, mnist, tmp_path: Path) -> None:
    """`shieldserve serve --ray --ray-address ADDR` on a running Ray. Where Serve runs already it
    is refused, naming where that Serve listens: Serve would have joined it (the app on that
    Serve's port, behind proxies with that Serve's options, and a URL logged on a port that
    refused connections). Without one, it starts Serve: its proxy takes the limits and key
    check of the command's settings (through Serve's controller, not the node's environment), the
    replicas log as the settings say (`shieldserve.access`); on SIGTERM it deletes the
    application, stops the Serve it started and exits 0. Last in the module: it stops the
    module's Serve."""
    import hashlib
    import json
    import signal
    import subprocess
    import sys

    import httpx

    from service.ray_app import APP_NAME, ServeAlreadyRunning, running_serve

    port = int(ray_serve.rsplit(":", 1)[1])
    assert running_serve() == f"127.0.0.1:{port}"
    with pytest.raises(ServeAlreadyRunning, match=f"127.0.0.1:{port}"):
        start_serve(load_settings(bundle=quick_bundle, port=port + 1), OPTIONS)
    serve.shutdown()
    assert running_serve() is None

    port, key = free_port(), "cli-key-1"
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SHIELDSERVE_BUNDLE=str(quick_bundle), SHIELDSERVE_TORCH_THREADS="1",
               SHIELDSERVE_PROGRESS="0", SHIELDSERVE_LOG_LEVEL="info", SHIELDSERVE_RAY_NUM_CPUS="0.5",
               SHIELDSERVE_RAY_MAX_REPLICAS="1", SHIELDSERVE_WARMUP="false",
               SHIELDSERVE_LIMITS__MAX_BODY_BYTES="65536",
               SHIELDSERVE_API_KEYS=json.dumps({"ci": hashlib.sha256(key.encode()).hexdigest()}))
    log = tmp_path / "serve-ray.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--ray", "--ray-address",
                                 ray.get_runtime_context().gcs_address, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            # a hang guard, not a speed test: on a loaded 2-core machine the replica alone waits
            # 30 s to be scheduled and over a minute to load (seen with two other jobs running)
            deadline = time.monotonic() + 300
            while "shieldserve on Ray Serve at" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "serve --ray did not come up in 300 s"
                time.sleep(0.5)
            # the cluster's proxy has this command's rules: no key, 401; past 64 KiB, 413; both
            # from the headers (no body is sent)
            status, _, body = _answer(_open(base, "POST", "/predict", {"Content-Length": "100000"}))
            assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", body
            status, _, body = _answer(_open(base, "POST", "/predict", {"Content-Length": "100000", "X-API-Key": key}))
            assert status == 413 and "65536" in json.loads(body)["error"]["message"], body
            r = httpx.post(f"{base}/predict", content=png(mnist.test.x[0]),
                           headers={"content-type": "image/png", "X-API-Key": key}, timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["label"] == int(mnist.test.y[0])
            assert serve.status().applications[APP_NAME].status == "RUNNING"
            deadline = time.monotonic() + 30  # the replica's log lines reach the driver's output
            while '"logger": "shieldserve.access"' not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, "no shieldserve.access line from the replica"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=180) == 0, log.read_text(errors="replace")[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "deleting the application" in log.read_text(errors="replace")
    deadline = time.monotonic() + 30
    while running_serve() is not None:  # the Serve it started is stopped
        assert time.monotonic() < deadline, "serve --ray left its Serve running"
        time.sleep(0.5)
