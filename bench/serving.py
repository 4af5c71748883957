"""Serving benchmark: /predict throughput and latency on `baseline`, batching on vs off,
against the two ceilings measured in the same run.

    .venv/bin/python bench/serving.py [--bundle PATH] [--duration S] [--out FILE]

What one run does, back to back on 127.0.0.1 (each measurement is short, so the ratios are
taken under the same machine load):

1. Ceiling (b): the classifier's in-process batched throughput, images/s of
   `classifier(x)` under `torch.no_grad()` at the batcher's `max_batch_size` (64), 32 and 1,
   in a worker thread as the server runs it, for the eager network and for the
   TorchScript-optimised copy the server decides with (`optimize_classifier`); for reference
   also batch 64 with one torch thread, `Pipeline.run` of `baseline`, and the cost of decoding
   one PNG (`decode_batch`). None of these are HTTP. The classifier is measured again after
   the servers.
2. For batching off, then on: a fresh server (`python -m service serve`, settings from
   `SHIELDSERVE_*` environment variables), then
   - ceiling (a): closed-loop GET /healthz (a route that does no work) at 32 clients,
   - POST /predict?pipeline=baseline (a raw image/png body of a real test digit, rotating
     through 64 digits) at 1 and at 32 clients.
   On the batching-on server, /healthz and /predict at 32 clients are measured `--repeats`
   times (default 3), interleaved; the best window of each is used, and every window and the
   ratio of the median /predict window are printed too.
3. The serial limit of HTTP plus model, L = 1 / (1/a + 1/b) requests/s (one image each),
   with a = the best of all /healthz windows (both servers) and b = the classifier's best of
   batch 64 and 32, eager or optimised, before and after (taking the best makes the goal
   stricter: the faster the model the server runs, the higher the limit it is held to).
   Goals: batching on at 32 clients >= 70% of L, and >= 2x batching off at 32 clients.

The load driver runs in its own process (no torch, a callback-based asyncio protocol on
uvloop, pre-built HTTP/1.1 keep-alive requests), so the client costs as little CPU as it can
on a machine it shares with the server. Each client holds one connection and sends its next
request as soon as the previous answer is complete; requests completing in the measurement
window (after a warm-up) count. Any non-200 answer or broken connection is an error.

Prints a table (stdout; progress goes to stderr) and writes JSON to
`bench/results/serving.json` (git-ignored). The exit status is 0 whether or not the goals
are met (this is a benchmark, not a test); it is 1 when a phase failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

HOST = "127.0.0.1"
NAME = "serving"
PIPELINE = "baseline"
GOAL_OF_SERIAL_LIMIT = 0.70
GOAL_ON_OVER_OFF = 2.0


# ============================================================================ load driver
# Runs in a separate process: `python bench/serving.py _drive CONFIG.json`. Stdlib (+uvloop).

def _proc_cpu_seconds(pid: int | None) -> float | None:
    """user+system CPU seconds of a process (all its threads), from /proc."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Load:
    """Shared state of one closed-loop run."""

    def __init__(self, requests: list[bytes], clients: int) -> None:
        self.requests = requests
        self.clients = clients
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.stopping = False
        self.latencies: list[float] = []
        self.completed = 0            # 200s completing inside the window
        self.statuses: Counter[str] = Counter()   # every answer inside the window, by status
        self.conn_errors = 0
        self.error_examples: list[str] = []
        self.open = 0
        self.all_closed: asyncio.Future | None = None

    def record(self, started: float, ended: float, status: int, body: bytes) -> None:
        if self.window_start <= ended <= self.window_end:
            self.statuses[str(status)] += 1
            if status == 200:
                self.completed += 1
                self.latencies.append(ended - started)
            elif len(self.error_examples) < 5:
                self.error_examples.append(f"{status}: {body[:300].decode('utf-8', 'replace')}")

    def connection_closed(self) -> None:
        self.open -= 1
        if self.open == 0 and self.all_closed is not None and not self.all_closed.done():
            self.all_closed.set_result(None)


