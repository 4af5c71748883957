"""A greedy client beside a polite one, with and without a per-client share
(`admission.max_client_cost`).

    .venv/bin/python bench/client_share.py [--share 20000] [--greedy 8] [--greedy-images 64]
        [--duration 10] [--repeats 2] [--bundle models/default] [--out FILE]

One server (`python -m service serve` on 127.0.0.1, this checkout, default settings but
`trusted_proxies: [127.0.0.1]` so each client names itself with `X-Forwarded-For`) is
started per setting: the share unset (the default), then `--share` units. In each, for
`--duration` seconds:

- the greedy client keeps `--greedy` connections busy, each POSTing `--greedy-images` real
  test digits in one multipart `/predict` on `default` (a 64-image request weighs 35,968
  units) and sending the next as soon as an answer comes back, whatever it was (it ignores
  `Retry-After`, as an abusive client would);
- the polite client sends one digit at a time to `/predict` on `default` on one connection.

Reported per setting: the polite client's answers (200 / 429 / 503) and latency (p50, p90,
max), the greedy client's answered images/s and refusals. What the share is for: with it
unset, the polite digit waits behind every greedy image queued before it (the batcher runs
them first come, first served); with it, the greedy client has at most one such request in
flight (35,968 > 20,000: admitted only when it has nothing else in flight) and the rest of its
requests are refused at once with 429. `--repeats` alternates the two settings that many
times (servers restarted each time). The load driver runs in its own process (httpx, asyncio).

Prints a table and writes JSON to `bench/results/client_share.json` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
GREEDY, POLITE = "198.51.100.7", "203.0.113.9"  # the addresses each client claims (documentation ranges)


# ---------------------------------------------------------------------------- the load driver
async def _drive(cfg: dict[str, Any]) -> dict[str, Any]:
    import httpx

    url = f"http://{HOST}:{cfg['port']}/predict?pipeline=default"
    digits = [bytes.fromhex(h) for h in cfg["digits"]]
    end = time.monotonic() + cfg["duration"]
    greedy: Counter = Counter()
    polite: Counter = Counter()
    latencies: list[float] = []
    greedy_images = [0]

    async def greedy_loop(c: httpx.AsyncClient, i: int) -> None:
        files = [("file", (f"{k}.png", digits[(i + k) % len(digits)], "image/png"))
                 for k in range(cfg["greedy_images"])]
        while time.monotonic() < end:
            try:
                r = await c.post(url, files=files, headers={"X-Forwarded-For": GREEDY})
            except httpx.HTTPError as exc:
                greedy[type(exc).__name__] += 1
                continue
            greedy[r.status_code] += 1
            if r.status_code == 200:
                greedy_images[0] += len(r.json()["results"])

    async def polite_loop(c: httpx.AsyncClient) -> None:
        k = 0
        await asyncio.sleep(0.5)  # the greedy client's requests first
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                r = await c.post(url, content=digits[k % len(digits)],
                                 headers={"content-type": "image/png", "X-Forwarded-For": POLITE})
            except httpx.HTTPError as exc:
                polite[type(exc).__name__] += 1
                continue
            polite[r.status_code] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:  # a polite client waits as it is told
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            k += 1

    limits = httpx.Limits(max_connections=cfg["greedy"] + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as greedy_client, \
            httpx.AsyncClient(timeout=120) as polite_client:
        started = time.monotonic()
        await asyncio.gather(*(greedy_loop(greedy_client, i) for i in range(cfg["greedy"])),
                             polite_loop(polite_client))
        seconds = time.monotonic() - started
    return {"seconds": seconds, "greedy": {str(k): v for k, v in greedy.items()},
            "greedy_images": greedy_images[0], "polite": {str(k): v for k, v in polite.items()},
            "polite_latencies": latencies}


def drive(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    path = workdir / f"drive-{cfg['port']}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, __file__, "_drive", str(path)], capture_output=True, text=True,
                          timeout=cfg["duration"] + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"load driver failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------- the servers
def server(share: float | None, bundle: Path, logdir: Path) -> common.ServerProcess:
    from serving import _free_port

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIELDSERVE_")}
    env.update({"SHIELDSERVE_BUNDLE": str(bundle), "SHIELDSERVE_LOG_LEVEL": "warning",
                "SHIELDSERVE_TRUSTED_PROXIES": json.dumps([HOST]), "PYTHONUNBUFFERED": "1"})
    if share is not None:
        env["SHIELDSERVE_ADMISSION__MAX_CLIENT_COST"] = str(share)
    repo = Path(__file__).resolve().parents[1]
    name = f"share-{'off' if share is None else int(share)}"
    return common.ServerProcess(name, [sys.executable, "-m", "service", "serve", "--host", HOST, "--port", str(port)],
                                env, repo, port, "/readyz", logdir)


def window(share: float | None, args: argparse.Namespace, digits: list[bytes], workdir: Path) -> dict[str, Any]:
    srv = server(share, Path(args.bundle), workdir)
    try:
        srv.wait_ready()
        load = os.getloadavg()[0]
        out = drive({"port": srv.port, "duration": args.duration, "greedy": args.greedy,
                     "greedy_images": args.greedy_images, "digits": [d.hex() for d in digits]}, workdir)
    finally:
        srv.stop()
    lat = out.pop("polite_latencies")
    summary = common.summarize_latencies(lat) if lat else {}
    return {"share": share, "load_avg": load, **out,
            "polite_p50_ms": summary.get("p50_ms"), "polite_p90_ms": summary.get("p90_ms"),
            "polite_max_ms": summary.get("max_ms"),
            "greedy_images_per_s": out["greedy_images"] / out["seconds"]}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "_drive":
        print(json.dumps(asyncio.run(_drive(json.loads(Path(sys.argv[2]).read_text())))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(Path(__file__).resolve().parents[1] / "models" / "default"))
    ap.add_argument("--share", type=float, default=20_000, help="admission.max_client_cost of the second setting")
    ap.add_argument("--greedy", type=int, default=8, help="the greedy client's connections")
    ap.add_argument("--greedy-images", type=int, default=64, help="digits per greedy request")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = common.now_iso()
    digits = common.digit_pngs(64)
    rows = []
    with tempfile.TemporaryDirectory(prefix="client-share-") as tmp:
        for rep in range(args.repeats):
            order = (None, args.share) if rep % 2 == 0 else (args.share, None)
            for share in order:
                common.log(f"repeat {rep + 1}/{args.repeats}: share {share}")
                row = window(share, args, digits, Path(tmp))
                rows.append(row)
                common.log(json.dumps({k: v for k, v in row.items() if k != "polite_latencies"}))
    table = [{"share": "unset" if r["share"] is None else f"{r['share']:,.0f}",
              "load": r["load_avg"],
              "polite 200": r["polite"].get("200", 0),
              "polite refused": sum(v for k, v in r["polite"].items() if k != "200"),
              "polite p50 ms": r["polite_p50_ms"], "polite p90 ms": r["polite_p90_ms"],
              "polite max ms": r["polite_max_ms"],
              "greedy images/s": r["greedy_images_per_s"],
              "greedy 429": r["greedy"].get("429", 0), "greedy 503": r["greedy"].get("503", 0)}
             for r in rows]
    common.print_table(table)
    path = common.write_results("client_share", {"args": vars(args), "windows": rows}, out=args.out,
                                started=started)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
