"""What a busy event loop does to the batch thread's model call: the GIL hand-off.

    python bench/gil_handoff.py [--bundle PATH] [--batch 16] [--calls 60]

Runs the baseline pipeline's decision on a batch of real test digits in a worker thread, as
the server's batch thread does, three ways: `Pipeline.run` with the eager argmax decision
(classifier, float, softmax, max, zeros_like: five torch calls), the TorchScript-optimised
classifier followed by the same torch calls, and the decision compiled into one TorchScript
call (`optimize_argmax_decision`, what the server runs since 0.5.0); and the step before it,
joining the requests' digits into one batch, with numpy (0.5.0) and with bytearray.join (0.6.0,
service/batcher.py: numpy's copy loops let go of the GIL too). Each is timed alone and
while another thread spins in pure Python (an event loop that never waits, the worst case),
at Python's default switch interval (5 ms) and at the server's (`gil_switch_interval_ms`,
1 ms). Every torch call lets go of the GIL; getting it back waits until the spinning thread
drops it, up to the switch interval. Prints ms per call (median) and writes
bench/results/gil_handoff.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--batch", type=int, default=16, help="images per call (default 16: 32 clients' batch)")
    p.add_argument("--calls", type=int, default=60, help="timed calls per case (default 60)")
    args = p.parse_args()

    import torch

    from models.datasets import load_dataset
    import numpy as np

    from service.batcher import _concatenate
    from service.defenses.base import ArgmaxDecider, RunContext
    from service.runtime import Runtime
    from service.settings import load_settings

    started = common.now_iso()
    rt = Runtime(load_settings(bundle=args.bundle, warmup=False, log_level="warning", gil_switch_interval_ms=0,
                               torch_threads=torch.get_num_threads()))  # torch's default, not the server's auto
    pipe = rt.pipelines["baseline"]
    x = load_dataset("mnist5k").test.x[:args.batch].contiguous()
    ctx = RunContext(device=rt.device, seed=0)
    decider = ArgmaxDecider()
    singles = [t[None].clone() for t in x]  # one tensor per request, as the batcher gets them
    fast, fused = rt.inference_classifier, rt.argmax_decision
    if fast is None or fused is None:
        raise SystemExit("this bundle's classifier could not be optimised; nothing to compare")

    cases = {
        "eager decision (Pipeline.run, 0.4.0 without the optimised copy)":
            lambda: (setattr(pipe, "argmax_decision", None), setattr(pipe, "inference_classifier", None),
                     pipe.run(x, ctx)),
        "optimised classifier + eager softmax/max (0.4.0)":
            lambda: decider.decide(x, fast, ctx),
        "one compiled call (0.5.0)":
            lambda: fused(x),
        # the step before it: one batch from the requests' own (1, C, H, W) tensors
        "join the requests' digits into a batch: np.concatenate (0.5.0)":
            lambda: torch.from_numpy(np.concatenate([t.numpy() for t in singles])),
        "join the requests' digits into a batch: bytearray.join (0.6.0)":
            lambda: _concatenate(singles),
    }

    def spin(stop: list[bool]) -> None:
        while not stop[0]:
            for _ in range(1000):
                pass

    rows = []
    saved = sys.getswitchinterval()
    try:
        for interval_ms in (5.0, 1.0):
            sys.setswitchinterval(interval_ms / 1000.0)
            for name, fn in cases.items():
                medians = {}
                for busy in (False, True):
                    stop = [False]
                    spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
                    if busy:
                        spinner.start()
                        time.sleep(0.05)
                    out: dict[str, float] = {}

                    def work(fn=fn, out=out) -> None:
                        with torch.no_grad():
                            for _ in range(5):
                                fn()
                            times = []
                            for _ in range(args.calls):
                                t0 = time.perf_counter()
                                fn()
                                times.append((time.perf_counter() - t0) * 1000)
                        out["median"] = statistics.median(times)

                    worker = threading.Thread(target=work)
                    worker.start()
                    worker.join()
                    stop[0] = True
                    if busy:
                        spinner.join()
                    medians[busy] = out["median"]
                rows.append({"switch_interval_ms": interval_ms, "decision": name, "alone_ms": medians[False],
                             "python_thread_spinning_ms": medians[True],
                             "slowdown": medians[True] / medians[False]})
                common.log(f"{interval_ms} ms, {name}: {medians[False]:.2f} / {medians[True]:.2f} ms")
    finally:
        sys.setswitchinterval(saved)
        pipe.argmax_decision, pipe.inference_classifier = fused, fast
    common.print_table(rows, digits=2, title=f"GIL hand-off: batch of {args.batch}, ms per call (median)")
    common.write_results("gil_handoff", {"batch": args.batch, "calls": args.calls, "rows": rows}, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