class _Client(asyncio.Protocol):
    """One keep-alive connection; the next request goes out from the callback that completes
    the previous response (no coroutine, no task per request)."""

    def __init__(self, load: _Load, index: int, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.load, self.loop, self.port = load, loop, port
        self.next_request = index  # clients start on different digits
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1             # total bytes of the current response, once headers are in
        self.status = 0
        self.close_after = False
        self.started = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        if self.load.stopping:
            self.transport.close()
            return
        reqs = self.load.requests
        req = reqs[self.next_request % len(reqs)]
        self.next_request += self.load.clients
        self.buf.clear()
        self.need = -1
        self.busy = True
        self.started = time.perf_counter()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            i = head.find(b"\r\ncontent-length:")
            if i < 0:  # the service always sends Content-Length; anything else is an error here
                self.status, self.need, self.close_after = 0, end + 4, True
            else:
                j = head.find(b"\r\n", i + 2)
                self.need = end + 4 + int(head[i + 17:j if j >= 0 else len(head)])
                self.close_after = b"\r\nconnection: close" in head
        if len(self.buf) < self.need:
            return
        ended = time.perf_counter()
        self.busy = False
        self.load.record(self.started, ended, self.status, bytes(self.buf[self.need - min(300, self.need):self.need])
                         if self.status != 200 else b"")
        if self.close_after:
            assert self.transport is not None
            self.transport.close()  # connection_lost reconnects
        else:
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        load = self.load
        if self.busy and load.window_start <= time.perf_counter() <= load.window_end:
            load.conn_errors += 1
            if len(load.error_examples) < 5:
                load.error_examples.append(f"connection lost mid-request: {exc!r}")
        load.connection_closed()
        if not load.stopping:
            self.loop.create_task(_connect(load, self.next_request, self.loop, self.port))


async def _connect(load: _Load, index: int, loop: asyncio.AbstractEventLoop, port: int) -> None:
    load.open += 1
    for attempt in range(100):
        try:
            await loop.create_connection(lambda: _Client(load, index, loop, port), HOST, port)
            return
        except OSError as exc:
            if load.window_start <= time.perf_counter() <= load.window_end:
                load.conn_errors += 1
                if len(load.error_examples) < 5:
                    load.error_examples.append(f"connect failed: {exc!r}")
            if load.stopping:
                break
            await asyncio.sleep(0.05)
    load.connection_closed()


async def _drive_async(cfg: dict[str, Any]) -> dict[str, Any]:
    requests = common.read_requests(cfg["requests_file"], cfg["target"])
    loop = asyncio.get_running_loop()
    load = _Load(requests, cfg["clients"])
    load.all_closed = loop.create_future()
    for i in range(cfg["clients"]):
        loop.create_task(_connect(load, i, loop, cfg["port"]))
    await asyncio.sleep(cfg["warmup"])
    load.window_start = time.perf_counter()
    server_cpu0, client_cpu0 = _proc_cpu_seconds(cfg.get("server_pid")), _self_cpu_seconds()
    await asyncio.sleep(cfg["duration"])
    load.window_end = time.perf_counter()
    server_cpu1, client_cpu1 = _proc_cpu_seconds(cfg.get("server_pid")), _self_cpu_seconds()
    window = load.window_end - load.window_start
    load.stopping = True
    try:
        await asyncio.wait_for(asyncio.shield(load.all_closed), timeout=10)
    except asyncio.TimeoutError:
        pass
    errors = sum(n for s, n in load.statuses.items() if s != "200") + load.conn_errors
    return {
        "clients": cfg["clients"], "target": cfg["target"], "window_s": window,
        "completed": load.completed, "rps": load.completed / window, "errors": errors,
        "statuses": dict(load.statuses), "connection_errors": load.conn_errors,
        "error_examples": load.error_examples,
        "latency": common.summarize_latencies(load.latencies),
        "server_cpu_s": None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0,
        "client_cpu_s": client_cpu1 - client_cpu0,
    }


def _drive_main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_drive_async(cfg))))
    return 0


