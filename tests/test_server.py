"""The real server process: several workers share metrics; SIGTERM drains without dropping work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import png

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, port: int, *args: str, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "SHIELDSERVE_BUNDLE": str(bundle), "SHIELDSERVE_LOG_LEVEL": "warning", **env}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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
    assert sum("loaded in" in r.get("message", "") for r in lines) == 2  # each worker's bundle
    # each worker set its share of torch's default threads, once, at its start
    share = max(1, _torch_default_threads() // 2)
    threads = [r["message"] for r in lines if r.get("message", "").startswith("torch intra-op threads")]
    assert threads == [f"torch intra-op threads: {share} (auto; set torch_threads to choose)"] * 2


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
