"""Load tools for production hardening (issue 8): an httpx async driver on 127.0.0.1 only.

    python bench/load.py burst   [--clients 64] [--duration 60] [--pipeline magnet]
    python bench/load.py soak    [--minutes 10] [--clients 8]   [--pipeline magnet]
    python bench/load.py sigterm [--clients 32] [--before 5]    [--pipeline magnet]

Each starts its own server (`python -m service serve`, the bundle from --bundle or
models/default, a config keeping only `baseline` and the pipeline under test), prints a table
and writes JSON to bench/results/load_<mode>.json. Clients are closed-loop: each holds one
keep-alive connection and sends the next request (a raw image/png body of a real test digit,
rotating through 64 digits) when the previous answer is in.

burst    N clients for D seconds. Every answer that is not 200 counts as an error except an
         explicit 429/503 `overloaded` with Retry-After (backpressure, by contract); broken
         connections and timeouts are errors. p50/p99 latency of the 200s, throughput.
soak     N clients for M minutes; the server's resident memory (VmRSS from /proc) every 10 s.
         Growth = (last sample - sample after the 60 s warm-up) / the warm-up sample; goal < 10%.
sigterm  N clients for B seconds, then SIGTERM to the server. The clients behave like a
         load balancer: they poll /readyz every 50 ms and send no new request once it answers
         503 (readiness turns false first, `drain_seconds` before the server stops accepting).
         A request sent before that must be answered: an in-flight request that gets no
         answer (connection reset, closed, timed out) is "dropped". Goal: zero dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _digits(n: int = 64) -> list[bytes]:
    from models.datasets import load_dataset
    from service.imaging import encode_png

    x = load_dataset("mnist5k").test.x[:n]
    return [encode_png(img) for img in x]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    """`python -m service serve` in a subprocess, niced, on a free port."""

    def __init__(self, bundle: Path, pipeline: str, workdir: Path, torch_threads: int,
                 env: dict[str, str] | None = None) -> None:
        import yaml

        from service.settings import PACKAGED_CONFIG

        packaged = yaml.safe_load(PACKAGED_CONFIG.read_text())
        keep = {"baseline", pipeline}
        config = {"default_pipeline": pipeline,
                  "pipelines": {n: None for n in packaged["pipelines"] if n not in keep}}
        self.config = workdir / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = workdir / "server.log"
        full_env = {**os.environ, "SHIELDSERVE_BUNDLE": str(bundle), "SHIELDSERVE_LOG_LEVEL": "warning",
                    "SHIELDSERVE_TORCH_THREADS": str(torch_threads), "OMP_NUM_THREADS": str(torch_threads),
                    "PYTHONPATH": str(common.REPO_ROOT), **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "service", "serve", "--config", str(self.config),
             "--host", HOST, "--port", str(self.port)],
            cwd=common.REPO_ROOT, env=full_env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("server did not become ready")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Stats:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.backpressure_without_retry_after = 0
        self.completed = 0

    def record(self, status: int, seconds: float, headers: Any, body: bytes) -> None:
        self.statuses[str(status)] += 1
        if status == 200:
            self.completed += 1
            self.latencies.append(seconds)
        elif status in (429, 503):
            try:
                ok = json.loads(body)["error"]["code"] == "overloaded" and "retry-after" in headers
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self.backpressure_without_retry_after += 1
                self._example(f"{status} without the contract's overloaded body/Retry-After: {body[:200]!r}")
        else:
            self._example(f"{status}: {body[:200]!r}")

    def failure(self, kind: str, exc: BaseException) -> None:
        self.statuses[kind] += 1
        self._example(f"{kind}: {exc!r}")

    def _example(self, text: str) -> None:
        if len(self.errors) < 8:
            self.errors.append(text)

    @property
    def errors_total(self) -> int:
        explicit = sum(n for s, n in self.statuses.items() if s in ("429", "503")) - self.backpressure_without_retry_after
        return sum(self.statuses.values()) - self.statuses["200"] - explicit


async def _client(i: int, url: str, bodies: list[bytes], stats: Stats, until: list[float],
                  stop: asyncio.Event, inflight: dict[int, float], timeout: float) -> None:
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        k = i
        while not stop.is_set() and time.monotonic() < until[0]:
            body = bodies[k % len(bodies)]
            k += 1
            started = time.monotonic()
            inflight[i] = started
            try:
                r = await client.post("/predict", content=body, headers={"content-type": "image/png"})
                stats.record(r.status_code, time.monotonic() - started, r.headers, r.content)
                if r.status_code in (429, 503):
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1) or 1), 1.0) * 0.1)
            except httpx.TimeoutException as exc:
                stats.failure("timeout", exc)
            except httpx.HTTPError as exc:
                stats.failure("connection_error", exc)
            finally:
                inflight.pop(i, None)


async def _run_clients(url: str, bodies: list[bytes], clients: int, seconds: float, stats: Stats,
                       stop: asyncio.Event | None = None, inflight: dict[int, float] | None = None,
                       timeout: float = 60) -> float:
    stop = stop or asyncio.Event()
    inflight = inflight if inflight is not None else {}
    until = [time.monotonic() + seconds]
    started = time.monotonic()
    await asyncio.gather(*(_client(i, url, bodies, stats, until, stop, inflight, timeout) for i in range(clients)))
    return time.monotonic() - started


def _summary(stats: Stats, window: float, clients: int) -> dict[str, Any]:
    lat = common.summarize_latencies(stats.latencies)
    return {"clients": clients, "window_s": round(window, 2), "answered_200": stats.completed,
            "throughput_rps": stats.completed / window if window else 0.0,
            "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"],
            "overloaded": stats.statuses["503"] + stats.statuses["429"],
            "errors": stats.errors_total, "statuses": dict(stats.statuses), "error_examples": stats.errors}


# ------------------------------------------------------------------------------- modes
def burst(args: argparse.Namespace, server: Server, bodies: list[bytes]) -> dict[str, Any]:
    stats = Stats()
    common.log(f"warm-up 5 s, then {args.clients} clients for {args.duration} s on {args.pipeline!r}")
    asyncio.run(_run_clients(server.url, bodies, args.clients, 5, Stats()))
    rss0 = _rss_kib(server.proc.pid)
    window = asyncio.run(_run_clients(server.url, bodies, args.clients, args.duration, stats))
    out = _summary(stats, window, args.clients)
    out["server_rss_mib"] = [round(rss0 / 1024, 1), round(_rss_kib(server.proc.pid) / 1024, 1)]
    common.print_table([{k: out[k] for k in ("clients", "window_s", "answered_200", "throughput_rps", "p50_ms",
                                            "p99_ms", "max_ms", "overloaded", "errors")}],
                       title=f"burst: /predict?pipeline={args.pipeline}")
    out["goal"] = "zero errors other than explicit 429/503 overloaded"
    out["goal_met"] = out["errors"] == 0
    return out


def soak(args: argparse.Namespace, server: Server, bodies: list[bytes]) -> dict[str, Any]:
    stats = Stats()
    samples: list[tuple[float, float]] = []
    total = args.minutes * 60.0

    async def sampler(stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - t0, 1), _rss_kib(server.proc.pid) / 1024))
            try:
                await asyncio.wait_for(stop.wait(), 10)
            except asyncio.TimeoutError:
                pass

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(sampler(stop))
        window = await _run_clients(server.url, bodies, args.clients, total, stats)
        stop.set()
        await task
        samples.append((round(window, 1), _rss_kib(server.proc.pid) / 1024))
        return window

    common.log(f"soak: {args.clients} clients for {args.minutes} min on {args.pipeline!r}")
    window = asyncio.run(main())
    base = next((m for t, m in samples if t >= 60), samples[0][1])
    last = samples[-1][1]
    growth = (last - base) / base
    out = _summary(stats, window, args.clients)
    out.update({"rss_mib_start": round(samples[0][1], 1), "rss_mib_after_warmup": round(base, 1),
                "rss_mib_end": round(last, 1), "rss_mib_max": round(max(m for _, m in samples), 1),
                "rss_growth": growth, "rss_samples": samples, "goal": "rss growth < 10% after a 60 s warm-up",
                "goal_met": growth < 0.10 and out["errors"] == 0})
    common.print_table([{"minutes": args.minutes, "clients": args.clients, "answered_200": out["answered_200"],
                         "throughput_rps": out["throughput_rps"], "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"],
                         "errors": out["errors"], "rss_start_mib": out["rss_mib_start"],
                         "rss_warm_mib": out["rss_mib_after_warmup"], "rss_end_mib": out["rss_mib_end"],
                         "growth_pct": 100 * growth}], title=f"soak: /predict?pipeline={args.pipeline}")
    return out


def sigterm(args: argparse.Namespace, server: Server, bodies: list[bytes]) -> dict[str, Any]:
    import httpx

    stats = Stats()
    marks: dict[str, Any] = {}

    async def main() -> float:
        stop = asyncio.Event()
        inflight: dict[int, float] = {}
        load = asyncio.create_task(_run_clients(server.url, bodies, args.clients, 3600, stats, stop, inflight))
        await asyncio.sleep(args.before)
        marks["inflight_at_sigterm"] = len(inflight)
        marks["answered_before_sigterm"] = stats.completed
        server.proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        async with httpx.AsyncClient(base_url=server.url, timeout=2) as probe:
            while True:  # a load balancer's readiness probe
                try:
                    r = await probe.get("/readyz")
                    if r.status_code == 503:
                        break
                except httpx.HTTPError:
                    break
                await asyncio.sleep(0.05)
        marks["readiness_false_after_s"] = round(time.monotonic() - t_signal, 3)
        marks["inflight_when_readiness_false"] = len(inflight)
        stop.set()  # no new request from here on; those in flight must be answered
        await load
        marks["last_answer_after_s"] = round(time.monotonic() - t_signal, 3)
        return time.monotonic() - t_signal

    common.log(f"sigterm: {args.clients} clients on {args.pipeline!r}, SIGTERM after {args.before} s")
    asyncio.run(main())
    code = server.proc.wait(60)
    dropped = stats.statuses["connection_error"] + stats.statuses["timeout"]
    out = _summary(stats, args.before, args.clients)
    out.update(marks)
    out.update({"dropped_in_flight": dropped, "server_exit_code": code,
                "goal": "zero in-flight requests dropped", "goal_met": dropped == 0 and out["errors"] == 0})
    common.print_table([{"clients": args.clients, "answered_200": out["answered_200"],
                         "in_flight_at_sigterm": marks["inflight_at_sigterm"],
                         "ready_false_s": marks["readiness_false_after_s"],
                         "last_answer_s": marks["last_answer_after_s"], "dropped": dropped,
                         "other_errors": out["errors"] - dropped, "exit_code": code}],
                       title=f"sigterm during load: /predict?pipeline={args.pipeline}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["burst", "soak", "sigterm"])
    p.add_argument("--bundle", help="default: models/default")
    p.add_argument("--pipeline", default="magnet")
    p.add_argument("--clients", type=int)
    p.add_argument("--duration", type=float, default=60.0, help="burst: seconds")
    p.add_argument("--minutes", type=float, default=10.0, help="soak: minutes")
    p.add_argument("--before", type=float, default=5.0, help="sigterm: seconds of load before the signal")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", help="JSON path; default bench/results/load_<mode>.json")
    args = p.parse_args(argv)
    args.clients = args.clients or {"burst": 64, "soak": 8, "sigterm": 32}[args.mode]
    started = common.now_iso()
    bundle = Path(args.bundle).resolve() if args.bundle else common.REPO_ROOT / "models" / "default"
    bodies = _digits()
    with tempfile.TemporaryDirectory(prefix="shieldserve-load-") as tmp:
        server = Server(bundle, args.pipeline, Path(tmp), args.torch_threads)
        try:
            server.wait_ready()
            result = {"burst": burst, "soak": soak, "sigterm": sigterm}[args.mode](args, server, bodies)
        finally:
            server.stop()
            log_tail = server.log.read_text()[-3000:]
    result.update({"mode": args.mode, "pipeline": args.pipeline, "bundle": str(bundle),
                   "torch_threads": args.torch_threads, "server_log_tail": log_tail,
                   "command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    path = common.write_results(f"load_{args.mode}", result, out=args.out, started=started)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