# ============================================================================ orchestrator
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def resolve_bundle(given: str | None, workdir: Path) -> tuple[Path, str]:
    """The bundle to serve, and where it came from."""
    if given:
        path = Path(given).resolve()
        if not (path / "manifest.json").is_file():
            raise SystemExit(f"--bundle {path}: no manifest.json there")
        return path, "given"
    default = common.REPO_ROOT / "models" / "default"
    if (default / "manifest.json").is_file():
        return default, "models/default"
    from models.train import build_bundle

    out = workdir / "bundle"
    common.log(f"{default}/manifest.json is missing: building a quick bundle (classifier only) into {out}")
    started = time.monotonic()
    build_bundle(out, preset="quick", steps=["classifier"], argv=["--preset", "quick", "--steps", "classifier"])
    common.log(f"quick bundle built in {time.monotonic() - started:.0f}s")
    return out, "built: quick preset, classifier only, temporary"


_HOST_PLACEHOLDER = b"Host: 127.0.0.1:PORT"


def load_requests(n: int) -> tuple[dict[str, list[bytes]], Any]:
    """Pre-built HTTP/1.1 requests: /predict with a real test digit each, and /healthz.
    The Host header's port is a placeholder, filled in per server."""
    from models.datasets import load_dataset
    from service.imaging import encode_png

    test = load_dataset("mnist5k").test
    x, y = test.x[:n], test.y[:n]
    host = _HOST_PLACEHOLDER + b"\r\n"
    predict = []
    for img in x:
        png = encode_png(img)
        predict.append(b"POST /predict?pipeline=" + PIPELINE.encode() + b" HTTP/1.1\r\n" + host
                       + b"Content-Type: image/png\r\nContent-Length: " + str(len(png)).encode()
                       + b"\r\n\r\n" + png)
    health = [b"GET /healthz HTTP/1.1\r\n" + host + b"\r\n"]
    return {"predict": predict, "healthz": health}, (x, y)


# ---------------------------------------------------------------------------- ceiling (b)
def _rate(fn: Any, items_per_call: int, seconds: float) -> dict[str, float]:
    """Calls `fn` repeatedly for about `seconds` (after a short warm-up): items/s, ms per call,
    and this process's CPU milliseconds per item (all threads; the caller's others are idle)."""
    for _ in range(3):
        fn()
    calls, started, cpu0 = 0, time.perf_counter(), time.process_time()
    deadline = started + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed, cpu = now - started, time.process_time() - cpu0
    return {"items_per_s": calls * items_per_call / elapsed, "ms_per_call": 1000.0 * elapsed / calls,
            "cpu_ms_per_item": 1000.0 * cpu / (calls * items_per_call), "calls": calls,
            "batch": items_per_call}


def _batch_of(x_test: Any, n: int) -> Any:
    import torch

    reps = (n + len(x_test) - 1) // len(x_test)
    return torch.cat([x_test] * reps)[:n].contiguous()


def measure_classifier(bundle: Path, x_test: Any, seconds: float, max_batch: int) -> dict[str, Any]:
    """images/s of the bare classifier in this process, at max_batch, 32 and 1, with torch's
    default thread count, plus max_batch with one torch thread (for reference); each for the
    eager network (`classifier_b*`) and for the TorchScript-optimised copy the server decides
    with (`optimized_b*`, service.defenses.base.optimize_for_cpu; absent if it cannot be made).

    The calls run in a worker thread, as the server's inference does (its executor): on a
    busy machine, torch's intra-op thread team behaves very differently when driven from the
    main thread (batch 1 measured 100x slower there under load), which would make the
    ceiling meaningless."""
    import torch

    from models.bundle import Bundle
    from service.defenses.base import optimize_for_cpu

    b = Bundle.load(bundle)
    clf = b.classifier("cpu")
    fast = optimize_for_cpu(clf, tuple(b.input_spec.shape))
    models = {"classifier": clf, **({"optimized": fast} if fast is not clf else {})}
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"torch_threads": threads}

    def run() -> None:
        with torch.no_grad():
            for name, m in models.items():
                for n in sorted({max_batch, 32, 1}, reverse=True):
                    xb = _batch_of(x_test, n)
                    out[f"{name}_b{n}"] = _rate(lambda xb=xb, m=m: m(xb), n, seconds)
            if threads != 1:
                torch.set_num_threads(1)
                try:
                    xb = _batch_of(x_test, max_batch)
                    for name, m in models.items():
                        out[f"{name}_b{max_batch}_1thread"] = _rate(lambda m=m: m(xb), max_batch, seconds)
                finally:
                    torch.set_num_threads(threads)

    with ThreadPoolExecutor(1, thread_name_prefix="bench-model") as pool:
        pool.submit(run).result()
    return out


