"""docker-compose.yml (no Docker engine here): the services, ports, healthchecks and config
files it declares agree with each other and with docker/nginx.conf, docker/prometheus.yml,
the Grafana provisioning, the Dockerfiles and the service's own settings and metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
REPLICAS = ("replica1", "replica2")
# Redis memory per query remembered by the query monitor: 5.4-5.8 KB measured on redis 7 with
# 80 distinct hashes per query (the worst case; tests/test_deploy.py measures it again on the
# compose file's redis-monitor arguments)
MONITOR_BYTES_PER_QUERY = 5_800
# what redis-monitor keeps besides the queries: suspects' recent images (64 MiB in all at most,
# Redis' bookkeeping counted: query_monitor.NEAR_MEMORY_BYTES), flags and blocks; at least this
# much room is left for them
MONITOR_HEADROOM_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nginx() -> str:
    return (DOCKER / "nginx.conf").read_text()


def host_path(spec: str) -> tuple[Path, str]:
    """A bind mount `./host:/container[:ro]` -> (absolute host path, container path)."""
    host, container = spec.split(":")[:2]
    return (REPO / host).resolve(), container


def mounts(service: dict) -> dict[str, Path]:
    return {c: h for h, c in (host_path(v) for v in service.get("volumes", []) if v.startswith("./"))}


def redis_args(service: dict) -> dict[str, str]:
    """A redis-server `command:` -> {option: value} (`--save ""` -> {"save": ""})."""
    argv = service["command"]
    assert argv[0] == "redis-server"
    return {argv[i].removeprefix("--"): argv[i + 1] for i in range(1, len(argv), 2)}


def redis_bytes(size: str) -> int:
    """A Redis memory size (`768mb`, `1gb`, `1000000`) in bytes, as redis.conf reads it."""
    m = re.fullmatch(r"(\d+)(b|k|kb|m|mb|g|gb)?", size.lower())
    units = {None: 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
    return int(m.group(1)) * units[m.group(2)]


def setting_default(name: str):
    """A service setting's default, whatever the environment of the machine running the test."""
    from service.settings import Settings

    return Settings.model_fields[name].default


def metric_names() -> set[str]:
    """Every series name the service exposes (from service/metrics.py itself)."""
    from service.metrics import Metrics

    names = set()
    for collector in list(Metrics().registry._collector_to_names):
        for family in collector.describe():
            base = family.name
            if family.type == "counter":
                names |= {f"{base}_total", f"{base}_created"}
            elif family.type == "histogram":
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
            else:
                names.add(base)
    return names


def test_services_and_every_healthcheck(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", *REPLICAS, "redis", "redis-monitor", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for r in REPLICAS:
        svc = services[r]
        check = " ".join(svc["healthcheck"]["test"])
        assert "http://127.0.0.1:8000/readyz" in check and "status == 200" in check
        assert svc["expose"] == ["8000"] and "ports" not in svc, "replicas are not published"
        assert svc["environment"]["SHIELDSERVE_PORT"] == "8000"
        assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["redis-monitor"]["condition"] == "service_healthy"
        assert svc["stop_grace_period"] == "35s"  # > the service's 30 s graceful drain
    gw = services["gateway"]
    assert {services["gateway"]["depends_on"][r]["condition"] for r in REPLICAS} == {"service_healthy"}
    assert "/readyz" in " ".join(gw["healthcheck"]["test"])
    for name in ("redis", "redis-monitor"):
        assert "ping" in services[name]["healthcheck"]["test"]


def test_networks_expose_only_the_gateway_publicly(compose: dict) -> None:
    services, nets = compose["services"], compose["networks"]
    assert nets["backend"]["internal"] is True
    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"gateway", "prometheus", "grafana"}
    assert published["gateway"] == ["8080:8080"]
    for name in ("prometheus", "grafana"):  # operators only, on the host's loopback
        assert all(p.startswith("127.0.0.1:") for p in published[name]), published[name]
    for name in (*REPLICAS, "redis", "redis-monitor"):
        assert services[name]["networks"] == ["backend"]
    assert set(services["gateway"]["networks"]) == {"frontend", "backend"}


