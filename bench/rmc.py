"""RMC on the mnist5k test split: accuracy, latency, batching and search speed, one run.

    PYTHONPATH=. .venv/bin/python bench/rmc.py [--bundle models/default] [--limit 1000]

What it measures (every comparison is against a baseline measured in the same run):
  - clean accuracy: undefended classifier vs RMC (isolated mode)              goal RMC >= 97%
  - accuracy under PGD-40, eps = 0.3 L-inf, computed on the base classifier
    (the paper's non-adaptive setting): undefended vs RMC                      goal RMC >= 80%
  - per-request latency in isolated mode (one image per request, p50 / p90)
  - batched adaptation (vmap over per-image parameter copies) vs one image at a time:
    the same images, the same answers, the speed-up as a ratio
  - FAISS search vs exact `torch.cdist` + top-k over the same D′ features: a ratio, and the
    share of neighbours the two agree on

Prints a table; writes bench/results/rmc.json. On a busy machine use --limit (a stratified
subset of the test split, >= 200 recommended) and read `machine.load_avg` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # the shared helpers, when bench/common.py is there
    from bench.common import log, print_table, summarize_latencies, write_results
except ImportError:  # pragma: no cover - plain fallbacks
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def summarize_latencies(seconds: list[float]) -> dict:
        xs = sorted(seconds)
        q = lambda p: 1000 * xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]  # noqa: E731
        return {"count": len(xs), "mean_ms": 1000 * sum(xs) / len(xs), "p50_ms": q(50), "p90_ms": q(90),
                "p99_ms": q(99), "max_ms": 1000 * xs[-1]}

    def print_table(rows: list[dict], columns: list[str] | None = None, title: str | None = None, **_: object) -> None:
        columns = columns or list(rows[0])
        if title:
            print(title)
        cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))

    def write_results(name: str, payload: dict, *, out: str | None = None, started: str | None = None,
                      device: str = "cpu") -> Path:
        path = Path(out) if out else ROOT / "bench" / "results" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": name, "started": started, "argv": sys.argv, "load_avg": os.getloadavg(),
               "torch_threads": torch.get_num_threads(), **payload}
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return path

from models.bundle import Bundle  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from service.attacks import pgd  # noqa: E402
from service.defenses.base import DefenseEnv, RunContext  # noqa: E402
from service.defenses.rmc import RMC, TorchIndex, extract_features  # noqa: E402


def _yes(met: bool) -> str:
    """A goal's verdict as the table shows it (a bare bool reads on/off there)."""
    return "yes" if met else "no"


