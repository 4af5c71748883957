"""How fast the query monitor catches ART's query attacks, in process (no HTTP), and what it
flags of benign traffic: the quick loop for tuning the monitor before the HTTP evaluation.

    flock /work/bench.lock python bench/query_detection.py [--digits 10] [--budget 1000]
        [--benign 5000] [--variants columns:80:14:7,rows:50:12:12:0] [--keys 2] [--transposed]

Per variant (`layout:top_n:threshold:suspect_threshold[:suspect_linf]`; the defaults against
0.6.0's rows:50:12:12:0, which had no suspects) and key: a fresh QueryMonitor (memory store, reject
mode; `lines` with the columns layout) first sees the benign workload of `shieldserve evaluate
--sections query` (every distinct mnist5k digit once from 8 clients, 10% retried, 20 public
digits sent by every client) and then, on the same store, ART's Square (L-inf 0.3 and 0.15),
HopSkipJump and the boundary attack against the `baseline` pipeline of the bundle, 10 digits
each: the digits and seeds the HTTP evaluation's reject-mode runs use. Queries are rounded to
8 bits (what a PNG keeps); a flagged query is answered as a rejection (service/evaluation/
query_attacks.py counts first flag and success the same way). Prints a table and writes
bench/results/query_detection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

from service.defenses.query_monitor import MonitorPolicy, QueryMonitor  # noqa: E402
from service.evaluation.blackbox import PipelineOracle, quantize  # noqa: E402
from service.evaluation.query_attacks import ATTACKS, QueryLog, _summary, run_attack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES_PER_ATTACK = 7  # query_attacks.run's modes: off, reject, block and four adaptive ones


class ScreenedOracle:
    """The pipeline behind the monitor, as the service answers one client: a flagged query is
    a rejection (no label, no confidence), the rest run through the pipeline."""

    def __init__(self, monitor: QueryMonitor, policy: MonitorPolicy, pipeline: PipelineOracle, client: str) -> None:
        self.monitor, self.policy, self.pipeline, self.client = monitor, policy, pipeline, client
        self.log = QueryLog()

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        verdict = self.monitor.screen(self.policy, x, self.client)
        answers = self.pipeline.answer(x)
        out = []
        for flagged, a in zip(verdict.flagged, answers):
            self.log.sent += 1
            if flagged:
                self.log.flags += 1
                if self.log.first_flag is None:
                    self.log.first_flag = self.log.sent
                out.append(("rejected", -1, 0.0))
            else:
                out.append(a)
        return out


class TransposedOracle:
    """An attacker who knows the monitor reads the image column by column: it attacks the
    transposed digit, so that Square's vertical stripes and whole-column squares land as
    horizontal ones on the image the service sees."""

    def __init__(self, inner: ScreenedOracle) -> None:
        self.inner, self.log = inner, inner.log

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        return self.inner.answer(x.transpose(-1, -2).contiguous())


def benign(monitor: QueryMonitor, policy: MonitorPolicy, x: torch.Tensor, *, clients: int = 8, retry: float = 0.1,
           public: int = 20, seed: int = 0) -> dict[str, Any]:
    """query_attacks.benign's workload (the same plan and order), screened in process."""
    g = np.random.default_rng(seed)
    plan: list[tuple[int, int]] = [(i, i % clients) for i in range(len(x))]
    plan += [(int(i), int(i) % clients) for i in g.choice(len(x), int(retry * len(x)), replace=False)]
    plan += [(i, c) for i in range(public) for c in range(clients)]
    order = g.permutation(len(plan))
    xq = quantize(x)
    matches = []
    for k in order:
        i, c = plan[k]
        matches.append(monitor.screen(policy, xq[i:i + 1], f"192.0.2.{c + 1}").matches[0])
    m = np.array(matches)
    return {"queries": len(m), "flagged": int((m >= policy.threshold).sum()),
            "false_positive_rate": round(float((m >= policy.threshold).mean()), 6),
            "max_shared": int(m.max()), "shared_p99_9": float(np.percentile(m, 99.9))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--benign", type=int, default=5000, help="distinct mnist5k digits (0: none)")
    ap.add_argument("--variants", default="columns:80:14:7,rows:50:12:12:0",
                    help="layout:top_n:threshold:suspect_threshold[:suspect_linf], comma separated "
                         "(suspect_linf: MonitorPolicy's default unless given; 0 turns the pixel check off)")
    ap.add_argument("--keys", type=int, default=2, help="hashing keys per variant (fixed, derived from an index)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--transposed", action="store_true",
                    help="the adaptive attacker of the column layout: every attack runs on the transposed digit")
    ap.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "query_detection.json"))
    args = ap.parse_args()

    from tqdm import tqdm

    from models.datasets import load_dataset
    from service.evaluation.targets import load_pipelines

    _, pipes = load_pipelines(args.bundle, ["baseline"])
    data = load_dataset("mnist5k")
    test = data.test
    flat = test.x.flatten(1)
    every = torch.cat([data.train.x, data.val.x, data.test.x])[:args.benign]
    order = np.random.default_rng(0).permutation(len(test.x))  # query_attacks.run's digit order
    attacks = [a for a in args.attacks.split(",") if a]
    report: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "load_avg": os.getloadavg(),
                              "digits": args.digits, "budget_per_digit": args.budget,
                              "transposed": args.transposed, "results": []}
    rows = []
    for variant in args.variants.split(","):
        layout, top_n, threshold, suspect, *linf = variant.split(":")
        suspect_linf = float(linf[0]) if linf else MonitorPolicy().suspect_linf
        for k in range(args.keys):
            started = time.perf_counter()
            # 0.6.0's fingerprint had no line hashes: rows:50:12 without them
            monitor = QueryMonitor(store="memory", secret=f"query-detection-key-{k}",
                                   layout=layout, lines=layout == "columns",  # type: ignore[arg-type]
                                   top_n=int(top_n), max_queries=1_000_000)
            policy = MonitorPolicy(action="reject", threshold=int(threshold), suspect_threshold=int(suspect),
                                   suspect_linf=suspect_linf)
            res: dict[str, Any] = {"layout": layout, "top_n": int(top_n), "threshold": int(threshold),
                                  "suspect_threshold": int(suspect), "suspect_linf": suspect_linf, "key": k}
            if len(every):
                res["benign"] = benign(monitor, policy, every)
            bar = tqdm(total=len(attacks) * args.digits, desc=f"{variant} key {k}", unit="digit", leave=False)
            for a_i, kind in enumerate(attacks):
                j = ATTACKS.index(kind) * MODES_PER_ATTACK + 1  # the reject-mode run's digits
                runs = []
                for i, d in enumerate(order[j * args.digits:(j + 1) * args.digits].tolist()):
                    x0, y0 = test.x[d], int(test.y[d])
                    other = (test.y != y0).nonzero().flatten()
                    start = test.x[other[(flat[other] - x0.flatten()).norm(dim=1).argmin()]]
                    oracle: Any = ScreenedOracle(monitor, policy, PipelineOracle(pipes["baseline"], seed=i),
                                                 f"203.0.{j % 250}.{i % 250 + 1}")
                    if args.transposed:
                        oracle, x0, start = TransposedOracle(oracle), x0.transpose(-1, -2), start.transpose(-1, -2)
                    runs.append(run_attack(kind, oracle, x0.contiguous(), y0, start.contiguous(),
                                           budget=args.budget, seed=i))
                    bar.update(1)
                res[kind] = {**_summary(runs), "first_flags": [r["first_flag"] for r in runs]}
            bar.close()
            res["seconds"] = round(time.perf_counter() - started, 1)
            report["results"].append(res)
            rows.append(res)
            b = res.get("benign", {})
            print(f"{layout:8s} top {top_n} t{threshold:>2s}/{suspect} linf {suspect_linf} key {k}: "
                  f"benign {b.get('flagged')}/{b.get('queries')} flagged (max shared {b.get('max_shared')})",
                  flush=True)
            for kind in attacks:
                s = res[kind]
                print(f"    {kind:12s} flagged {s['runs_flagged']}/{s['digits']}  first flag median "
                      f"{s['first_flag_median']} max {s['first_flag_max']}  successes {s['attack_success']}  "
                      f"{s['first_flags']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"load average {report['load_avg']}; wrote {out}")


if __name__ == "__main__":
    main()
