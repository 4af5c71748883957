"""Ray Serve: the same FastAPI app (`service.app.create_app`) as an autoscaled Ray Serve
deployment, to scale out past one machine (`shieldserve serve --ray`).

Each Ray Serve replica is one Ray actor holding one full service: the verified bundle, the
pipelines, and the service's own dynamic batcher (settings `batching.*`). Ray's proxy
spreads HTTP requests over the replicas; inside a replica the batcher merges concurrent
requests into batches, so `max_ongoing_requests` must leave it company to batch (it is 32
by default, the batcher's `max_batch_size` is 64 images).

The app is built on the replica (`__serve_build_asgi_app__`), not pickled from the
driver, and Ray runs its ASGI lifespan there: warm-up, readiness, graceful drain.

What Ray's HTTP proxy adds (docs/operations.md, "Many machines: Ray Serve"): its own 503 when
more than `max_queued_requests` wait for a replica (status and Retry-After set here), its own
timeout (`request_timeout_s`, past the longest deadline the service grants), and its own
`X-Request-ID` on every response (the replica leaves its copy out where the two are the same
id: `SingleRequestIdMiddleware`). In each proxy, in front of Ray's, runs the service's
`service.ray_proxy.ProxyEdgeMiddleware` (installed through Ray's
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, `proxy_env`): API key and body limit checked before
the body is read, the whole body read (each part within `body_timeout_s`) before a replica's
slot is taken, and Ray's own text/plain errors answered in the contract's JSON.

Ray settings (environment, all optional):
  SHIELDSERVE_RAY_MIN_REPLICAS            1    autoscaling floor
  SHIELDSERVE_RAY_MAX_REPLICAS            4    autoscaling ceiling
  SHIELDSERVE_RAY_INITIAL_REPLICAS        min  replicas started first
  SHIELDSERVE_RAY_TARGET_ONGOING_REQUESTS 8    ongoing requests per replica the autoscaler aims at
  SHIELDSERVE_RAY_MAX_ONGOING_REQUESTS    32   requests one replica runs at once (backpressure)
  SHIELDSERVE_RAY_MAX_QUEUED_REQUESTS     256  requests queued per proxy before Ray's own 503 (with
                                               Retry-After: admission.retry_after_s; -1: no limit)
  SHIELDSERVE_RAY_NUM_CPUS                1    CPUs reserved per replica
  SHIELDSERVE_RAY_NUM_GPUS                0.5 when the device is cuda, else 0: a fraction packs
                                               replicas on one GPU (0.5 = two per GPU)
  SHIELDSERVE_RAY_BODY_TIMEOUT_S          15   longest wait of the proxy for the next part of a
                                               request body (nginx's client_body_timeout): 408
  SHIELDSERVE_RAY_ADDRESS                 local  an existing cluster ("auto", "ray://host:10001");
                                                 "local" (the default) starts a Ray of its own
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

DEPLOYMENT_NAME = "shieldserve"
APP_NAME = "shieldserve"

log = logging.getLogger("shieldserve")


def _env(name: str, default: Any, cast: type) -> Any:
    value = os.environ.get(f"SHIELDSERVE_RAY_{name}")
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise ValueError(f"SHIELDSERVE_RAY_{name}={value!r} is not a valid {cast.__name__}") from None


@dataclass(frozen=True)
class RayOptions:
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 256
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 0.5 on cuda, 0 on cpu
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    body_timeout_s: float = 15.0  # the proxy's wait for the next part of a body (ray_proxy)

    @classmethod
    def from_env(cls, **overrides: Any) -> RayOptions:
        d = cls()
        values = dict(
            min_replicas=_env("MIN_REPLICAS", d.min_replicas, int),
            max_replicas=_env("MAX_REPLICAS", d.max_replicas, int),
            initial_replicas=_env("INITIAL_REPLICAS", d.initial_replicas, int),
            target_ongoing_requests=_env("TARGET_ONGOING_REQUESTS", d.target_ongoing_requests, float),
            max_ongoing_requests=_env("MAX_ONGOING_REQUESTS", d.max_ongoing_requests, int),
            max_queued_requests=_env("MAX_QUEUED_REQUESTS", d.max_queued_requests, int),
            num_cpus=_env("NUM_CPUS", d.num_cpus, float),
            num_gpus=_env("NUM_GPUS", d.num_gpus, float),
            body_timeout_s=_env("BODY_TIMEOUT_S", d.body_timeout_s, float),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> RayOptions:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1; "
                             f"got {self.min_replicas}..{self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise ValueError("target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError("num_gpus must be >= 0")
        if not self.body_timeout_s > 0:
            raise ValueError("body_timeout_s must be > 0")
        return self


def deployment_options(settings: Any, options: RayOptions) -> dict[str, Any]:
    """The keyword arguments of `serve.deployment(...).options(...)` for these settings."""
    from ray.serve.config import BackpressureConfig

    on_gpu = str(settings.device).startswith("cuda")
    num_gpus = options.num_gpus if options.num_gpus is not None else (0.5 if on_gpu else 0.0)
    if on_gpu and num_gpus <= 0:
        raise ValueError("device is cuda: give each replica a GPU fraction (SHIELDSERVE_RAY_NUM_GPUS > 0)")
    autoscaling: dict[str, Any] = {
        "min_replicas": options.min_replicas,
        "max_replicas": options.max_replicas,
        "target_ongoing_requests": options.target_ongoing_requests,
        "upscale_delay_s": options.upscale_delay_s,
        "downscale_delay_s": options.downscale_delay_s,
    }
    if options.initial_replicas is not None:
        autoscaling["initial_replicas"] = options.initial_replicas
    actor: dict[str, Any] = {"num_cpus": options.num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    return {
        "name": DEPLOYMENT_NAME,
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        # past max_queued_requests Ray's proxy answers itself (the request never reaches a
        # replica): the status and Retry-After of the service's own 503 `overloaded`; Ray's
        # text/plain body becomes the contract's JSON in the proxy (ray_proxy.ProxyEdgeMiddleware)
        "backpressure_config": BackpressureConfig(status_code=503,
                                                  retry_after_s=settings.admission.retry_after_s),
        "ray_actor_options": actor,
        # how long a replica's in-flight requests may take to finish at shutdown, as the plain
        # server's graceful period
        "graceful_shutdown_timeout_s": settings.graceful_timeout_s,
        "health_check_period_s": 10,
    }


@serve.ingress()
class ShieldserveDeployment:
    """One replica: settings rebuilt from the same config and overrides, then the app."""

    def __init__(self, config: str | None, overrides: dict[str, Any]) -> None:
        self.config, self.overrides = config, overrides

    def __serve_build_asgi_app__(self):  # called by Ray Serve on the replica, after __init__
        return build_replica(self.config, self.overrides)


def build_replica(config: str | None, overrides: dict[str, Any]):
    """A replica's app, in the replica's process (its entry point is here): the settings, then
    logging and the process-wide settings as `shieldserve serve` sets them (`log_level`,
    `json_logs`, the `shieldserve.access` lines; torch's threads), then `replica_app`."""
    from service.logs import configure_logging
    from service.server import apply_process_settings
    from service.settings import load_settings

    settings = load_settings(config, **overrides)
    configure_logging(settings.log_level, settings.json_logs)
    apply_process_settings(settings)
    return replica_app(settings)


def replica_app(settings: Any):
    """The app one replica serves: `create_app` with `SingleRequestIdMiddleware` outermost."""
    from service.app import create_app

    app = create_app(settings)
    app.add_middleware(SingleRequestIdMiddleware)  # added last: outside the service's RequestIdMiddleware
    return app


class SingleRequestIdMiddleware:
    """One `X-Request-ID` per response behind Ray Serve's proxy.

    Ray's proxy (its RequestIdMiddleware, always installed, no option to turn it off) puts an
    `X-Request-ID` into every request that has none (a uuid4), and appends to every response
    the request's `X-Request-ID` as it reached the proxy. The service echoes its own request
    id too, which is that same value whenever it was a sane token (a uuid4 is): then the
    service's copy is left out here and the response carries the id once, Ray's copy. Where
    the service refused the client's id (not a sane token) and made its own, both stay: the
    service's first (the id in its logs and response bodies), then the client's own value
    that Ray echoes. Only for an app behind Ray's proxy (`replica_app`): elsewhere nothing
    would add the id back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # the first one, as Ray's proxy reads it (Starlette's Headers.get)
        given = next((v for k, v in scope.get("headers") or [] if k.lower() == b"x-request-id"), None)
        if given is None:
            return await self.app(scope, receive, send)

        async def send_once(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                for i, (k, v) in enumerate(headers):
                    if k.lower() == b"x-request-id" and v == given:
                        del headers[i]
                        message = {**message, "headers": headers}
                        break
            await send(message)

        await self.app(scope, receive, send_once)


def unshared_state_warning(settings: Any, max_replicas: int) -> str | None:
    """The start-up warning for state that each replica keeps for itself, or None.

    With more than one replica, a `memory` store is one per replica: the query monitor's
    remembered queries, flags, blocks and (without `query_monitor.secret`) its hashing key,
    and the /certify store's images and certificates. Ray's proxy spreads a client's requests
    over the replicas, so a replica sees only part of a client's queries, a block holds on
    the replica that decided it, and `GET /certify` finds an image only on the replica that
    got it. Not refused: one replica, or a monitor nobody relies on across replicas, is a
    valid set-up, and a default `serve --ray` must start."""
    if max_replicas <= 1:
        return None
    problems, fixes = [], []
    if settings.query_monitor.store == "memory":
        problems.append("its own query monitor (query_monitor.store: memory): a client's queries spread over "
                        "the replicas, each sees only part of them and hashes them with its own random key, "
                        "and a block holds on one replica only")
        fixes.append("query_monitor.store: redis with query_monitor.secret (the same on every replica; unset, "
                     "the replicas agree on a key through Redis)")
    if settings.certify.store == "memory" and settings.certify.store_max_images > 0:
        problems.append("its own /certify image store (certify.store: memory): GET /certify answers 404 "
                        "unknown_image when it reaches a replica other than the one that got the image")
        fixes.append("certify.store: redis")
    if not problems:
        return None
    return (f"Ray Serve may run up to {max_replicas} replicas, and each keeps " + "; and ".join(problems)
            + ". Share them through Redis: " + ", and ".join(fixes)
            + " (with their redis_url), or run one replica (SHIELDSERVE_RAY_MAX_REPLICAS=1).")


# Ray's proxy gives up on a request (408, text/plain) this long after the longest deadline a
# client may ask for (max_request_timeout_s): the replica answers 504 `deadline_exceeded` first,
# as behind nginx (docker/nginx.conf: proxy_read_timeout 125 s for 120 s). Ray's clock starts at
# the proxy, the service's when the replica gets the request: a request that waited in Ray's
# queue longer than this margin gets Ray's 408 rather than the service's 504.
RAY_TIMEOUT_MARGIN_S = 5.0


def http_options(settings: Any) -> dict[str, Any]:
    """`serve.start(http_options=...)`: where Ray's proxy listens, and its timeout."""
    return {"host": settings.host, "port": settings.port,
            "request_timeout_s": settings.max_request_timeout_s + RAY_TIMEOUT_MARGIN_S}


def build_app(config: str | Path | None = None, options: RayOptions | None = None, **overrides: Any):
    """The bound Ray Serve application (pass it to `serve.run`).

    `config` and `overrides` are what `load_settings` takes; they are evaluated here (so a
    bad configuration fails on the driver, before any replica starts) and again on each
    replica. The bundle is verified here too, as each replica will: a corrupted or untrusted
    bundle is one BundleError now, not a failed deployment after every replica tried.
    Environment variables reach replicas started on this machine; on a cluster, pass settings
    as overrides or ship them in the config file.
    """
    from models.bundle import Bundle
    from service.settings import load_settings

    config = str(Path(config).resolve()) if config else None  # replicas run in another directory
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "bundle" in overrides:
        overrides["bundle"] = str(Path(overrides["bundle"]).resolve())
    settings = load_settings(config, **overrides)
    if not (Path(settings.bundle) / "manifest.json").is_file():
        raise FileNotFoundError(f"no bundle at {settings.bundle} (manifest.json missing)")
    Bundle.load(settings.bundle, trusted_imports=settings.trusted_imports).require_finished()
    options = options or RayOptions.from_env()
    opts = deployment_options(settings, options)
    warning = unshared_state_warning(settings, options.max_replicas)
    if warning:  # build_app runs on the driver only: logged once
        log.warning(warning)
    return serve.deployment(ShieldserveDeployment).options(**opts).bind(config, overrides)


def check_runtime(settings: Any) -> None:
    """Build the service's runtime once here and close it: what the runtime refuses (a pipeline
    that does not build, a default pipeline not served, a monitor window larger than the images)
    is one error now, where each replica would fail with it in turn and Serve would give up
    after a minute and ~300 lines of their tracebacks. Only where the replicas run on this
    machine (`serve --ray` without a cluster): a cluster's nodes may have devices, CPUs or
    networks this driver has not; and only on the CPU: on a GPU the driver would hold a CUDA
    context and cached memory beside its replicas for as long as it runs. (On the CPU it keeps
    some of what it allocated: RSS 333 -> 600 MiB for models/default, an auditor measured.)"""
    import asyncio

    from service.runtime import Runtime

    asyncio.run(Runtime(settings).close())


def proxy_env(settings: Any, options: RayOptions) -> dict[str, str]:
    """The environment of Serve's HTTP proxies: uvicorn's X-Forwarded-For rule off (PROXY_ENV),
    and the service's middleware (service.ray_proxy) through Ray's callback hook, with its
    limits. No secret: `api_keys` are sha256 digests, as in the config file."""
    from service.ray_proxy import CALLBACK, CONFIG_ENV, ProxyConfig

    return {**PROXY_ENV, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,
            CONFIG_ENV: ProxyConfig.of(settings, options.body_timeout_s).to_env()}


class ServeAlreadyRunning(ValueError):
    """Serve runs on the cluster already: its proxies keep the options they were started with."""


def running_serve() -> str | None:
    """Where the Ray Serve that already runs on the connected cluster listens ("host:port", or
    "an unknown address"), or None when Serve does not run there."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    named = ray.util.list_named_actors(all_namespaces=True)
    if not any(a.get("name") == SERVE_CONTROLLER_NAME and a.get("namespace") == SERVE_NAMESPACE for a in named):
        return None
    try:  # Serve's own client asks its controller this way (best effort: only for the message)
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        config = ray.get(controller.get_http_config.remote(), timeout=30)
        return f"{config.host}:{config.port}"
    except Exception:  # the controller starting, stopping, or another Ray's
        log.debug("Serve's controller did not say where its proxy listens", exc_info=True)
        return "an unknown address"


def start_serve(settings: Any, options: RayOptions) -> None:
    """`serve.start` with the service's proxy: HTTP options (`http_options`) and environment
    (`proxy_env`, through `controller_options`: the controller's proxies inherit it).

    Refused (ServeAlreadyRunning) where Serve already runs on the cluster: `serve.start` would
    join it and apply none of this (Ray logs it and carries on), so the app would be served on
    that Serve's port, with its proxies' X-Forwarded-For rule and without the service's body
    limit, API-key check or JSON errors, while this command named another port."""
    where = running_serve()
    if where is not None:
        raise ServeAlreadyRunning(
            f"Ray Serve already runs on this Ray cluster, its HTTP proxy at {where}, started with its own "
            f"options: `serve --ray` cannot set its port ({settings.host}:{settings.port} asked), nor its "
            f"proxies' body limit, API-key check, body timeout and X-Forwarded-For rule. Stop it first "
            f"(`serve shutdown` on the cluster; it deletes every application it runs), then start this again")
    serve.start(http_options=http_options(settings),
                controller_options={"runtime_env": {"env_vars": proxy_env(settings, options)}})


def run(config: str | None = None, host: str | None = None, port: int | None = None,
        address: str | None = None, options: RayOptions | None = None) -> None:
    """`shieldserve serve --ray`: start (or join) Ray, start Serve and its HTTP proxy on
    host:port (`start_serve`: refused where Serve runs already), run the app, and serve until
    SIGINT or SIGTERM; then delete the app (replicas drain their in-flight requests), stop the
    Serve it started unless another application runs on it, and leave Ray."""
    import signal
    import threading

    import ray

    from service.settings import load_settings

    settings = load_settings(config, host=host, port=port)
    options = options or RayOptions.from_env()
    app = build_app(config, options)  # a bad configuration or bundle fails here, before Ray starts
    # "local" starts a Ray of our own; ray.init(address=None) would join whatever cluster
    # `ray start` last recorded on this machine
    address = address or os.environ.get("SHIELDSERVE_RAY_ADDRESS") or "local"
    if address == "local" and settings.device == "cpu":
        check_runtime(settings)
    if os.environ.get("FORWARDED_ALLOW_IPS", "") != PROXY_ENV["FORWARDED_ALLOW_IPS"]:
        log.warning("FORWARDED_ALLOW_IPS is ignored: the service's trusted_proxies setting decides which "
                    "proxies' X-Forwarded-For is believed")
    os.environ.update(PROXY_ENV)  # the Ray that ray.init starts here (address "local") inherits it
    ray.init(address=address, runtime_env=_runtime_env())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serve(settings, options)
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("shieldserve on Ray Serve at http://%s:%d/", settings.host, settings.port)
        stop.wait()
        log.info("stopping: deleting the application (replicas drain)")
        serve.delete(APP_NAME)
        others = sorted(set(serve.status().applications) - {APP_NAME})
        if others:  # deployed on this Serve since it started: theirs to stop
            log.warning("Ray Serve keeps running for its other applications: %s", ", ".join(others))
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


def _has_password(url: Any) -> bool:
    from service.redis_store import redact

    try:
        return not isinstance(url, str) or redact(url) != url
    except ValueError:  # a URL redact cannot parse: it cannot say there is no password in it
        return True


# Settings fields that hold secrets, by their path in Settings, and which values of them are
# secret: never put into the runtime_env, which Ray shows in its dashboard and keeps in its job
# metadata. A replica reads them from its own environment: that of `shieldserve serve --ray`
# when it starts a local Ray, that of `ray start` on a cluster's nodes.
_SECRET_FIELDS: dict[tuple[str, ...], Callable[[Any], bool]] = {
    ("admin_api_key",): lambda value: True,
    ("query_monitor", "secret"): lambda value: True,
    ("certify", "redis_url"): _has_password,
    ("query_monitor", "redis_url"): _has_password,
}
_PREFIX = "SHIELDSERVE_"

# Ray Serve's HTTP proxy runs uvicorn with its defaults: X-Forwarded-For believed from the
# addresses in FORWARDED_ALLOW_IPS (127.0.0.1 and ::1 unset), the peer rewritten from it, and
# that rewritten peer handed to the replica as the request's client. The service's
# trusted_proxies rule (service/api/clients.py) must be the only one that names a client, so
# the proxy trusts no address: a local Ray's processes inherit this from `serve --ray`, a
# cluster's proxies from the job's runtime_env (the Serve controller and its proxies inherit it).
PROXY_ENV = {"FORWARDED_ALLOW_IPS": ""}


def _carries_secret(name: str, value: str) -> bool:
    """Whether the SHIELDSERVE_* variable `name` sets a secret: a secret field itself, or a
    section given whole as JSON (`SHIELDSERVE_QUERY_MONITOR='{"secret": ...}'`, which
    pydantic-settings accepts) with a secret in it. Names and JSON keys are matched
    case-insensitively, as pydantic-settings matches them."""
    path = tuple(name[len(_PREFIX):].lower().split("__"))
    for field, is_secret in _SECRET_FIELDS.items():
        if path == field:
            if is_secret(value):
                return True
        elif field[:len(path)] == path:
            try:
                node: Any = json.loads(value)
            except ValueError:
                return True  # not JSON: the settings will refuse it, and it cannot be read here either
            for key in field[len(path):]:
                node = {str(k).lower(): v for k, v in node.items()}.get(key) if isinstance(node, dict) else None
            if node is not None and is_secret(node):
                return True
    return False


# the SHIELDSERVE_* variables a replica reads that are not settings; the others (the evaluation's
# client key, docker-compose's monitor secret, the tests', `serve --ray`'s own) stay here
_REPLICA_EXTRAS = ("CONFIG", "PROGRESS", "WORK_DIR")


def _for_replicas(name: str) -> bool:
    """Whether the SHIELDSERVE_* variable `name` is one the replicas read: a setting, or one of
    _REPLICA_EXTRAS. Forwarding every SHIELDSERVE_* variable put SHIELDSERVE_EVAL_API_KEY (a
    client's key) and SHIELDSERVE_MONITOR_SECRET (docker-compose's name for the monitor's key) in
    the runtime_env, which no secret check covered: they are not settings."""
    from service.settings import names_a_setting

    return names_a_setting(name) or name[len(_PREFIX):].upper() in _REPLICA_EXTRAS


def _runtime_env() -> dict[str, Any]:
    """Environment for the replicas: this checkout on their path, the SHIELDSERVE_* settings
    that are not secrets, and the proxy's settings (PROXY_ENV)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k.startswith(_PREFIX) and _for_replicas(k)
           and not _carries_secret(k, v)}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    env.update(PROXY_ENV)
    return {"env_vars": env}
