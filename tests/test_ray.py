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

from tests.conftest import free_ports, png

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
ray = pytest.importorskip("ray")

from service.ray_app import PROXY_ENV, RayOptions, deployment_options, http_options  # noqa: E402
from service.settings import load_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# a monitored pipeline without defenses that blocks a client at its first flag
WATCH = {"watch": {"defenses": [], "query_monitor": {"action": "block", "block_after": 0, "cooldown_s": 600}}}


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
    cpu = deployment_options(load_settings(bundle=quick_bundle, device="cpu"),
                             RayOptions(min_replicas=2, max_replicas=6, target_ongoing_requests=4,
                                        max_ongoing_requests=16))
    assert cpu["autoscaling_config"]["min_replicas"] == 2 and cpu["autoscaling_config"]["max_replicas"] == 6
    assert cpu["autoscaling_config"]["target_ongoing_requests"] == 4
    assert cpu["max_ongoing_requests"] == 16 and "num_gpus" not in cpu["ray_actor_options"]
    gpu = deployment_options(load_settings(bundle=quick_bundle, device="cuda"), RayOptions())
    assert gpu["ray_actor_options"]["num_gpus"] == 0.5  # two replicas per GPU by default
    quarter = deployment_options(load_settings(bundle=quick_bundle, device="cuda:0"), RayOptions(num_gpus=0.25))
    assert quarter["ray_actor_options"]["num_gpus"] == 0.25
    with pytest.raises(ValueError):
        RayOptions(min_replicas=3, max_replicas=2).validated()
    os.environ["SHIELDSERVE_RAY_MAX_REPLICAS"] = "7"
    try:
        assert RayOptions.from_env().max_replicas == 7
    finally:
        del os.environ["SHIELDSERVE_RAY_MAX_REPLICAS"]


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
        serve.start(http_options=http_options(load_settings(bundle=quick_bundle, host="127.0.0.1", port=port)))
        started = time.perf_counter()
        app = build_app(options=RayOptions(min_replicas=1, max_replicas=2, target_ongoing_requests=4,
                                           max_ongoing_requests=16, num_cpus=0.5),
                        bundle=quick_bundle, torch_threads=1, log_level="warning", pipelines=WATCH)
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


def test_serve_ray_cli_joins_a_cluster_and_drains_on_sigterm(ray_serve: str, quick_bundle: Path, mnist,
                                                             tmp_path: Path) -> None:
    """`shieldserve serve --ray --ray-address ADDR` on the running Ray: it redeploys the app,
    answers, and on SIGTERM deletes the application and exits 0."""
    import signal
    import subprocess
    import sys

    import httpx

    from service.ray_app import APP_NAME

    port = int(ray_serve.rsplit(":", 1)[1])
    env = dict(os.environ, SHIELDSERVE_BUNDLE=str(quick_bundle), SHIELDSERVE_TORCH_THREADS="1",
               SHIELDSERVE_PROGRESS="0", SHIELDSERVE_LOG_LEVEL="warning", SHIELDSERVE_RAY_NUM_CPUS="0.5",
               SHIELDSERVE_RAY_MAX_REPLICAS="1")
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
            r = httpx.post(f"{ray_serve}/predict", content=png(mnist.test.x[0]),
                           headers={"content-type": "image/png"}, timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["label"] == int(mnist.test.y[0])
            assert serve.status().applications[APP_NAME].status == "RUNNING"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=180) == 0, log.read_text(errors="replace")[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "deleting the application" in log.read_text(errors="replace")
    assert APP_NAME not in serve.status().applications
