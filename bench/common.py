"""Helpers shared by every benchmark in `bench/`: percentiles, a plain-text table, machine
info, and writing results to `bench/results/<name>.json` (git-ignored).

Benchmarks are scripts, not tests: run them from the repository root with the project's
interpreter, e.g. `.venv/bin/python bench/serving.py`. This module imports nothing heavy at
import time (torch is imported only by `machine_info`), so a load-generating subprocess can
import it cheaply.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

__all__ = [
    "BENCH_DIR", "REPO_ROOT", "RESULTS_DIR", "Timer", "format_table", "log", "machine_info",
    "asgi_request", "digit_pngs", "now_iso", "percentile", "print_table", "summarize_latencies", "write_results",
]


def ensure_repo_on_path() -> None:
    """Make `import service` / `import models` work when a script is run as `python bench/x.py`."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def forward_flops(net: Any, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of `net` on a single input of `input_shape`, by torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def linear_ceiling_gflops(size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of one large float32 `nn.Linear` forward (size x size weights, a batch of `size`
    rows) on torch's current threads, best of `repeats`: the dense-arithmetic ceiling of this
    machine as issue 20 measures it (oneDNN's linear layer; 527 GFLOP/s on the 2-core Zen 5 it
    was filed on). A network's forwards/s can be read as a share of it."""
    import torch

    layer = torch.nn.Linear(size, size)
    x = torch.randn(size, size)
    best = float("inf")
    with torch.inference_mode():
        layer(x)
        for _ in range(repeats):
            started = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log(message: str) -> None:
    """Progress goes to stderr, so stdout keeps only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


# ---------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float] | Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between closest ranks
    (numpy's default method). NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def summarize_latencies(seconds: Sequence[float]) -> dict[str, float | int]:
    """Count, mean, p50, p90, p99 and max of latencies given in seconds, reported in ms."""
    xs = sorted(seconds)
    if not xs:
        return {"count": 0, "mean_ms": math.nan, "p50_ms": math.nan, "p90_ms": math.nan,
                "p99_ms": math.nan, "max_ms": math.nan}
    return {"count": len(xs), "mean_ms": 1000.0 * sum(xs) / len(xs),
            "p50_ms": 1000.0 * percentile(xs, 50), "p90_ms": 1000.0 * percentile(xs, 90),
            "p99_ms": 1000.0 * percentile(xs, 99), "max_ms": 1000.0 * xs[-1]}


# ---------------------------------------------------------------------------- tables
def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 headers: Mapping[str, str] | None = None, digits: int = 1) -> str:
    """Rows (dicts) as an aligned plain-text table. Text columns are left-aligned, numbers
    right-aligned; floats get `digits` decimals, booleans read on/off, None and NaN read "-"."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    headers = dict(headers or {})
    texts = [[_cell(r.get(c), digits) for c in columns] for r in rows]
    names = [headers.get(c, c) for c in columns]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                   for r in rows if r.get(c) is not None) for c in columns]
    widths = [max(len(n), *(len(t[i]) for t in texts)) for i, n in enumerate(names)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(t) for t in texts]
    return "\n".join(out)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                headers: Mapping[str, str] | None = None, digits: int = 1, title: str | None = None) -> None:
    if title:
        print(title)
    print(format_table(rows, columns, headers, digits), flush=True)


# ---------------------------------------------------------------------------- results
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def cpu_model() -> str | None:
    """The CPU's model name with its family and model numbers (from /proc/cpuinfo: two EPYCs
    of different generations share a name), or None where there is no such file."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first core's block
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name")
    return name and f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: versions, cores, threads, device, load at the time."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "device": device,
        "git_commit": _git_commit(),
    }
    try:
        info["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_avg"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
        if device.startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        info["torch"] = None
    return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / Infinity
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(name: str, payload: Mapping[str, Any], *, out: str | Path | None = None,
                  started: str | None = None, device: str = "cpu") -> Path:
    """Write `payload` plus machine info and timestamps as JSON to `out`, by default
    `bench/results/<name>.json`. Returns the path written."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "started": started, "finished": now_iso(),
           "argv": sys.argv, "machine": machine_info(device), **payload}
    path.write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    return path


class ServerProcess:
    """A server the bench starts as a subprocess (its output in `logdir/NAME.log`), polled on
    `ready` until it answers 200, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, port: int, ready: str,
                 logdir: Path, host: str = "127.0.0.1") -> None:
        self.name, self.port, self.ready_path, self.host = name, port, ready, host
        self.log_path = logdir / f"{name.replace('/', '-')}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import http.client

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def drive_load(server: ServerProcess, target: str, clients: int, warmup: float, duration: float,
               workdir: Path, requests_file: Path) -> dict[str, Any]:
    """One window of closed-loop load on `server` by bench/serving.py's load driver (a separate
    process, so the driver's Python does not share the server's CPU time accounting)."""
    cfg = {"port": server.port, "target": target, "clients": clients, "duration": duration, "warmup": warmup,
           "requests_file": str(requests_file), "server_pid": server.proc.pid}
    path = workdir / f"drive-{server.name}-{target.replace('/', '-')}-{clients}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().with_name("serving.py")), "_drive", str(path)],
                          capture_output=True, text=True, timeout=warmup + duration + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load driver failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def write_requests(path: Path, requests: Mapping[str, Sequence[bytes]]) -> None:
    """The raw HTTP requests for the load driver, per target, as JSON with base64 bodies (the
    project never unpickles a file, a bench's own temp files included)."""
    import base64

    path.write_text(json.dumps({target: [base64.b64encode(r).decode("ascii") for r in reqs]
                                for target, reqs in requests.items()}))


def read_requests(path: Path, target: str) -> list[bytes]:
    import base64

    return [base64.b64decode(r) for r in json.loads(Path(path).read_text())[target]]


# ---------------------------------------------------------------------------- request bodies
def digit_pngs(n: int | None = None) -> list[bytes]:
    """The first n digits of mnist5k's test split (all of them with None), each as the PNG a
    client would upload (the code of whichever checkout the script put on the path)."""
    from models.datasets import load_dataset
    from service.imaging import encode_png

    return [encode_png(img) for img in load_dataset("mnist5k").test.x[:n]]


# ---------------------------------------------------------------------------- in-process ASGI
async def asgi_request(app: Any, method: str, path: str, body: bytes = b"", query: bytes = b"",
                       content_type: str = "image/png", on_first: Any = None) -> list[dict]:
    """One request through an ASGI app in-process (no sockets, no HTTP parser, no client): the
    messages it sent back. `on_first()` runs when the first one arrives (a timeline's stamp)."""
    sent: list[dict] = []
    done = False

    async def receive() -> dict:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client stays: nothing disconnects mid-request
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if not sent and on_first is not None:
            on_first()
        sent.append(message)

    headers = [(b"host", b"x")]
    if method == "POST":
        headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    await app(scope, receive, send)
    return sent
