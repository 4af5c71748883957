"""Does the query monitor catch an attacker who dithers every query across the quantization
boundaries? ART's query attacks against the bundle's `baseline` behind the monitor, in process
(no HTTP), with and without the dithering.

    .venv/bin/python bench/dither_attack.py [--attacks square_0.3,hsj] [--digits 10] [--budget 1000]
        [--near-matches 0] [--bundle models/default] [--out FILE]

The monitor's hashes are exact over pixels quantized in fixed steps (25/255), so an attacker who
moves every pixel of every query to just beside a step boundary (25k - 1 or 25k of 255, one of
the two at random per query) shares no hash between queries that are 1/255 apart
(docs/query_monitor.md, "Every client's queries in pixel space"). Per attack, `plain` and then
`dither`: a fresh QueryMonitor (memory store, reject mode, `near_matches` as given, the rest the
defaults), the attack on `--digits` mnist5k test digits (a seeded permutation: the digits the HTTP
evaluation's reject-mode square_0.15 run attacks), one client per digit, `--budget` queries each,
8-bit queries (what a PNG keeps); a flagged query is answered as a rejection (bench/
query_detection.py's ScreenedOracle). Success is judged on the images the monitor and classifier
received: a wrong label within the attack's ball (L-inf eps for Square, whose dithered queries are
kept inside it; L2 2.0 for HopSkipJump and the boundary attack, whose are not clamped). Prints
per attack and mode the successes, runs flagged and the medians of the first flag's query, of the
distance of the closest image answered with a wrong label, of the queries to success and of how
far the dithering moved the attack's queries (L-inf); writes bench/results/dither_attack.json
(`--out`), every run included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

from query_detection import ScreenedOracle  # noqa: E402
from service.defenses.query_monitor import MonitorPolicy, QueryMonitor  # noqa: E402
from service.evaluation.blackbox import PipelineOracle  # noqa: E402
from service.evaluation.query_attacks import ATTACKS, _summary, run_attack  # noqa: E402

# the hashing key the figures in docs/query_monitor.md were measured with (plain runs depend on it)
SECRET = "audit-key"
# query_attacks.run gives each (attack, mode) run its own block of `digits` digits of one seeded
# permutation; block 8 is square_0.15's reject-mode run (adaptive modes on), the digits the
# documented figures used for every attack
DIGIT_BLOCK = 8


class DitherOracle:
    """The attacker's disguise: each (8-bit) query's pixels moved to the nearest quantization
    boundary, 25k - 1 or 25k of 255 at random, then sent. Two dithered copies of one image differ
    by at most 1/255 per pixel, yet their quantized levels differ wherever the coin fell differently.
    For an L-inf attack the result is kept within `eps` of the attacked digit, so what was sent
    still counts as within the ball; `sent` tells BudgetedOracle what the service received."""

    def __init__(self, inner: ScreenedOracle, x0: torch.Tensor, step: int, eps: float | None, seed: int) -> None:
        self.inner, self.log = inner, inner.log
        self.boundaries = torch.arange(step, 256, step, dtype=torch.float32)  # 25, 50, ..., 250
        self.generator = torch.Generator().manual_seed(seed)
        self.lo = self.hi = None
        if eps is not None:
            # the 8-bit values within eps of x0 (ceil / floor: never outside the ball)
            self.lo = torch.ceil((x0 - eps).clamp(0, 1) * 255)
            self.hi = torch.floor((x0 + eps).clamp(0, 1) * 255)
        self.sent: torch.Tensor | None = None
        self.moved = 0.0  # the largest L-inf change the dithering made to one of the attack's queries

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        p = (x * 255).round()
        nearest = self.boundaries[(p.unsqueeze(-1) - self.boundaries).abs().argmin(-1)]
        q = nearest - torch.randint(0, 2, p.shape, generator=self.generator).float()
        if self.lo is not None:
            q = torch.minimum(torch.maximum(q, self.lo), self.hi)
        self.sent = q / 255
        self.moved = max(self.moved, float((self.sent - x).abs().max()))
        return self.inner.answer(self.sent)


def median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def three(value: float | None) -> str:
    """A distance for the table: three decimals (the table's one would hide 0.302 against 0.3)."""
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default="square_0.3,hsj",
                    help=f"comma separated: square_<L-inf eps>, hsj, boundary (query_attacks: {', '.join(ATTACKS)})")
    ap.add_argument("--digits", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1000, help="queries per digit")
    ap.add_argument("--near-matches", type=int, default=0,
                    help="MonitorPolicy.near_matches: flag a query near this many of its client's recent ones (0: off)")
    ap.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/dither_attack.json)")
    args = ap.parse_args()
    started = common.now_iso()

    from models.datasets import load_dataset
    from service.evaluation.targets import load_pipelines

    _, pipes = load_pipelines(args.bundle, ["baseline"])
    test = load_dataset("mnist5k").test
    flat = test.x.flatten(1)
    order = np.random.default_rng(0).permutation(len(test.x))  # query_attacks.run's digit order
    digits = order[DIGIT_BLOCK * args.digits:(DIGIT_BLOCK + 1) * args.digits].tolist()
    policy = MonitorPolicy(action="reject", near_matches=args.near_matches)

    rows, results = [], []
    for kind in [a for a in args.attacks.split(",") if a]:
        eps = float(kind.split("_")[1]) if kind.startswith("square") else None
        for mode in ("plain", "dither"):
            monitor = QueryMonitor(store="memory", secret=SECRET)  # fresh: the modes do not see each other's queries
            runs = []
            t0 = time.perf_counter()
            for i, d in enumerate(digits):
                x0, y0 = test.x[d], int(test.y[d])
                # HopSkipJump and the boundary attack start from the nearest digit of another class
                other = (test.y != y0).nonzero().flatten()
                start = test.x[other[(flat[other] - x0.flatten()).norm(dim=1).argmin()]]
                oracle: Any = ScreenedOracle(monitor, policy, PipelineOracle(pipes["baseline"], seed=i),
                                             f"ip:203.0.113.{i % 250 + 1}")
                if mode == "dither":
                    oracle = DitherOracle(oracle, x0, monitor.fingerprinter.quantization, eps, seed=i)
                run = run_attack(kind, oracle, x0.contiguous(), y0, start.contiguous(), budget=args.budget, seed=i)
                run.update(digit=d, label=y0, dither_moved=round(oracle.moved, 4) if mode == "dither" else None)
                runs.append(run)
                common.log(f"{kind} {mode} digit {i + 1}/{len(digits)}: success {run['success']}, "
                           f"first flag {run['first_flag']}, flags {run['flags']}/{run['queries']}, "
                           f"distance {run['distance']}")
            s = _summary(runs)
            results.append({"attack": kind, "mode": mode, "seconds": round(time.perf_counter() - t0, 1),
                            "summary": s, "runs": runs})
            rows.append({"attack": kind, "mode": mode,
                         "success": f"{s['attack_success']}/{s['digits']}",
                         "flagged": f"{s['runs_flagged']}/{s['digits']}",
                         "first flag": s["first_flag_median"], "distance": three(s["distance_median"]),
                         "queries to success": s["queries_to_success_median"],
                         "dither moved": three(median([r["dither_moved"] for r in runs]))})

    common.print_table(rows, title=(
        f"baseline behind the query monitor (reject, near_matches {args.near_matches}), {len(digits)} digits, "
        f"{args.budget} queries each; medians; distance: L-inf for square, L2 otherwise"))
    path = common.write_results("dither_attack", {
        "bundle": args.bundle, "digits": digits, "budget_per_digit": args.budget,
        "policy": policy.public(), "results": results}, out=args.out, started=started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
