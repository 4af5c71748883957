"""Where one request's time goes: the stages of a `/predict`, one request at a time, in-process.

    .venv/bin/python bench/request_timeline.py [--pipelines default,baseline] [--requests 600]
        [--bundle models/default] [--out FILE]

Drives the ASGI app directly (no sockets; what uvicorn and the client add is not in it), one
request after another (each its own batch, as one client sees the service), each a real test
digit as a PNG (the first 64 of the test split, in turn), and stamps the way through the code
by wrapping its functions before the app is built:

  route      arrival -> Runtime.classify (middleware, routing, reading the body)
  decode     -> Batcher.submit (admission, the decode in a worker thread and back)
  queue      -> the batch thread takes the batch
  hand-off   -> Pipeline.run starts (the compute thread, the query monitor's screen)
  pipeline   Pipeline.run (the defenses and the decision)
  return     -> the answer is back on the event loop
  respond    -> the response's first message (store, render, serialise)

Prints the median and mean of each stage per pipeline; writes
bench/results/request_timeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

STAGES = [("route", "arrive", "classify"), ("decode", "classify", "submit"), ("queue", "submit", "batch"),
          ("hand-off", "batch", "run"), ("pipeline", "run", "ran"), ("return", "ran", "settle"),
          ("respond", "settle", "sent")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", default="default,baseline")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--out")
    args = p.parse_args(argv)

    import service.batcher as batcher_mod
    from service.app import create_app
    from service.pipeline import Pipeline
    from service.runtime import Runtime
    from service.settings import load_settings

    logging.disable(logging.INFO)
    started = common.now_iso()
    stamps: dict[str, float] = {}

    def stamp_at(name: str, fn: Any, end: str | None = None) -> Any:
        """fn, stamping `name` when it is called (and `end` when it returns)."""
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapped_async(*a: Any, **k: Any) -> Any:
                stamps.setdefault(name, time.perf_counter())
                return await fn(*a, **k)
            return wrapped_async

        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            stamps.setdefault(name, time.perf_counter())
            try:
                return fn(*a, **k)
            finally:
                if end:
                    stamps.setdefault(end, time.perf_counter())
        return wrapped

    # first call of each per request (setdefault): a later batch's stamps never overwrite
    Runtime.classify = stamp_at("classify", Runtime.classify)  # type: ignore[method-assign]
    batcher_mod.Batcher.submit = stamp_at("submit", batcher_mod.Batcher.submit)  # type: ignore[method-assign]
    batcher_mod.Batcher._run_jobs = stamp_at("batch", batcher_mod.Batcher._run_jobs)  # type: ignore[method-assign]
    Pipeline.run = stamp_at("run", Pipeline.run, end="ran")  # type: ignore[method-assign]
    batcher_mod._settle = stamp_at("settle", batcher_mod._settle)

    bodies = common.digit_pngs(64)
    app = create_app(load_settings(bundle=args.bundle, log_level="warning"))

    async def call(pipeline: str, body: bytes) -> None:
        sent = await common.asgi_request(app, "POST", "/predict", body, b"pipeline=" + pipeline.encode(),
                                         on_first=lambda: stamps.setdefault("sent", time.perf_counter()))
        assert sent and sent[0]["status"] == 200, sent[:1]

    rows: list[dict[str, Any]] = []

    async def run() -> None:
        async with app.router.lifespan_context(app):
            for pipeline in args.pipelines.split(","):
                for i in range(64):  # warm-up: TorchScript specialises, caches fill
                    await call(pipeline, bodies[i])
                per: dict[str, list[float]] = {s: [] for s, _, _ in STAGES}
                per["total"] = []
                for i in range(args.requests):
                    await asyncio.sleep(0.002)  # let the batch thread finish the last batch's bookkeeping
                    stamps.clear()
                    stamps["arrive"] = time.perf_counter()
                    await call(pipeline, bodies[i % 64])
                    stamps["end"] = time.perf_counter()
                    for name, a, b in STAGES:
                        if a in stamps and b in stamps:
                            per[name].append(1000 * (stamps[b] - stamps[a]))
                    per["total"].append(1000 * (stamps["end"] - stamps["arrive"]))
                for name, ms in per.items():
                    rows.append({"pipeline": pipeline, "stage": name, "requests": len(ms),
                                 "median_ms": statistics.median(ms) if ms else None,
                                 "mean_ms": statistics.fmean(ms) if ms else None})
                common.log(f"{pipeline}: median total {statistics.median(per['total']):.3f} ms")

    asyncio.run(run())
    common.print_table(rows, ["pipeline", "stage", "requests", "median_ms", "mean_ms"], digits=3,
                       title="one /predict at a time, in-process: where its time goes")
    common.write_results("request_timeline", {"rows": rows}, out=args.out, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
