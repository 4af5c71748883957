"""The garbage collector's full passes under load, with the start-up objects frozen (as served:
`gc.freeze()` in the app's lifespan) and without.

    .venv/bin/python bench/gc_pauses.py [--pipeline baseline] [--concurrency 32] [--seconds 60]
        [--rounds 2] [--bundle models/default] [--out FILE]

Drives the ASGI app in-process (no sockets, as bench/request_overhead.py), `--concurrency`
requests in flight, each a real test digit as a PNG to /predict, for `--seconds` per window,
and times every generation-2 collection with `gc.callbacks`: a full pass holds the GIL, so
for its duration no thread of the process (event loop, batcher, torch) runs Python. Windows
alternate frozen / unfrozen (`gc.unfreeze()`, then `gc.collect(); gc.freeze()` to freeze
again) `--rounds` times in one process. Prints a table and writes bench/results/gc_pauses.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="baseline")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--out")
    args = p.parse_args(argv)

    from service.app import create_app
    from service.settings import load_settings

    logging.disable(logging.INFO)
    started = common.now_iso()
    bodies = common.digit_pngs(64)
    app = create_app(load_settings(bundle=args.bundle, log_level="warning"))
    pauses: list[list[float]] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                pauses.append([time.perf_counter()])
            elif pauses:
                pauses[-1].append(time.perf_counter())

    async def call(body: bytes) -> None:
        sent = await common.asgi_request(app, "POST", "/predict", body, b"pipeline=" + args.pipeline.encode())
        assert sent and sent[0]["status"] == 200, sent[:1]

    async def window(frozen: bool) -> dict:
        if frozen:
            gc.collect()
            gc.freeze()
        else:
            gc.unfreeze()
        pauses.clear()
        done = [0]
        t0 = time.perf_counter()
        end = t0 + args.seconds

        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < end:
                await call(bodies[k % len(bodies)])
                k += args.concurrency
                done[0] += 1

        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        seconds = time.perf_counter() - t0
        ms = [1000 * (b - a) for a, b in (x for x in pauses if len(x) == 2)]
        return {"objects": "frozen" if frozen else "unfrozen", "pipeline": args.pipeline,
                "concurrency": args.concurrency, "seconds": seconds, "req_s": done[0] / seconds,
                "full_passes": len(ms), "pass_ms_max": max(ms, default=0.0),
                "pass_ms_mean": sum(ms) / len(ms) if ms else 0.0, "paused_share": sum(ms) / 1000 / seconds,
                "frozen_objects": gc.get_freeze_count()}

    rows: list[dict] = []

    async def run() -> None:
        async with app.router.lifespan_context(app):  # the lifespan freezes, as when served
            gc.callbacks.append(on_gc)
            for _ in range(args.rounds):
                for frozen in (True, False):
                    rows.append(await window(frozen))
                    common.log(f"{rows[-1]['objects']:8}: {rows[-1]['full_passes']} full passes, "
                               f"max {rows[-1]['pass_ms_max']:.1f} ms, {rows[-1]['req_s']:.0f} req/s")
            gc.callbacks.remove(on_gc)

    asyncio.run(run())
    common.print_table(rows, ["objects", "pipeline", "concurrency", "seconds", "req_s", "full_passes",
                              "pass_ms_mean", "pass_ms_max", "paused_share", "frozen_objects"],
                       digits=3, title="generation-2 garbage collections under load, in-process")
    common.write_results("gc_pauses", {"rows": rows}, out=args.out, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