def measure_model(bundle: Path, x_test: Any, pngs: list[bytes], seconds: float,
                  max_batch: int) -> dict[str, Any]:
    """The classifier, then the baseline pipeline and PNG decoding, in this process."""
    import torch

    from service.defenses.base import RunContext
    from service.imaging import decode_batch
    from service.runtime import Runtime
    from service.settings import load_settings

    out = measure_classifier(bundle, x_test, seconds, max_batch)
    # torch's default thread count, as for the classifier above (the server's auto leaves a core
    # to its event loop; here nothing else runs)
    runtime = Runtime(load_settings(bundle=bundle, warmup=False, torch_threads=torch.get_num_threads()))
    pipe = runtime.pipelines[PIPELINE]
    xb = _batch_of(x_test, max_batch)
    limits = runtime.image_limits
    k = iter(range(10**9))

    def run() -> None:
        # what the server's inference thread runs per batch: the whole baseline pipeline
        out[f"pipeline_b{max_batch}"] = _rate(lambda: pipe.run(xb, RunContext(device=runtime.device, seed=0)),
                                              max_batch, seconds)
        # what each request pays to decode its upload (in a worker thread in the server too)
        out["decode_png"] = _rate(lambda: decode_batch([(pngs[next(k) % len(pngs)], "image/png")],
                                                       runtime.input_spec, limits, 64), 1, min(seconds, 1.0))

    runtime.compute.call(run)  # on the runtime's compute thread, as the server runs it
    runtime.executor.shutdown(wait=False)
    runtime.compute.close()
    return out


