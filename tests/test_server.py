"""The real server process: several workers share metrics; SIGTERM drains without dropping work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import free_ports, png, tampered_copy

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    [port] = free_ports(1)
    return port


def _start(bundle: Path, port: int, *args: str, group: bool = False, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "SHIELDSERVE_BUNDLE": str(bundle), "SHIELDSERVE_LOG_LEVEL": "warning"}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # unless the test names one
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the server's thread choice, as the tests expect it
        full_env.pop(name, None)
    full_env.update(env)
    return subprocess.Popen([sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=group)  # group: its own process group, to signal as a whole


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _count(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _torch_default_threads() -> int:
    """torch's own default in a fresh process (this one's count is pinned by conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_torch_threads_auto_is_torch_default_shared_among_workers(monkeypatch) -> None:
    from service.server import apply_process_settings, torch_threads
    from service.settings import load_settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SHIELDSERVE_TORCH_THREADS", raising=False)
    auto = load_settings()
    assert auto.torch_threads == 0
    assert torch_threads(auto, default=8) is None  # one process: torch's default, every core
    assert torch_threads(auto.model_copy(update={"workers": 2}), default=8) == 4
    assert torch_threads(auto.model_copy(update={"workers": 3}), default=8) == 2
    assert torch_threads(auto.model_copy(update={"workers": 4}), default=2) == 1  # never 0
    assert torch_threads(auto.model_copy(update={"torch_threads": 3, "workers": 2}), default=8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the operator chose: torch follows it already
    assert torch_threads(auto.model_copy(update={"workers": 2}), default=8) is None

    import torch

    before = torch.get_num_threads()
    try:
        apply_process_settings(auto.model_copy(update={"torch_threads": before + 1}))
        assert torch.get_num_threads() == before + 1
        apply_process_settings(auto)  # auto with OMP_NUM_THREADS set: as it is
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_serve_gives_uvicorn_whole_seconds_rounded_up_and_no_proxy_headers(monkeypatch, tmp_path) -> None:
    """uvicorn's graceful period is whole seconds: 0.5 s must not become 0 (in-flight requests
    cancelled at once). Its own X-Forwarded-For handling stays off (the service's
    trusted_proxies decides the client): one process and --workers alike."""
    import uvicorn

    import service.server as server
    from service.settings import load_settings

    configs: list[uvicorn.Config] = []

    class Recorder:
        def __init__(self, config: uvicorn.Config, app: object, drain_seconds: float) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(server, "DrainingServer", Recorder)
    monkeypatch.setattr(server, "apply_process_settings", lambda settings: None)
    monkeypatch.setattr("service.logs.configure_logging", lambda *args: None)
    monkeypatch.setattr("service.app.create_app", lambda settings: object())
    monkeypatch.setattr(server, "check_address", lambda host, port: None)
    for given, want in ((0.5, 1), (2.01, 3), (30.0, 30), (0.0, 0)):
        server.serve(load_settings(bundle=tmp_path, graceful_timeout_s=given))
        assert configs[-1].timeout_graceful_shutdown == want, given
        assert configs[-1].proxy_headers is False
    runs: list[dict] = []
    monkeypatch.setattr(server.uvicorn, "run", lambda target, **kwargs: runs.append(kwargs))
    monkeypatch.setattr(server, "_prepare_multiprocess", lambda: None)
    monkeypatch.setattr(server, "check_worker_app", lambda: None)
    for name in ("SHIELDSERVE_BUNDLE", "SHIELDSERVE_WORKERS"):  # serve sets them: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    server.serve(load_settings(bundle=tmp_path, graceful_timeout_s=0.5, workers=2))
    assert runs[-1]["workers"] == 2 and runs[-1]["timeout_graceful_shutdown"] == 1
    assert runs[-1]["proxy_headers"] is False


def test_with_workers_a_refused_bundle_or_device_is_one_line_and_exit_2(quick_bundle, tmp_path):
    """Only the --workers processes load the bundle: a tampered artifact (or an unknown
    default_pipeline, a device torch cannot use) made each die with a traceback and uvicorn's
    supervisor start another, for ever, never answering. One process said it in one line and
    exit 2; --workers does too now, before any worker starts. A device torch cannot use was
    torch's traceback and exit 1 in one process too."""
    tampered = tampered_copy(quick_bundle, tmp_path / "bundle", "magnet_ae_i.safetensors")
    cases = [(tampered, ("--workers", "2"), {}, "sha256"),
             (quick_bundle, ("--workers", "2"), {"SHIELDSERVE_DEFAULT_PIPELINE": "nosuch"}, "default_pipeline 'nosuch'"),
             (quick_bundle, (), {"SHIELDSERVE_DEVICE": "tpu"}, "device 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((quick_bundle, (), {"SHIELDSERVE_DEVICE": "cuda"}, "torch sees no CUDA GPU"))
    for bundle, args, env, said in cases:
        proc = _start(bundle, _free_port(), *args, SHIELDSERVE_WARMUP="false", **env)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            _stop(proc)
        text = out.decode(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("shieldserve: error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and said in errors[0], (args, env, text[-3000:])
        assert "Traceback" not in text, text[-3000:]


def test_an_address_serve_cannot_listen_on_is_one_line_before_the_load(quick_bundle):
    """A port in use (or a host that is not this machine's) was found by uvicorn after the
    load and warm-up, exit 3, the host unnamed; it is one line and exit 2, at once."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (("--port", str(port)), ("--port", str(port), "--workers", "2")):
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", *args],
                                  cwd=REPO, env={**os.environ, "SHIELDSERVE_BUNDLE": str(quick_bundle)},
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines()[-1].startswith(f"shieldserve: error: cannot listen on 127.0.0.1:{port}")
            assert "Traceback" not in proc.stderr and time.monotonic() - started < 30
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "no-such-host.invalid", "--port", "0"],
                          cwd=REPO, env={**os.environ, "SHIELDSERVE_BUNDLE": str(quick_bundle)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "host 'no-such-host.invalid' does not resolve" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_workers_report_the_sum_of_their_metrics_and_log_like_one_server(quick_bundle, mnist):
    port = _free_port()
    proc = _start(quick_bundle, port, "--workers", "2", SHIELDSERVE_LOG_LEVEL="info", SHIELDSERVE_TORCH_THREADS="0")
    try:
        _wait_ready(port, proc)
        time.sleep(2)  # the second worker may still be warming up
        body = png(mnist.test.x[0])
        n = 40

        def one(_: int) -> int:
            # a new connection per request, so the kernel spreads them over both workers
            return httpx.post(f"http://127.0.0.1:{port}/predict?pipeline=baseline", content=body,
                              headers={"content-type": "image/png"}, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(n))) == [200] * n
        prefix = 'shieldserve_requests_total{endpoint="predict",outcome="accepted",pipeline="baseline"}'
        for _ in range(4):  # whichever worker answers the scrape, it reports all of them
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            assert _count(text, prefix) == n
    finally:
        _stop(proc)
    # the workers log as the single-process server does: JSON lines, one access line a request
    lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line.startswith("{")]
    access = [r for r in lines if r.get("logger") == "shieldserve.access" and r.get("path") == "/predict"]
    assert len(access) == n and {r["status"] for r in access} == {200}
    assert sum(" loaded on cpu in " in r.get("message", "") for r in lines) == 2  # each worker's bundle, its device named
    # each worker set its share of torch's default threads, once, at its start
    share = max(1, _torch_default_threads() // 2)
    threads = [r["message"] for r in lines if r.get("message", "").startswith("torch intra-op threads")]
    assert threads == [f"torch intra-op threads: {share} (auto; set torch_threads to choose)"] * 2


@pytest.mark.slow
def test_two_workers_report_a_block_and_its_end_whichever_answers_the_scrape(quick_bundle, mnist, tmp_path):
    """`shieldserve_blocked_clients` with --workers: the multiprocess collector exposes only the
    values processes set (a callback gauge is ignored), so a worker sets its count when it
    blocks a client, when that block ends and at each scrape it answers; the workers' counts
    add up (each blocks on its own store). A scrape shows the client blocked, then, once the
    cooldown is over, no longer, whichever worker answers it."""
    import yaml

    from tests.live_server import config_file

    cooldown = 6.0
    path = config_file(tmp_path, {"baseline"}, default_pipeline="baseline")
    data = yaml.safe_load(path.read_text())
    data["pipelines"]["watch"] = {"defenses": [], "query_monitor": {"action": "block", "block_after": 0,
                                                                    "cooldown_s": cooldown}}
    path.write_text(yaml.safe_dump(data))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    metrics_dir = tmp_path / "metrics"
    proc = _start(quick_bundle, port, "--config", str(path), "--workers", "2", SHIELDSERVE_WARMUP="false",
                  SHIELDSERVE_TORCH_THREADS="1", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))

    def exposed() -> float:
        """The gauge as a scrape answered by either worker would expose it, read from the workers'
        files without a scrape (the worker answering a scrape refreshes its own count first, which
        would hide a stale one when it is the worker that blocked the client)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        return _count(generate_latest(registry).decode(), "shieldserve_blocked_clients ")

    def scrapes() -> dict[str, list[float]]:
        """The gauge as each worker answers it (a request id starts with its process's prefix),
        over 16 scrapes on new connections, 8 at a time, so that both workers answer some."""
        def one(_: int) -> tuple[str, float]:
            r = httpx.get(f"{url}/metrics", timeout=30)
            return r.headers["x-request-id"][:16], _count(r.text, "shieldserve_blocked_clients ")

        out: dict[str, list[float]] = {}
        with ThreadPoolExecutor(8) as pool:
            for worker, value in pool.map(one, range(16)):
                out.setdefault(worker, []).append(value)
        return out

    try:
        _wait_ready(port, proc)
        time.sleep(2)  # the second worker may still be starting
        x = mnist.test.x[3]
        near = x.clone()
        near[..., 0, 0] = 0.5
        headers = {"content-type": "image/png"}
        with httpx.Client(base_url=url, timeout=30) as c:  # one connection: one worker sees it all
            assert c.post("/predict?pipeline=watch", content=png(x), headers=headers).status_code == 200
            r = c.post("/predict?pipeline=watch", content=png(near), headers=headers)
            assert r.json()["results"][0]["rejected_by"][0]["defense"] == "query_monitor", r.text
            blocked_at = time.monotonic()
            r = c.post("/predict?pipeline=watch", content=png(mnist.test.x[10]), headers=headers)
            assert r.status_code == 429
            blocker = r.headers["x-request-id"][:16]
        during, exposed_during = scrapes(), exposed()
        if time.monotonic() < blocked_at + cooldown - 1:  # a loaded machine may be slower than the cooldown
            assert all(v == 1 for values in during.values() for v in values) and exposed_during == 1, during
        # after the cooldown, with no scrape at all, the worker that blocked the client has set
        # its count to 0 (the other workers' scrapes would otherwise add its stale 1)
        time.sleep(max(0.0, blocked_at + cooldown + 1.5 - time.monotonic()))
        deadline = time.monotonic() + 30
        while exposed() != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert exposed() == 0
        deadline = time.monotonic() + 60
        while True:
            after = scrapes()
            others = [v for worker, values in after.items() if worker != blocker for v in values]
            if (others and not any(v for values in after.values() for v in values)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert others and not any(v for values in after.values() for v in values), (blocker, after)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_sigterm_turns_readiness_off_first_and_finishes_in_flight_requests(quick_bundle, mnist):
    port = _free_port()
    # a long batch delay keeps requests in flight when the signal arrives
    proc = _start(quick_bundle, port, SHIELDSERVE_DRAIN_SECONDS="2",
                  SHIELDSERVE_BATCHING__MAX_DELAY_MS="1500", SHIELDSERVE_BATCHING__MAX_BATCH_SIZE="256")
    try:
        _wait_ready(port, proc)
        body = png(mnist.test.x[1])
        url = f"http://127.0.0.1:{port}/predict?pipeline=baseline"
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(httpx.post, url, content=body, headers={"content-type": "image/png"}, timeout=60)
                       for _ in range(16)]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert [f.result().status_code for f in futures] == [200] * 16
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_sigterm_drains_every_worker_too(quick_bundle, mnist):
    """--workers 2: uvicorn's supervisor forwards SIGTERM to its workers, and each drains as the
    single process does (it closed its listener at the signal, with no drain, before)."""
    port = _free_port()
    proc = _start(quick_bundle, port, "--workers", "2", SHIELDSERVE_DRAIN_SECONDS="3", SHIELDSERVE_TORCH_THREADS="1",
                  SHIELDSERVE_WARMUP="false", SHIELDSERVE_LOG_LEVEL="info")
    try:
        _wait_ready(port, proc)
        time.sleep(2)  # the second worker may still be starting
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        seen = set()
        for _ in range(12):  # new connections, so that both workers answer some
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            seen.add((r.status_code, r.json()["status"]))
            ok = httpx.post(f"http://127.0.0.1:{port}/predict?pipeline=baseline", content=png(mnist.test.x[0]),
                            headers={"content-type": "image/png"}, timeout=30)
            assert ok.status_code == 200  # still answering during the drain
        assert seen == {(503, "draining")}
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)
    lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line.startswith("{")]
    assert sum("draining for 3.0s" in r.get("message", "") for r in lines) == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_to_the_whole_process_group_drains_the_workers_too(quick_bundle, mnist, sig):
    """systemd (KillMode=control-group), `kill -TERM -PGID` and Ctrl-C signal every process of
    the group: each worker starts its drain, then uvicorn's supervisor forwards SIGTERM, which
    cut the drain short; after Ctrl-C the drain's timer then forced the exit, dropping the
    requests in flight. The forward is ignored during a drain, and the timer stops gracefully."""
    port = _free_port()
    # the drain (4 s) outlasts the probe 1.2 s in by a margin a loaded machine keeps
    proc = _start(quick_bundle, port, "--workers", "2", group=True, SHIELDSERVE_DRAIN_SECONDS="4",
                  SHIELDSERVE_TORCH_THREADS="1", SHIELDSERVE_WARMUP="false",
                  SHIELDSERVE_BATCHING__MAX_DELAY_MS="2500", SHIELDSERVE_BATCHING__MAX_BATCH_SIZE="256")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(port, proc)
        time.sleep(2)  # the second worker may still be starting
        body = png(mnist.test.x[1])
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, f"{url}/predict?pipeline=baseline", content=body,
                                   headers={"content-type": "image/png"}, timeout=60) for _ in range(8)]
            time.sleep(0.5)  # in flight: the batch waits 2.5 s for company
            signalled = time.monotonic()
            os.killpg(proc.pid, sig)
            time.sleep(1.2)  # past the supervisor's forward (within 0.5 s): still draining, not closed
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "draining", time.monotonic() - signalled
            assert [f.result().status_code for f in futures] == [200] * 8
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_workers_live_gauges_are_dropped_at_the_next_scrape(tmp_path) -> None:
    """--workers: a worker killed (out of memory, a crash) never runs its lifespan's
    mark_process_dead, and uvicorn starts another; its 1 in the query monitor's degraded gauge
    ("livemax") was read by every scrape until the server restarted. The scrape drops the live
    gauges of processes that no longer run."""
    child = """
import os, sys
from service.metrics import Metrics
m = Metrics(shared_monitor=True)
m.monitor_degraded.set(int(os.environ["V"]))
if os.environ["V"] == "1":
    os.kill(os.getpid(), 9)  # the worker crashes while degraded
print([line for line in m.exposition().decode().splitlines() if line.startswith("shieldserve_query_monitor_degraded ")])
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", child], env={**env, "V": "1"}, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith("gauge_livemax_") for p in tmp_path.iterdir())  # its 1 is on disk
    live = subprocess.run([sys.executable, "-c", child], env={**env, "V": "0"}, cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert live.stdout.strip() == "['shieldserve_query_monitor_degraded 0.0']", live.stdout + live.stderr