def test_gateway_config_matches_the_topology(compose: dict, nginx: str) -> None:
    from service.settings import Settings

    gw = compose["services"]["gateway"]
    assert mounts(gw)["/etc/nginx/nginx.conf"] == DOCKER / "nginx.conf"
    assert re.search(r"^\s*listen 8080;", nginx, re.M)
    upstream = re.search(r"upstream shieldserve \{(.*?)\}", nginx, re.S).group(1)
    servers = re.findall(r"^\s*server (\S+?)(?: |;)", upstream, re.M)
    assert servers == [f"{r}:8000" for r in REPLICAS]
    # body limit = the replicas' limit
    settings = Settings(bundle=REPO)
    mib = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    assert mib * 1024 * 1024 == settings.limits.max_body_bytes
    # read timeout past the longest deadline a client may ask for (X-Request-Timeout, clamped
    # to max_request_timeout_s): the replica answers its own 504 first
    env = compose["services"]["replica1"]["environment"]
    longest = float(env.get("SHIELDSERVE_MAX_REQUEST_TIMEOUT_S", setting_default("max_request_timeout_s")))
    default = float(env.get("SHIELDSERVE_REQUEST_TIMEOUT_S", setting_default("request_timeout_s")))
    read = int(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))
    assert read > longest >= default
    # an idle connection to a replica is dropped by nginx before the replica closes it: nginx
    # reused ones being closed (30 s against uvicorn's 5 s), each reset a failed attempt
    import uvicorn

    from service.server import uvicorn_options

    replica_idle = uvicorn.Config(app=None, **uvicorn_options(settings)).timeout_keep_alive
    idle = int(re.search(r"^\s*keepalive_timeout (\d+)s;", upstream, re.M).group(1))
    assert idle < replica_idle, (idle, replica_idle)
    # retries on another replica: connection errors, timeouts, 502; never after a replica's own
    # 504 (it ran its whole deadline) nor its own 503 (nginx counts each listed http_* code as a
    # failed attempt: a few deliberate 503s took both replicas out, tests/test_deploy.py); POST
    # only on the side-effect-free routes, which nginx retries once sent only with non_idempotent
    lines = re.findall(r"^\s*proxy_next_upstream ([^;]*);", nginx, re.M)
    assert len(lines) == 4, lines
    for line in lines:
        assert not {"http_503", "http_504"} & set(line.split()), line
        assert {"error", "timeout", "http_502"} <= set(line.split()), line
    server_level = re.search(r"^\s*proxy_next_upstream ([^;]*);", nginx, re.M).group(1)
    assert server_level.split() == ["error", "timeout", "http_502"]  # no non_idempotent
    assert re.search(r"^\s*proxy_next_upstream_tries 2;", nginx, re.M)
    post_routes = ("location = /predict", "location = /certify", "/infer$")
    for route in post_routes:
        block = nginx[nginx.index(route):]
        block = block[:block.index("}")]
        assert "non_idempotent" in block, route
    assert len(re.findall(r"\bnon_idempotent\b", re.sub(r"#.*", "", nginx))) == len(post_routes)
    # not public
    for route in ("location = /metrics", "location ^~ /admin"):
        block = nginx[nginx.index(route):]
        assert re.match(r"[^}]*return 404", block, re.S), route


def test_prometheus_scrapes_every_replica_and_loads_the_rules(compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    m = mounts(prom)
    assert m["/etc/prometheus/prometheus.yml"] == DOCKER / "prometheus.yml"
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:  # relative to the config file, in the container too
        assert m[f"/etc/prometheus/{rule_file}"] == DOCKER / rule_file
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "shieldserve")
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{r}:{compose['services'][r]['expose'][0]}" for r in REPLICAS]


