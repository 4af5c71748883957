"""Why every torch call of a serving process runs on one thread (service/compute.py).

    python bench/omp_threads.py [--repeats 500] [--out FILE]

A small CNN on one 28x28 image and a ReLU over 64x64x64 values, timed per call (median of
`--repeats`) from a worker thread A while it is the only thread that ever called torch, then
from a second thread B while A's OpenMP team exists, then from A again, at torch's default
intra-op threads. libgomp keeps a team per calling thread; with two teams it manages more
threads than cores and stops spinning between parallel regions, so every region pays a
wake-up: B and then A are slower although they never run at the same time.

Prints a table and writes JSON (default bench/results/omp_threads.json).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def worker() -> "queue.Queue[Callable[[], None] | None]":
    """A thread that runs what it is given, in order, until None."""
    q: "queue.Queue[Callable[[], None] | None]" = queue.Queue()

    def loop() -> None:
        while (task := q.get()) is not None:
            task()

    threading.Thread(target=loop, daemon=True).start()
    return q


def on(q: "queue.Queue[Callable[[], None] | None]", fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    done = threading.Event()
    q.put(lambda: (out.append(fn()), done.set()))
    done.wait()
    return out[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--out", help="default bench/results/omp_threads.json")
    args = p.parse_args(argv)
    started = common.now_iso()
    with torch.no_grad():
        cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3)).eval()
    cases = {"cnn, one 28x28 image": (cnn, torch.rand(1, 1, 28, 28)),
             "relu, 262,144 values": (torch.nn.ReLU(), torch.rand(1, 64, 64, 64))}

    def timings() -> dict[str, float]:
        out = {}
        with torch.inference_mode():
            for name, (f, x) in cases.items():
                for _ in range(20):
                    f(x)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    f(x)
                    times.append(time.perf_counter() - t)
                out[name] = statistics.median(times) * 1e6
        return out

    a, b = worker(), worker()
    rows = [("A, the only thread that called torch", on(a, timings)),
            ("B, while A's team exists", on(b, timings)),
            ("A again, while B's team exists", on(a, timings))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; median us per call")
    names = list(cases)
    print(f"{'thread':40s} " + " ".join(f"{n:>22s}" for n in names))
    for label, t in rows:
        print(f"{label:40s} " + " ".join(f"{t[n]:22.0f}" for n in names))
    out = common.write_results("omp_threads", {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "median_us": {label: t for label, t in rows}},
                               out=args.out, started=started)
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