def rmc_logits(rmc: RMC, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    logits = rmc.adapt(x, rmc.classifier, RunContext()).logits
    return logits, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    p.add_argument("--limit", type=int, default=1000, help="test digits, stratified (1000 = all)")
    p.add_argument("--options", default="{}", help="JSON options for the rmc component")
    p.add_argument("--latency-images", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="images in the batched-vs-serial comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; 1 is fastest on a shared, busy CPU)")
    p.add_argument("--timing-only", action="store_true",
                   help="skip the accuracy runs: latency, batched vs serial and search only")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bundle = Bundle.load(args.bundle)
    clf = bundle.classifier()
    env = DefenseEnv(bundle, clf, torch.device("cpu"))
    options = json.loads(args.options)
    rmc = RMC(env, **options)  # accuracy and latency with the serving default for `parallel`
    ds = load_dataset("mnist5k")
    test = ds.test if args.limit >= len(ds.test) else ds.test.per_class(args.limit // len(ds.class_names))
    x, y = test.x, test.y
    log(f"bundle {bundle.path} ({bundle.version}); {len(x)} test digits; rmc {rmc.public_settings()}")

    # ---- the attack: PGD-40, eps 0.3, L-inf, on the base classifier (not on RMC)
    g = torch.Generator().manual_seed(args.seed)
    with_time = time.perf_counter()
    adv = torch.cat([pgd(clf, x[i:i + 250], y[i:i + 250], 0.3, steps=40, generator=g)
                     for i in range(0, len(x), 250)])
    log(f"PGD-40 done in {time.perf_counter() - with_time:.1f}s")
    with torch.no_grad():
        base_clean = float((clf(x).argmax(1) == y).float().mean())
        base_adv = float((clf(adv).argmax(1) == y).float().mean())

    # ---- accuracy, isolated adaptation (the serving default: one image at a time on CPU)
    nan = float("nan")
    rmc_clean = rmc_adv = clean_s = adv_s = nan
    if not args.timing_only:
        clean_logits, clean_s = rmc_logits(rmc, x)
        log(f"RMC clean: {clean_s:.1f}s")
        adv_logits, adv_s = rmc_logits(rmc, adv)
        log(f"RMC adversarial: {adv_s:.1f}s")
        rmc_clean = float((clean_logits.argmax(1) == y).float().mean())
        rmc_adv = float((adv_logits.argmax(1) == y).float().mean())

    # ---- per-request latency, one image per request (neighbour search + fine-tuning)
    lat = []
    for i in range(min(args.latency_images, len(x))):
        xi = (x if i % 2 == 0 else adv)[i:i + 1]
        lat.append(rmc_logits(rmc, xi)[1])
    latency = summarize_latencies(lat)

    # ---- batched vs one image at a time, on the same images
    xb = torch.cat([x[:args.batch // 2], adv[:args.batch - args.batch // 2]])
    serial_logits, serial_s = [], 0.0
    for i in range(len(xb)):
        lo, s = rmc_logits(rmc, xb[i:i + 1])
        serial_logits.append(lo)
        serial_s += s
    serving_parallel, rmc.parallel = rmc.parallel, len(xb)
    batched, batched_s = rmc_logits(rmc, xb)
    rmc.parallel = serving_parallel
    same = bool(torch.equal(torch.cat(serial_logits).argmax(1), batched.argmax(1)))
    max_diff = float((torch.cat(serial_logits) - batched).abs().max())

    # ---- FAISS vs exact torch.cdist over the same D′ features
    queries = extract_features(clf, torch.cat([x, adv]))
    dprime = rmc.index.reconstruct_all() if hasattr(rmc.index, "reconstruct_all") else None
    exact = TorchIndex(dprime if dprime is not None else extract_features(clf, rmc.images.float() / 255))
    rounds = 5
    t0 = time.perf_counter()
    for _ in range(rounds):
        _, ids_f = rmc.index.search(queries, rmc.k)
    faiss_s = (time.perf_counter() - t0) / rounds
    t0 = time.perf_counter()
    for _ in range(rounds):
        _, ids_t = exact.search(queries, rmc.k)
    cdist_s = (time.perf_counter() - t0) / rounds
    agree = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids_f, ids_t))
                  / ids_t.numel())

    n = len(x)
    rows = [
        {"measure": "clean accuracy", "undefended": f"{base_clean:.4f}", "rmc": f"{rmc_clean:.4f}",
         "goal": ">= 0.97", "met": "-" if args.timing_only else _yes(rmc_clean >= 0.97)},
        {"measure": "PGD-40 eps=0.3 (on base) accuracy", "undefended": f"{base_adv:.4f}",
         "rmc": f"{rmc_adv:.4f}", "goal": ">= 0.80", "met": "-" if args.timing_only else _yes(rmc_adv >= 0.80)},
        {"measure": f"throughput, isolated, parallel={rmc.parallel} (img/s)", "undefended": "-",
         "rmc": f"{2 * n / (clean_s + adv_s):.2f}", "goal": "-", "met": "-"},
        {"measure": "latency, 1 image/request p50 / p90 (ms)", "undefended": "-",
         "rmc": f"{latency['p50_ms']:.0f} / {latency['p90_ms']:.0f}", "goal": "-", "met": "-"},
        {"measure": f"batched ({len(xb)} at once) vs one at a time",
         "undefended": f"{serial_s:.2f}s serial", "rmc": f"{batched_s:.2f}s batched",
         "goal": f"speed-up {serial_s / batched_s:.2f}x", "met": f"same answers: {_yes(same)}"},
        {"measure": f"KNN search of {len(queries)} queries, K={rmc.k}, |D'|={rmc.index.size}",
         "undefended": f"cdist {1000 * cdist_s:.1f} ms", "rmc": f"{rmc.index.backend} {1000 * faiss_s:.1f} ms",
         "goal": f"cdist/faiss {cdist_s / faiss_s:.2f}x", "met": f"agree {agree:.4f}"},
    ]
    print_table(rows, ["measure", "undefended", "rmc", "goal", "met"],
                title=f"RMC on {n} mnist5k test digits ({'all' if n == len(ds.test) else 'stratified subset'}), "
                      f"bundle {bundle.version}")
    payload = {
        "bundle": str(bundle.path), "bundle_version": bundle.version, "test_images": n,
        "subset": n != len(ds.test), "rmc_settings": rmc.public_settings(), "attack": {
            "name": "pgd", "norm": "linf", "eps": 0.3, "steps": 40, "on": "base classifier", "seed": args.seed},
        "accuracy": {"undefended_clean": base_clean, "undefended_pgd40": base_adv,
                     "rmc_clean": rmc_clean, "rmc_pgd40": rmc_adv},
        "goals": {"clean_ge_0.97": rmc_clean >= 0.97, "pgd40_ge_0.80": rmc_adv >= 0.80},
        "seconds": {"rmc_clean_all": clean_s, "rmc_adv_all": adv_s},
        "latency_isolated_one_image": latency,
        "batched_vs_serial": {"images": len(xb), "serial_s": serial_s, "batched_s": batched_s,
                              "speedup": serial_s / batched_s, "same_labels": same,
                              "max_logit_diff": max_diff},
        "knn_search": {"queries": len(queries), "k": rmc.k, "dprime": rmc.index.size,
                       "backend": rmc.index.backend, "faiss_s": faiss_s, "cdist_s": cdist_s,
                       "cdist_over_faiss": cdist_s / faiss_s, "neighbour_agreement": agree},
    }
    path = write_results("rmc", payload, out=args.out, started=started)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