def test_grafana_provisioning_and_dashboard(compose: dict) -> None:
    graf = compose["services"]["grafana"]
    m = mounts(graf)
    prov, dashboards = m["/etc/grafana/provisioning"], m["/var/lib/grafana/dashboards"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "shieldserve.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads((dashboards / "shieldserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    assert all(t["datasource"]["uid"] == ds["uid"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\b(shieldserve_[a-z_]+)", " ".join(exprs)))
    known = metric_names()
    assert used <= known, f"dashboard uses metrics the service does not expose: {used - known}"
    for needed in ("shieldserve_rejections_total", "shieldserve_abstentions_total",
                   "shieldserve_request_duration_seconds_bucket", "shieldserve_queue_depth",
                   "shieldserve_inflight_requests", "shieldserve_requests_total"):
        assert needed in used, needed


def test_alert_rules_use_exposed_metrics() -> None:
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())["groups"][0]["rules"]
    used = set(re.findall(r"\b(shieldserve_[a-z_]+)", " ".join(r["expr"] for r in rules)))
    assert used <= metric_names(), used - metric_names()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert text.startswith("# syntax=docker/dockerfile:1\n")
    torch = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"ARG TORCH={torch}" in text, "the image pins the same torch as make install"
    assert re.search(r"^USER shieldserve", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:8000/readyz", text, re.M)
    assert "SHIELDSERVE_HOST=0.0.0.0" in text and "EXPOSE 8000" in text
    index = re.search(r"--index-url \S*?(https://download\.pytorch\.org/whl/\w+|\$\{TORCH_INDEX\})", text).group(1)
    if name == "Dockerfile":
        assert index.endswith("/cpu") and ".[knn,redis]" in text
    else:
        assert re.search(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+", text)
        assert ".[gpu,redis]" in text and "SHIELDSERVE_DEVICE=cuda" in text
    # every version the lock pins, as make install does: docker/Dockerfile.gpu installed without
    # it, so its image got whatever versions were newest on the day it was built
    assert "COPY requirements ./requirements" in text
    install = re.search(r'^RUN pip install "\.\[[a-z,]+\]" (.*)$', text, re.M)
    assert install and re.fullmatch(r"(-c|-r) requirements/\w+\.lock", install.group(1).strip()), \
        (install and install.group(0))
    assert (REPO / install.group(1).split()[1]).is_file()
    # the extras the images install exist in pyproject.toml
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.search(r'pip install "\.\[([a-z,]+)\]"', text).group(1).split(","):
        assert extra in extras, extra


def test_replicas_share_the_query_monitor_and_trust_only_the_gateway(compose: dict, nginx: str) -> None:
    env = compose["services"]["replica1"]["environment"]
    assert env == compose["services"]["replica2"]["environment"]
    assert env["SHIELDSERVE_QUERY_MONITOR__STORE"] == "redis"
    assert env["SHIELDSERVE_QUERY_MONITOR__REDIS_URL"].startswith("redis://redis-monitor:6379/")
    gateway_ip = compose["services"]["gateway"]["networks"]["backend"]["ipv4_address"]
    assert json.loads(env["SHIELDSERVE_TRUSTED_PROXIES"]) == [gateway_ip]
    # the gateway appends the peer it saw: the replicas' first untrusted hop from the right
    assert re.search(r"^\s*proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;", nginx, re.M)


def test_the_query_monitor_has_its_own_redis_that_never_evicts(compose: dict) -> None:
    """On the certify store's allkeys-lru Redis, images posted to /certify evicted the
    monitor's keys (its blocks too): eviction picks keys across databases."""
    services = compose["services"]
    env = services["replica1"]["environment"]
    store_host = re.match(r"redis://([^:/]+)", env["SHIELDSERVE_CERTIFY__REDIS_URL"]).group(1)
    monitor_host = re.match(r"redis://([^:/]+)", env["SHIELDSERVE_QUERY_MONITOR__REDIS_URL"]).group(1)
    assert store_host == "redis" and monitor_host == "redis-monitor" and store_host != monitor_host
    monitor = redis_args(services["redis-monitor"])
    assert monitor["maxmemory-policy"] == "noeviction"
    assert redis_args(services["redis"])["maxmemory-policy"] == "allkeys-lru"  # the store is a cache
    # the maxmemory fits the queries the monitor is told to remember, with room for the rest
    max_queries = int(env["SHIELDSERVE_QUERY_MONITOR__MAX_QUERIES"])
    assert max_queries * MONITOR_BYTES_PER_QUERY + MONITOR_HEADROOM_BYTES <= redis_bytes(monitor["maxmemory"])
    from service.defenses.query_monitor import NEAR_MEMORY_BYTES

    assert NEAR_MEMORY_BYTES <= MONITOR_HEADROOM_BYTES // 2  # the rest for flags, blocks, the key


def test_secrets_come_from_the_environment(compose: dict) -> None:
    """The monitor's hashing key (so replicas agree on it whatever Redis does) and Grafana's
    admin password: required variables, never a literal in the compose file."""
    env = compose["services"]["replica1"]["environment"]
    required = re.compile(r"\$\{([A-Z_]+):\?[^}]+\}")
    secret = required.fullmatch(env["SHIELDSERVE_QUERY_MONITOR__SECRET"])
    grafana = required.fullmatch(compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    assert secret and grafana
    assert "admin/admin" not in (REPO / "docker-compose.yml").read_text()
    # docker/env.example names exactly the variables the compose file requires, with no value
    needed = set(required.findall((REPO / "docker-compose.yml").read_text()))
    assert needed == {secret.group(1), grafana.group(1)}
    example = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == needed and set(example.values()) == {""}


def test_fixed_addresses_are_outside_the_dynamic_pool(compose: dict) -> None:
    """Docker hands out dynamic addresses from ip_range only: the gateway's fixed address,
    which the replicas trust, cannot go to another container."""
    import ipaddress

    config = compose["networks"]["backend"]["ipam"]["config"][0]
    subnet, pool = ipaddress.ip_network(config["subnet"]), ipaddress.ip_network(config["ip_range"])
    assert pool.subnet_of(subnet) and pool != subnet
    fixed = [ipaddress.ip_address(n["ipv4_address"]) for svc in compose["services"].values()
             for n in (svc["networks"].values() if isinstance(svc["networks"], dict) else [])
             if n and "ipv4_address" in n]
    assert fixed, "the gateway has a fixed address"
    for ip in fixed:
        assert ip in subnet and ip not in pool, ip


def test_prometheus_has_no_lifecycle_api(compose: dict) -> None:
    # --web.enable-lifecycle lets anyone who reaches :9090 POST /-/quit (or /-/reload)
    assert not any("lifecycle" in arg for arg in compose["services"]["prometheus"]["command"])


def test_the_documented_gpu_change_serves_on_cuda(compose: dict) -> None:
    """docs/operations.md ("GPU image") gives the compose override that puts the replicas on
    docker/Dockerfile.gpu. Applied to docker-compose.yml as `docker compose -f docker-compose.yml
    -f <override>` merges it (mappings merged key by key, the override's values win), the
    replicas get the GPU image, under its own tag, a GPU, and SHIELDSERVE_DEVICE=cuda: before,
    the docs named the Dockerfile only, and the compose file's `SHIELDSERVE_DEVICE: cpu`, which
    overrides an image's ENV, kept the replicas on the CPU (tagged shieldserve:cpu)."""
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc[doc.index("**GPU image**"):]
    section = section[:section.index("\n## ")]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, 'docs/operations.md, "GPU image": no compose override (a ```yaml block)'
    override = yaml.safe_load(block.group(1))

    def merged(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else value
        return out

    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    final_stage = gpu[gpu.rindex("\nFROM "):]
    image_env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^ENV (.*?)\n(?=\S)", final_stage, re.S | re.M).group(1)))
    assert image_env["SHIELDSERVE_DEVICE"] == "cuda"
    assert set(override["services"]) == set(REPLICAS)
    for r in REPLICAS:
        replica = merged(compose["services"][r], override["services"][r])
        assert replica["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert (REPO / replica["build"]["context"] / replica["build"]["dockerfile"]).is_file()
        assert replica["image"] != compose["services"][r]["image"], "the GPU image under the CPU image's tag"
        # compose's `environment:` wins over the image's ENV
        effective = {**image_env, **{k: str(v) for k, v in replica["environment"].items()}}
        assert effective["SHIELDSERVE_DEVICE"] == "cuda", effective["SHIELDSERVE_DEVICE"]
        devices = replica["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
        # the replica's other settings unchanged
        assert {k: v for k, v in replica["environment"].items() if k != "SHIELDSERVE_DEVICE"} == \
            {k: v for k, v in compose["services"][r]["environment"].items() if k != "SHIELDSERVE_DEVICE"}


def test_the_gateways_own_answers_carry_the_request_id(nginx: str) -> None:
    """Every location of docker/nginx.conf that answers itself (`return`: its errors, the
    hidden routes, its healthz) adds X-Request-ID (tests/test_deploy.py sees it on each it can
    provoke; the 504 only here), each error_page names a location that exists, and no
    add_header sits at server level: nginx drops a server's add_header in any location that has
    one of its own, and on the proxied routes it would double the replicas' X-Request-ID."""
    code = re.sub(r"#.*", "", nginx)
    blocks = {}
    for m in re.finditer(r"^\s*location\s+([^{]+?)\s*\{", code, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        blocks[m.group(1)] = code[m.end():i - 1]
    answering = {name: body for name, body in blocks.items() if re.search(r"^\s*return\s", body, re.M)}
    for name, body in answering.items():
        assert "add_header X-Request-ID $shieldserve_request_id always;" in body, name
    assert len(answering) >= 12, sorted(answering)  # 9 error statuses, /metrics, /admin, healthz
    server = code[code.index("server {"):]
    server_level = re.sub(r"^\s*location\s+[^{]+\{.*?^        \}", "", server, flags=re.S | re.M)
    assert "add_header" not in server_level
    for target in re.findall(r"^\s*error_page [^;]*?(\S+);", code, re.M):
        assert (target if target.startswith("@") else f"= {target}") in blocks, target
