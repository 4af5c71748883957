"""A certify store whose Redis hangs (`kill -STOP`): /predict throughput and latency on a
pipeline that never needs the store, before, during and after, for this code and (`--old
TREE`) another checkout run the same way, one after the other.

Each tree gets its own `redis-server` (Debian package) and one `shieldserve serve` process with
`certify.store: redis`; closed-loop clients post real test digits to `/predict?pipeline=...`
in three windows: Redis up, Redis stopped (SIGSTOP: it accepts connections and never answers),
Redis resumed (SIGCONT). The server log's `redis store` warnings are counted too.

    .venv/bin/python bench/store_outage.py --old /tmp/old --clients 8 --seconds 6

Writes bench/results/store_outage.json.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, ServerProcess, digit_pngs, ensure_repo_on_path, now_iso, percentile, print_table, write_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _window(port: int, pipeline: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`: requests/s, status counts, p50/max latency."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = k
        while time.monotonic() < end:
            body = bodies[i % len(bodies)]
            i += clients
            started = time.perf_counter()
            conn.request("POST", f"/predict?pipeline={pipeline}", body=body, headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests_per_s": len(latencies) / seconds, "statuses": statuses,
            "p50_ms": percentile(latencies, 50) * 1000, "max_ms": max(latencies) * 1000}


def run_tree(name: str, tree: Path, args: argparse.Namespace, bodies: list[bytes], workdir: Path) -> list[dict]:
    redis_port, port = _free_port(), _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = workdir / f"{name}.yaml"
    config.write_text(f"bundle: {Path(args.bundle).resolve()}\nlog_level: warning\n"
                      f"certify:\n  store: redis\n  redis_url: redis://127.0.0.1:{redis_port}/0\n")
    server = ServerProcess(name, [sys.executable, "-m", "service", "serve", "--config", str(config),
                                  "--host", "127.0.0.1", "--port", str(port)],
                           env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, port=port, ready="/readyz",
                           logdir=workdir)
    rows = []
    try:
        server.wait_ready()
        _window(port, args.pipeline, bodies, args.clients, 1.0)  # warm-up
        for phase, sig in (("Redis up", None), ("Redis stopped (SIGSTOP)", signal.SIGSTOP),
                           ("Redis resumed (SIGCONT)", signal.SIGCONT)):
            if sig is not None:
                redis.send_signal(sig)
            rows.append({"code": name, "phase": phase, **_window(port, args.pipeline, bodies, args.clients,
                                                                  args.seconds)})
    finally:
        redis.send_signal(signal.SIGCONT)
        server.stop()
        redis.terminate()
        redis.wait(timeout=10)
    warnings = sum("redis store" in line for line in server.log_path.read_text(errors="replace").splitlines())
    for row in rows:
        row["store_warnings_in_log"] = warnings
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="another checkout (e.g. `git archive` of an older commit) run the same way")
    parser.add_argument("--bundle", default=str(REPO_ROOT / "models" / "default"))
    parser.add_argument("--pipeline", default="baseline")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (Debian package redis-server)")
    ensure_repo_on_path()
    started = now_iso()
    bodies = digit_pngs(200)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="store_outage-") as tmp:
        if args.old:
            rows += run_tree("old", Path(args.old).resolve(), args, bodies, Path(tmp))
        rows += run_tree("new", REPO_ROOT, args, bodies, Path(tmp))
    print_table(rows, ["code", "phase", "requests_per_s", "p50_ms", "max_ms", "statuses", "store_warnings_in_log"])
    print(write_results("store_outage", {"args": vars(args), "rows": rows}, started=started))


if __name__ == "__main__":
    main()
