"""Per-request Python on the event loop: the CPU one `/predict` costs in-process, with the
pipeline replaced by a stub (the model's cost removed), next to `/healthz`.

    python bench/request_overhead.py [--repo PATH] [--bundle PATH] [--requests N] [--concurrency C]

Drives the ASGI app directly (no sockets, no client), C requests at a time (default 16, what
32 clients put in one batch; 1 = one after another, each its own batch), one raw image/png
body of a real test digit per request; reports process CPU ms per request and the event-loop
thread's share of it (what limits throughput when the loop is the bottleneck), best of 3
rounds.
`--repo` points at another checkout (e.g. `git archive main | tar -x -C /tmp/main`) to
compare its code on the same bundle. Writes bench/results/request_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(HERE.parent), help="the checkout whose code to measure")
    p.add_argument("--bundle", default=str(HERE.parent / "models" / "default"))
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    args = p.parse_args()
    repo = str(Path(args.repo).resolve())
    sys.path.insert(0, repo)
    sys.path.insert(1, str(HERE))
    import torch

    import common
    from service.app import create_app
    from service.pipeline import ImageResult
    from service.settings import load_settings

    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    started = common.now_iso()
    bodies = common.digit_pngs(64)
    app = create_app(load_settings(bundle=args.bundle, warmup=False, log_level="warning"))
    for b in app.state.runtime.batchers.values():  # the stub: no model, same result shape
        b._run = lambda x, ctx: [ImageResult(status="accepted", label=1, class_name="1", confidence=0.9,
                                             probabilities=[0.1] * 10) for _ in range(x.shape[0])]

    async def call(path: str, body: bytes, method: str) -> None:
        sent = await common.asgi_request(app, method, path, body, b"pipeline=baseline" if method == "POST" else b"")
        assert sent[0]["status"] == 200, sent

    rows = []

    async def run() -> None:
        async with app.router.lifespan_context(app):
            for name, path, method, n in (("GET /healthz", "/healthz", "GET", 2 * args.requests),
                                          ("POST /predict (stub pipeline)", "/predict", "POST", args.requests)):
                conc = max(1, args.concurrency)

                async def some(start: int, k: int) -> None:
                    await asyncio.gather(*(call(path, bodies[i % 64] if method == "POST" else b"", method)
                                           for i in range(start, start + k)))

                for i in range(0, 48, conc):
                    await some(i, conc)
                best, best_loop = float("inf"), float("inf")
                for _ in range(3):
                    c0, t0 = time.process_time(), time.thread_time()
                    for i in range(0, n, conc):
                        await some(i, min(conc, n - i))
                    best = min(best, (time.process_time() - c0) / n * 1000)
                    best_loop = min(best_loop, (time.thread_time() - t0) / n * 1000)
                rows.append({"route": name, "requests": n, "concurrency": conc, "cpu_ms_per_request": best,
                             "event_loop_cpu_ms_per_request": best_loop})

    asyncio.run(run())
    common.print_table(rows, digits=3, title=f"per-request CPU in-process ({repo})")
    common.write_results("request_overhead", {"repo": repo, "rows": rows}, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