# ---------------------------------------------------------------------------- servers
class Server:
    def __init__(self, bundle: Path, batching: bool, max_batch: int, max_delay_ms: float,
                 logdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.batching = batching
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIELDSERVE_")}
        env.update({
            "SHIELDSERVE_BUNDLE": str(bundle),
            "SHIELDSERVE_BATCHING__ENABLED": "true" if batching else "false",
            "SHIELDSERVE_BATCHING__MAX_BATCH_SIZE": str(max_batch),
            "SHIELDSERVE_BATCHING__MAX_DELAY_MS": str(max_delay_ms),
            "SHIELDSERVE_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        })
        self.log_path = logdir / f"server-batching-{'on' if batching else 'off'}.log"
        self._log = open(self.log_path, "wb")
        env.update(extra_env or {})
        self.proc = subprocess.Popen(self.command(), cwd=common.REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service", "serve", "--host", HOST, "--port", str(self.port)]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 180.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/readyz", timeout=1.0)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def batch_sizes(self) -> dict[str, float] | None:
        """Mean images per batch on `baseline`, from the server's own histogram."""
        try:
            status, body = self.get("/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        total = count = None
        for line in body.decode().splitlines():
            if line.startswith("shieldserve_batch_size_sum") and f'pipeline="{PIPELINE}"' in line:
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("shieldserve_batch_size_count") and f'pipeline="{PIPELINE}"' in line:
                count = float(line.rsplit(" ", 1)[1])
        if not count:
            return None
        return {"batches": count, "images": total, "mean_batch": (total or 0.0) / count}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                common.log(f"server on port {self.port} ignored SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def drive(server: Server, target: str, clients: int, args: argparse.Namespace, workdir: Path,
          requests_file: Path) -> dict[str, Any]:
    cfg = {"port": server.port, "target": target, "clients": clients, "duration": args.duration,
           "warmup": args.warmup, "requests_file": str(requests_file), "server_pid": server.proc.pid}
    cfg_path = workdir / f"drive-{server.port}-{target}-{clients}.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_drive", str(cfg_path)],
                          capture_output=True, text=True, timeout=args.warmup + args.duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def run_server_phases(bundle: Path, batching: bool, args: argparse.Namespace, workdir: Path,
                      requests: dict[str, list[bytes]]) -> dict[str, Any]:
    """One server; /healthz at 32 clients, then /predict at each client count."""
    server = Server(bundle, batching, args.max_batch_size, args.max_delay_ms, workdir, args.server_env)
    label = "on" if batching else "off"
    try:
        ready = server.wait_ready()
        common.log(f"server (batching {label}) ready on port {server.port} after {ready:.1f}s")
        requests_file = workdir / f"requests-{server.port}.json"
        common.write_requests(requests_file,  # the Host header names this server's port
                              {k: [r.replace(_HOST_PLACEHOLDER, f"Host: {HOST}:{server.port}".encode()) for r in v]
                               for k, v in requests.items()})
        # sanity: one request answers 200 with one accepted-or-not result
        status, body = server.post(f"/predict?pipeline={PIPELINE}", args.sample_png, "image/png")
        if status != 200:
            raise RuntimeError(f"sanity /predict answered {status}: {body[:500]!r}")
        sample = json.loads(body)
        if len(sample.get("results", [])) != 1:
            raise RuntimeError(f"sanity /predict: unexpected body {body[:500]!r}")
        out: dict[str, Any] = {"port": server.port, "ready_s": ready, "sample_result": sample["results"][0]}
        # Batching on: the ceiling (a) and /predict at 32 clients are measured `repeats` times,
        # interleaved, and the best window of each is used, as the ceilings always were (the
        # best of several windows for (a) and (b)): on this shared VM the same code varies by
        # +-30% from one window to the next, and a single /predict window against the best of
        # the ceilings' windows mostly measured the noise. Every window is reported.
        reps = args.repeats if batching else 1
        healthz_each: list[dict[str, Any]] = []
        each: dict[int, list[dict[str, Any]]] = {c: [] for c in args.clients}
        before = server.batch_sizes() or {"batches": 0.0, "images": 0.0}
        for rep in range(reps):
            common.log(f"[batching {label}] GET /healthz, {args.ceiling_clients} clients"
                       + (f" (window {rep + 1}/{reps})" if reps > 1 else ""))
            healthz_each.append(drive(server, "healthz", args.ceiling_clients, args, workdir, requests_file))
            for c in args.clients:
                if rep and c != 32:
                    continue
                common.log(f"[batching {label}] POST /predict, {c} client(s)"
                           + (f" (window {rep + 1}/{reps})" if reps > 1 and c == 32 else ""))
                r = drive(server, "predict", c, args, workdir, requests_file)
                after = server.batch_sizes() or {"batches": 0.0, "images": 0.0}
                nb = after["batches"] - before["batches"]
                r["mean_batch"] = (after["images"] - before["images"]) / nb if nb else None
                before = after
                each[c].append(r)
        out["healthz"] = max(healthz_each, key=lambda r: r["rps"])
        out["healthz_windows"] = healthz_each
        for c in args.clients:
            out[f"predict_c{c}"] = max(each[c], key=lambda r: r["rps"])
            out[f"predict_c{c}_windows"] = each[c]
        return out
    finally:
        server.stop()


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle directory (default: models/default, else a quick one built "
                                    "into a temporary directory)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per HTTP phase (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window (default 1)")
    p.add_argument("--clients", default="1,32", help="client counts for /predict (default 1,32)")
    p.add_argument("--ceiling-clients", type=int, default=32, help="clients for the /healthz ceiling")
    p.add_argument("--max-batch-size", type=int, default=64, help="batcher's max_batch_size (default 64)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="batcher's max_delay_ms (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="windows of /healthz and of /predict at 32 clients on the batching-on server; the best "
                        "of each is used (default 3)")
    p.add_argument("--model-seconds", type=float, default=None,
                   help="seconds per in-process model measurement (default: min(duration, 3))")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for both servers, e.g. SHIELDSERVE_TORCH_THREADS=2 (repeatable)")
    p.add_argument("--out", help=f"JSON output (default bench/results/{NAME}.json)")
    args = p.parse_args(argv)
    try:
        args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    except ValueError:
        p.error("--server-env takes NAME=VALUE")
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if 32 not in args.clients:
        p.error("--clients must include 32 (the goals are stated at 32 clients)")
    if args.model_seconds is None:
        args.model_seconds = min(args.duration, 3.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = common.now_iso()
    load_start = _loadavg()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shieldserve-bench-") as tmp:
        workdir = Path(tmp)
        bundle, bundle_source = resolve_bundle(args.bundle, workdir)
        common.log(f"bundle: {bundle} ({bundle_source})")
        requests, (x_test, _) = load_requests(64)
        pngs = [r.split(b"\r\n\r\n", 1)[1] for r in requests["predict"]]
        args.sample_png = pngs[0]

        common.log("ceiling (b): in-process classifier throughput")
        model = measure_model(bundle, x_test, pngs, args.model_seconds, args.max_batch_size)

        servers: dict[str, Any] = {}
        for batching in (False, True):
            label = "on" if batching else "off"
            try:
                servers[label] = run_server_phases(bundle, batching, args, workdir, requests)
            except Exception as exc:  # report what ran, say what did not
                common.log(f"batching {label}: FAILED: {exc}")
                failed.append(f"batching {label}: {exc}")
        common.log("ceiling (b) again, after the servers")
        model_after = measure_classifier(bundle, x_test, args.model_seconds, args.max_batch_size)

    # ---------------------------------------------------------------- the numbers
    rows: list[dict[str, Any]] = []
    for label in ("off", "on"):
        s = servers.get(label)
        if not s:
            continue
        h = s["healthz"]
        rows.append({"phase": "ceiling (a): GET /healthz", "clients": h["clients"], "batching": label,
                     "req_s": h["rps"], "p50_ms": h["latency"]["p50_ms"], "p99_ms": h["latency"]["p99_ms"],
                     "errors": h["errors"], "mean_batch": None,
                     "server_cpu_ms_req": _cpu_ms_per_req(h)})
        for c in args.clients:
            r = s[f"predict_c{c}"]
            rows.append({"phase": f"POST /predict ({PIPELINE})", "clients": c, "batching": label,
                         "req_s": r["rps"], "p50_ms": r["latency"]["p50_ms"], "p99_ms": r["latency"]["p99_ms"],
                         "errors": r["errors"], "mean_batch": r.get("mean_batch"),
                         "server_cpu_ms_req": _cpu_ms_per_req(r)})
    mb = args.max_batch_size
    # ceiling (b): the classifier's best batched throughput (batch max_batch_size or 32),
    # measured before and after the servers; the best of these is used (the stricter goal)
    sizes = sorted({mb, 32}, reverse=True)
    # of the eager network and of the optimised copy the server decides with
    kinds = [k for k in ("classifier", "optimized") if f"{k}_b{mb}" in model and f"{k}_b{mb}" in model_after]
    label = {"classifier": "classifier (eager)", "optimized": "classifier (TorchScript-optimised, served)"}
    candidates = {(kind, when, n): m[f"{kind}_b{n}"]["items_per_s"]
                  for kind in kinds for when, m in (("before", model), ("after", model_after)) for n in sizes}
    (b_kind, b_when, b_batch), b = max(candidates.items(), key=lambda kv: kv[1])
    for kind in kinds:
        for when, m in (("before", model), ("after", model_after)):
            for n in sorted({mb, 32, 1}, reverse=True):
                tag = "ceiling (b): " if (kind, when, n) == (b_kind, b_when, b_batch) else ""
                rows.append(_model_row(f"in-process {tag}{label[kind]}, batch {n} ({when})", m[f"{kind}_b{n}"]))
    for kind in kinds:
        for when, m in (("before", model), ("after", model_after)):
            if f"{kind}_b{mb}_1thread" in m:
                rows.append(_model_row(f"in-process {label[kind]}, batch {mb}, 1 torch thread ({when})",
                                       m[f"{kind}_b{mb}_1thread"]))
    rows.append(_model_row(f"in-process Pipeline.run({PIPELINE}), batch {mb}", model[f"pipeline_b{mb}"]))
    rows.append(_model_row("in-process decode_batch, 1 PNG", model["decode_png"]))

    summary: dict[str, Any] = {"b_classifier_images_s": b,
                               "b_measured": {"model": b_kind, "when": b_when, "batch": b_batch},
                               "b_candidates": {f"{k}_{w}_b{n}": v for (k, w, n), v in candidates.items()}}
    if "on" in servers and "off" in servers:
        a_on, a_off = servers["on"]["healthz"]["rps"], servers["off"]["healthz"]["rps"]  # best windows
        a = max(a_on, a_off)
        serial = 1.0 / (1.0 / a + 1.0 / b)
        on32, off32 = servers["on"]["predict_c32"]["rps"], servers["off"]["predict_c32"]["rps"]
        on32_windows = sorted(w["rps"] for w in servers["on"]["predict_c32_windows"])
        on32_median = on32_windows[len(on32_windows) // 2]
        summary.update({
            "on32_rps_windows": on32_windows, "on32_rps_median": on32_median,
            "ratio_median_on32_over_serial_limit": on32_median / serial,
            "healthz_rps_windows": {k: [w["rps"] for w in servers[k]["healthz_windows"]] for k in ("off", "on")},
            "a_healthz_rps": a, "a_healthz_rps_each": {"off": a_off, "on": a_on},
            "serial_limit_rps": serial,
            "on32_rps": on32, "off32_rps": off32,
            "ratio_on32_over_serial_limit": on32 / serial,
            "ratio_on32_over_off32": on32 / off32 if off32 else None,
            "goal_serial": {"target": GOAL_OF_SERIAL_LIMIT, "met": on32 / serial >= GOAL_OF_SERIAL_LIMIT},
            "goal_on_over_off": {"target": GOAL_ON_OVER_OFF,
                                 "met": bool(off32) and on32 / off32 >= GOAL_ON_OVER_OFF},
        })
        # The same comparison in CPU time, which depends less on what else the machine runs:
        # CPU ms per request of /healthz and of /predict (server process, all threads), and
        # CPU ms per image of the classifier (this process, best candidate). Not a goal.
        cpu_as = [x for x in (_cpu_ms_per_req(servers[k]["healthz"]) for k in ("off", "on")) if x is not None]
        cpu_a = min(cpu_as) if cpu_as else None
        cpu_b = min(m[f"{k}_b{n}"]["cpu_ms_per_item"] for k in kinds for m in (model, model_after) for n in sizes)
        cpu_on32 = _cpu_ms_per_req(servers["on"]["predict_c32"])
        if cpu_a and cpu_on32 and cpu_a > 0.001 and cpu_on32 > 0.001:  # 0: CPU not visible (worker processes)
            summary["cpu"] = {"healthz_ms_per_req": cpu_a, "classifier_ms_per_image": cpu_b,
                              "serial_ms_per_req": cpu_a + cpu_b, "on32_ms_per_req": cpu_on32,
                              "efficiency_on32": (cpu_a + cpu_b) / cpu_on32}

    print()
    common.print_table(rows, ["phase", "clients", "batching", "req_s", "p50_ms", "p99_ms", "errors",
                              "mean_batch", "server_cpu_ms_req"],
                       headers={"req_s": "req/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
                                "mean_batch": "batch", "server_cpu_ms_req": "cpu ms/req"},
                       title=f"shieldserve serving benchmark ({args.duration:g} s windows, bundle: {bundle_source})\n"
                             f"HTTP rows: cpu ms/req = server process CPU per answered request; in-process rows: "
                             f"req/s = images/s, p50 ms = ms per call, cpu ms/req = CPU ms per image")
    print()
    if "serial_limit_rps" in summary:
        s = summary
        print(f"ceiling (a) GET /healthz @{args.ceiling_clients}: {s['a_healthz_rps']:,.0f} req/s "
              f"(off server {s['a_healthz_rps_each']['off']:,.0f}, on server {s['a_healthz_rps_each']['on']:,.0f}; "
              f"the larger is used)")
        print(f"ceiling (b) classifier in-process:  {b:,.0f} images/s (best of {' and '.join(kinds)} networks, "
              f"batch {'/'.join(map(str, sizes))}, before/after the servers: {b_kind}, batch {b_batch}, {b_when})")
        print(f"serial limit L = 1/(1/a + 1/b):     {s['serial_limit_rps']:,.0f} req/s")
        r1, r2 = s["ratio_on32_over_serial_limit"], s["ratio_on32_over_off32"]
        print(f"batching on @32 / L   = {r1:.2f}  (goal >= {GOAL_OF_SERIAL_LIMIT:.2f})  "
              f"{'PASS' if s['goal_serial']['met'] else 'MISS'}  (best of {len(s['on32_rps_windows'])} windows: "
              f"{', '.join(f'{v:,.0f}' for v in s['on32_rps_windows'])} req/s; the median window gives "
              f"{s['ratio_median_on32_over_serial_limit']:.2f})")
        print(f"batching on / off @32 = {r2:.2f}  (goal >= {GOAL_ON_OVER_OFF:.2f})  "
              f"{'PASS' if s['goal_on_over_off']['met'] else 'MISS'}"
              if r2 is not None else "batching on / off @32: off answered nothing")
        if "cpu" in s:
            c = s["cpu"]
            print(f"in CPU time: healthz {c['healthz_ms_per_req']:.2f} + classifier {c['classifier_ms_per_image']:.2f} "
                  f"= {c['serial_ms_per_req']:.2f} ms/req serial; /predict on @32 costs {c['on32_ms_per_req']:.2f} ms/req "
                  f"(efficiency {c['efficiency_on32']:.2f}; informational)")
    load0, load1 = load_start, _loadavg()
    summary["load_avg_1min"] = {"start": load0, "end": load1}
    if max(load0 or 0, load1 or 0) > (os.cpu_count() or 1):
        print(f"note: the machine was busy (1-min load average {load0} at the start, {load1} at the end, "
              f"{os.cpu_count()} CPUs): absolute numbers are unreliable; compare ratios across runs")
    for f in failed:
        print(f"FAILED: {f}")

    path = common.write_results(NAME, {
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients,
                     "repeats": args.repeats,
                     "ceiling_clients": args.ceiling_clients, "max_batch_size": args.max_batch_size,
                     "max_delay_ms": args.max_delay_ms, "model_seconds": args.model_seconds,
                     "pipeline": PIPELINE, "host": HOST},
        "bundle": {"path": str(bundle), "source": bundle_source},
        "model": model, "model_after": model_after, "servers": servers, "rows": rows, "summary": summary, "failed": failed,
    }, out=args.out, started=started)
    print(f"\nwrote {path}")
    return 1 if failed else 0


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _model_row(phase: str, m: dict[str, Any]) -> dict[str, Any]:
    return {"phase": phase, "clients": None, "batching": None, "req_s": m["items_per_s"],
            "p50_ms": m["ms_per_call"], "p99_ms": None, "errors": None, "mean_batch": None,
            "server_cpu_ms_req": m.get("cpu_ms_per_item")}


def _cpu_ms_per_req(r: dict[str, Any]) -> float | None:
    if r.get("server_cpu_s") is None or not r.get("completed"):
        return None
    return 1000.0 * r["server_cpu_s"] / r["completed"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_drive":
        raise SystemExit(_drive_main(sys.argv[2]))
    raise SystemExit(main())
