"""What the query monitor costs: added latency over HTTP, the monitor's own time, and memory.

    flock /work/bench.lock python bench/query_monitor.py [--rounds 3] [--seconds 4] [--pipelines magnet,default]

latency  One server (niced) with `magnet` and `default` twice each: monitored (the default) and
         with `query_monitor: false`. For 1 and 8 closed-loop clients (one keep-alive
         connection each, raw PNG bodies of the 1,000 mnist5k test digits in turn, every
         client its own X-Forwarded-For through the trusted 127.0.0.1), rounds alternate
         on/off/on/off... `--rounds` times each, `--seconds` per round; p50/p99 of all rounds
         of one side. Added = on - off.
screen   QueryMonitor.screen in process on one digit at a time (memory store): p50/p99; the
         mean per digit of screen_parts on batches of 8 one-digit requests (the service
         screens each batch at once on the compute thread); and p50/p99 for a suspect (a
         client flagged once) sending distinct digits, whose pixel check (suspect_linf)
         compares each with its last 128.
memory   Bytes per remembered query: the memory store (tracemalloc) and Redis (INFO
         used_memory, a redis-server started here when one is installed) after 100,000
         distinct queries, times 1,000,000.

Prints a table and writes bench/results/query_monitor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(workdir: Path) -> Path:
    import yaml

    from service.settings import PACKAGED_CONFIG

    packaged = yaml.safe_load(PACKAGED_CONFIG.read_text())["pipelines"]
    keep = {"magnet", "default"}
    pipelines: dict[str, Any] = {n: None for n in packaged if n not in keep}
    for n in keep:
        pipelines[f"{n}-off"] = {**packaged[n], "query_monitor": False}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines, "trusted_proxies": ["127.0.0.1"]}))
    return path


async def _round(url: str, pipeline: str, bodies: list[bytes], clients: int, seconds: float,
                 offset: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    until = time.monotonic() + seconds

    async def one(i: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
            k = offset + i * 997
            while time.monotonic() < until:
                body = bodies[k % len(bodies)]
                k += 1
                started = time.monotonic()
                r = await c.post(f"/predict?pipeline={pipeline}", content=body,
                                 headers={"content-type": "image/png", "X-Forwarded-For": f"192.0.2.{i + 1}"})
                if r.status_code == 200:
                    latencies.append(time.monotonic() - started)

    await asyncio.gather(*(one(i) for i in range(clients)))
    return latencies


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    bodies = common.digit_pngs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {**os.environ, "SHIELDSERVE_LOG_LEVEL": "warning", "PYTHONPATH": str(common.REPO_ROOT)}
        log = Path(tmp) / "server.log"
        proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "service", "serve", "--config",
                                 str(_config(Path(tmp))), "--port", str(port)], cwd=common.REPO_ROOT, env=env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(log.read_text()[-2000:])
                time.sleep(0.5)
            offset = 0
            for pipeline in args.pipelines.split(","):
                for clients in (1, 8):
                    asyncio.run(_round(url, pipeline, bodies, clients, 1.0, 0))  # warm-up
                    got: dict[str, list[float]] = {"on": [], "off": []}
                    for r in range(args.rounds):
                        for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
                            name = pipeline if side == "on" else f"{pipeline}-off"
                            offset += 4999
                            got[side] += asyncio.run(_round(url, name, bodies, clients, args.seconds, offset))
                    on, off = (common.summarize_latencies(got[s]) for s in ("on", "off"))
                    rows.append({"pipeline": pipeline, "clients": clients, "requests_on": on["count"],
                                 "requests_off": off["count"], "p50_on_ms": on["p50_ms"],
                                 "p50_off_ms": off["p50_ms"], "p50_added_ms": on["p50_ms"] - off["p50_ms"],
                                 "p99_on_ms": on["p99_ms"], "p99_off_ms": off["p99_ms"],
                                 "p99_added_ms": on["p99_ms"] - off["p99_ms"]})
                    common.log(str(rows[-1]))
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def screen_cost() -> dict[str, Any]:
    import torch

    from models.datasets import load_dataset
    from service.defenses.query_monitor import MonitorPolicy, QueryMonitor

    x = load_dataset("mnist5k").test.x
    m, policy, seconds = QueryMonitor(secret="bench"), MonitorPolicy(), []
    for i in range(len(x)):
        started = time.perf_counter()
        m.screen(policy, x[i:i + 1], f"ip:10.0.0.{i % 8}")
        seconds.append(time.perf_counter() - started)
    s = common.summarize_latencies(seconds[100:])
    # what the service runs: one screen_parts per batch (8 requests of one digit, 8 clients)
    m = QueryMonitor(secret="bench")
    parts = [(f"ip:10.0.0.{k}", 1) for k in range(8)]
    started = time.perf_counter()
    for i in range(0, len(x) - 7, 8):
        m.screen_parts(policy, x[i:i + 8], parts)
    per_digit = (time.perf_counter() - started) / (len(x) // 8 * 8)
    # a suspect (flagged once) sending distinct digits: the pixel check against its last
    # suspect_history (128) images runs on each of its requests
    m = QueryMonitor(secret="bench")
    near_copy = x[:1].clone()
    near_copy[..., 0, 0] = 0.5
    m.screen(policy, x[:1], "ip:10.0.0.1")
    assert m.screen(policy, near_copy, "ip:10.0.0.1").flagged == [True]
    suspect = []
    for i in range(1, len(x)):
        started = time.perf_counter()
        m.screen(policy, x[i:i + 1], "ip:10.0.0.1")
        suspect.append(time.perf_counter() - started)
    sus = common.summarize_latencies(suspect[200:])  # its history full
    del torch
    return {"images": len(seconds) - 100, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "batch8_ms_per_digit": per_digit * 1000,
            "suspect_p50_ms": sus["p50_ms"], "suspect_p99_ms": sus["p99_ms"]}


def _distinct_queries(n: int):
    """n distinct digit-like queries: test digits with a random 6x6 patch changed (so their
    fingerprints share hashes the way real traffic and attacks do, not all-new random ones)."""
    import torch

    from models.datasets import load_dataset

    x = load_dataset("mnist5k").test.x
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 1000):
        k = min(1000, n - start)
        b = x[torch.randint(0, len(x), (k,), generator=g)].clone()
        ij = torch.randint(0, 22, (k, 2), generator=g)
        for r in range(k):
            i, j = ij[r].tolist()
            b[r, :, i:i + 6, j:j + 6] = torch.rand(1, 6, 6, generator=g)
        yield b


def memory(n: int = 100_000) -> dict[str, Any]:
    import gc
    import tracemalloc

    from service.defenses.query_monitor import Fingerprinter, MemoryStore, RedisStore

    fp = Fingerprinter(b"b" * 32)
    out: dict[str, Any] = {"queries": n}
    gc.collect()
    tracemalloc.start()
    store = MemoryStore(3600, 10 * n)
    for b in _distinct_queries(n):
        store.match(*fp.fingerprint(b))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["memory_store_bytes_per_query"] = round(current / store.remembered(), 1)
    out["memory_store_mib_per_million"] = round(current / store.remembered() * 1e6 / 2**20, 1)
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
    if binary:
        import redis

        port = _free_port()
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
            try:
                client = redis.Redis(port=port)
                for _ in range(100):
                    try:
                        client.ping()
                        break
                    except redis.exceptions.ConnectionError:
                        time.sleep(0.1)
                before = client.info("memory")["used_memory"]
                rs = RedisStore(f"redis://127.0.0.1:{port}/0", "bench:", 3600, 10 * n)
                for b in _distinct_queries(n):
                    d, h = fp.fingerprint(b)
                    for i in range(0, len(d), 64):
                        rs.screen("client", d[i:i + 64], h[i:i + 64])
                used = client.info("memory")["used_memory"] - before
                out["redis_bytes_per_query"] = round(used / n, 1)
                out["redis_mib_per_million"] = round(used / n * 1e6 / 2**20, 1)
            finally:
                proc.terminate()
                proc.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--pipelines", default="magnet,default", help="the pipelines of the latency part")
    p.add_argument("--skip", default="", help="comma-separated: latency,screen,memory")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))
    load_before = os.getloadavg()
    result: dict[str, Any] = {"rounds": args.rounds, "seconds_per_round": args.seconds}
    if "screen" not in skip:
        result["screen"] = screen_cost()
        common.print_table([result["screen"]], title="QueryMonitor.screen, one digit, memory store")
    if "memory" not in skip:
        result["memory"] = memory()
        common.print_table([result["memory"]], title="memory per remembered query")
    if "latency" not in skip:
        result["latency"] = latency(args)
        common.print_table(result["latency"], title="added latency over HTTP, monitor on vs off (alternating)")
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    print("load average before / after:", result["load_average_before_after"])
    common.write_results("query_monitor", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
