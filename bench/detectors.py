"""Benchmark of the detector defenses (MagNet, Neural Fingerprinting, feature squeezing) on the
mnist5k test digits, against the bundle's `baseline` in the same run.

  PYTHONPATH=$PWD python bench/detectors.py [--bundle models/default] [--limit 1000] [--cw-limit 300]

Measures
  * clean false-rejection rate of each pipeline on the test digits;
  * oblivious attacks (FGSM eps=0.3, PGD-40 eps=0.3 L-inf, CW-L2) computed on the BASE
    classifier: share of adversarial digits each pipeline rejects or classifies correctly
    (MagNet's goal: >= 95% each);
  * gray-box attacks computed on the fingerprinted network's logits (no fingerprint check):
    NeuralFP detection AUC-ROC, clean test digits vs adversarial digits (goal >= 98% each),
    over all adversarial digits and over the successful ones;
  * latency of each pipeline relative to `baseline` (batch of 1 and batch of 100).
Prints a table and writes bench/results/detectors.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.bundle import Bundle  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from service.attacks import cw_l2 as torch_cw_l2, fgsm, pgd  # noqa: E402
from service.defenses.base import DefenseEnv, RunContext  # noqa: E402
from service.pipeline import Pipeline  # noqa: E402

PIPELINES: dict[str, dict[str, Any]] = {
    "baseline": {"defenses": []},
    "magnet": {"defenses": [{"defense": "magnet"}]},
    "magnet_detect": {"defenses": [{"defense": "magnet", "reform": False}]},
    "neuralfp": {"defenses": ["neuralfp"]},
    "squeeze": {"defenses": ["squeeze"]},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- Carlini-Wagner L2
def cw_l2(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
          binary_steps: int = 5, iterations: int = 100, lr: float = 0.1, initial_const: float = 1.0,
          confidence: float = 0.0, batch_size: int = 250,
          cache: Callable[[int, Callable[[], torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """Untargeted Carlini & Wagner (2017) L2 (service.attacks.cw_l2) in batches. Returns the
    smallest-L2 adversarial found per image, or the original where none was found.
    `cache(i, compute)` may store each batch (starting at digit i) so an interrupted run resumes."""
    out = []
    for i in range(0, len(x), batch_size):
        def compute(i: int = i) -> torch.Tensor:
            return torch_cw_l2(model, x[i:i + batch_size], y[i:i + batch_size], binary_steps=binary_steps,
                               steps=iterations, lr=lr, initial_const=initial_const, kappa=confidence)
        out.append(cache(i, compute) if cache else compute())
        log(f"  cw {min(i + batch_size, len(x))}/{len(x)}")
    return torch.cat(out)


# ---------------------------------------------------------------------- helpers
class AttackCache:
    """Adversarial digits on disk, keyed by everything that determines them (the attacked
    network's sha256, the attack's parameters, the digits). The oblivious attacks depend only
    on the base classifier, so a re-run after a defense is rebuilt reuses them; the gray-box
    ones are recomputed whenever the fingerprinted network changes. No directory: no cache."""

    def __init__(self, directory: str | None) -> None:
        self.dir = Path(directory) if directory else None

    def get(self, key: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.dir is None:
            return compute()
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        # safetensors, never pickle: a cache directory is a place others may write to
        path = self.dir / f"{key['attack']}-{digest}.safetensors"
        if path.exists():
            return load_file(str(path))["x"]
        out = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        save_file({"x": out.detach().cpu().contiguous()}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
        return out


def auc_roc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney form of the ROC area."""
    from scipy.stats import rankdata

    s = torch.cat([negative, positive]).double().numpy()
    ranks = rankdata(s)
    n_neg, n_pos = len(negative), len(positive)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run_pipeline(p: Pipeline, x: torch.Tensor, batch: int = 250):
    statuses, labels = [], []
    for i in range(0, len(x), batch):
        for r in p.run(x[i:i + batch], RunContext(seed=0)):
            statuses.append(r.status)
            labels.append(r.label if r.label is not None else -1)
    return statuses, torch.tensor(labels)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    ap.add_argument("--limit", type=int, default=1000, help="test digits (stratified)")
    ap.add_argument("--pgd-limit", type=int, default=1000, help="test digits for PGD-40 (stratified)")
    ap.add_argument("--cw-limit", type=int, default=300, help="test digits for CW-L2 (stratified)")
    ap.add_argument("--graybox-cw-limit", type=int, default=None,
                    help="test digits for CW-L2 on the fingerprinted network (default: --cw-limit)")
    ap.add_argument("--cw-steps", type=int, default=5)
    ap.add_argument("--cw-iterations", type=int, default=100)
    ap.add_argument("--cw-lr", type=float, default=0.1)
    ap.add_argument("--cw-c0", type=float, default=1.0, help="CW initial constant")
    ap.add_argument("--cw-batch", type=int, default=100, help="digits per CW batch (and cache entry)")
    ap.add_argument("--cache", default=None, help="directory to keep adversarial digits in (reused when "
                    "the attacked network and the attack's settings are unchanged)")
    ap.add_argument("--attack-targets", default="base,fingerprinted", help="with --attacks-only: which networks")
    ap.add_argument("--attacks-only", action="store_true", help="compute (and cache) the attacks, then stop")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detectors.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    bundle = Bundle.load(args.bundle)
    base = bundle.classifier()
    env = DefenseEnv(bundle=bundle, classifier=base, device=torch.device("cpu"))
    pipes = {n: Pipeline.build(n, cfg, env) for n, cfg in PIPELINES.items()}
    fp_net = next(c for c in pipes["neuralfp"].components if c.role == "detector").network
    fp_detector = next(c for c in pipes["neuralfp"].components if c.role == "detector")

    ds = load_dataset("mnist5k")
    per = max(1, args.limit // 10)
    test = ds.test.per_class(per)  # interleaved by class, so any prefix is stratified
    x, y = test.x, test.y
    cw_n = min(args.cw_limit, len(x))
    cw_x, cw_y = x[:cw_n], y[:cw_n]  # per_class interleaves classes: any prefix is stratified
    gb_cw_n = min(args.graybox_cw_limit if args.graybox_cw_limit is not None else cw_n, cw_n)
    pgd_n = min(args.pgd_limit, len(x))
    log(f"bundle {bundle.path} version {bundle.version}; {len(x)} test digits, CW on {cw_n}")

    cache = AttackCache(args.cache)
    digits = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
    cw_cfg = {"binary_steps": args.cw_steps, "iterations": args.cw_iterations, "lr": args.cw_lr,
              "initial_const": args.cw_c0, "confidence": 0.0}
    attacks: dict[str, dict[str, Any]] = {}
    for target, model, artifact in (("base", base, "classifier"),
                                    ("fingerprinted", fp_net, bundle.defense("neuralfp")["classifier"])):
        if args.attacks_only and target not in args.attack_targets.split(","):
            continue
        key = {"network": bundle.artifact(artifact)["sha256"], "digits": digits}
        t0 = time.time()
        attacks[f"fgsm_0.3@{target}"] = {"x": cache.get({**key, "attack": "fgsm", "eps": 0.3, "n": len(x)},
                                                        lambda: fgsm(model, x, y, 0.3)), "y": y}
        log(f"fgsm on {target}: {time.time() - t0:.0f}s")
        t0 = time.time()

        def run_pgd() -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            return torch.cat([pgd(model, x[i:min(i + 250, pgd_n)], y[i:min(i + 250, pgd_n)],
                                  0.3, steps=40, step_size=0.01, generator=gen) for i in range(0, pgd_n, 250)])
        attacks[f"pgd40_0.3@{target}"] = {"x": cache.get({**key, "attack": "pgd40", "eps": 0.3, "n": pgd_n,
                                                          "step_size": 0.01, "seed": 0}, run_pgd), "y": y[:pgd_n]}
        log(f"pgd-40 on {target}: {time.time() - t0:.0f}s")
        t0 = time.time()
        n_cw = cw_n if target == "base" else gb_cw_n
        attacks[f"cw_l2@{target}"] = {"x": cw_l2(
            model, cw_x[:n_cw], cw_y[:n_cw], **cw_cfg, batch_size=args.cw_batch,
            cache=lambda i, compute, key=key: cache.get({**key, **cw_cfg, "attack": "cw_l2", "start": i,
                                                         "batch": args.cw_batch}, compute)), "y": cw_y[:n_cw]}
        log(f"cw-l2 on {target}: {time.time() - t0:.0f}s")
    if args.attacks_only:
        return 0
    for name, a in attacks.items():
        model = base if name.endswith("@base") else fp_net
        with torch.no_grad():
            a["success"] = float((model(a["x"]).argmax(1) != a["y"]).float().mean())
        a["mean_l2"] = float((a["x"] - x[:len(a["x"])]).flatten(1).norm(dim=1).mean())

    results: dict[str, Any] = {"bundle": str(args.bundle), "bundle_version": bundle.version,
                               "test_digits": len(x), "pgd_digits": pgd_n, "cw_digits": cw_n,
                               "graybox_cw_digits": gb_cw_n,
                               "cw": cw_cfg,
                               "pgd": {"steps": 40, "eps": 0.3, "step_size": 0.01, "random_start": True},
                               "attacks": {k: {"success_rate_on_target": round(v["success"], 4),
                                               "mean_l2": round(v["mean_l2"], 4), "n": len(v["y"])}
                                           for k, v in attacks.items()},
                               "pipelines": {}}

    # clean and oblivious (base-classifier) attacks, every pipeline
    rows = []
    for name, p in pipes.items():
        st, lab = run_pipeline(p, x)
        rej = torch.tensor([s == "rejected" for s in st])
        entry: dict[str, Any] = {"clean_fpr": round(float(rej.float().mean()), 4),
                                 "clean_accuracy": round(float((lab == y).float().mean()), 4)}
        row = [name, entry["clean_fpr"], entry["clean_accuracy"]]
        for atk in ("fgsm_0.3@base", "pgd40_0.3@base", "cw_l2@base"):
            a = attacks[atk]
            st_a, lab_a = run_pipeline(p, a["x"])
            rej_a = torch.tensor([s == "rejected" for s in st_a])
            ok = rej_a | (lab_a == a["y"])
            entry[atk] = {"rejected_or_correct": round(float(ok.float().mean()), 4),
                          "rejected": round(float(rej_a.float().mean()), 4),
                          "accepted_and_correct": round(float(((~rej_a) & (lab_a == a["y"])).float().mean()), 4)}
            row.append(entry[atk]["rejected_or_correct"])
        results["pipelines"][name] = entry
        rows.append(row)
        log(f"pipeline {name} evaluated")

    # NeuralFP gray-box AUC-ROC
    clean_scores = fp_detector.detect(x, base, RunContext())[0].scores
    auc_rows = []
    results["neuralfp_graybox"] = {}
    for atk in ("fgsm_0.3@fingerprinted", "pgd40_0.3@fingerprinted", "cw_l2@fingerprinted"):
        a = attacks[atk]
        s = fp_detector.detect(a["x"], base, RunContext())[0].scores
        with torch.no_grad():
            fooled = fp_net(a["x"]).argmax(1) != a["y"]
        neg = clean_scores  # every clean test digit is a negative
        auc_all = auc_roc(neg, s)
        auc_succ = auc_roc(neg, s[fooled])
        det = float((s > fp_detector.threshold).float().mean())
        det_succ = float((s[fooled] > fp_detector.threshold).float().mean()) if fooled.any() else float("nan")
        results["neuralfp_graybox"][atk] = {"auc_all": round(auc_all, 4), "auc_successful": round(auc_succ, 4),
                                            "successful": int(fooled.sum()), "n": len(s),
                                            "rejected_at_tau": round(det, 4),
                                            "successful_rejected_at_tau": round(det_succ, 4)}
        auc_rows.append([atk, len(s), int(fooled.sum()), auc_all, auc_succ, det_succ])

    # latency relative to baseline, same run: pipelines interleaved round by round so that
    # load from other processes falls on all of them alike
    results["latency"] = {}
    lat_rows = []
    for bsz, rounds in ((1, 30), (100, 5)):
        times: dict[str, list[float]] = {n: [] for n in pipes}
        for k in range(rounds + 1):
            xb = x[(k * bsz) % len(x):(k * bsz) % len(x) + bsz]
            for name, p in pipes.items():
                t0 = time.perf_counter()
                p.run(xb, RunContext(seed=0))
                if k:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
        base_t = statistics.median(times["baseline"])
        for name in pipes:
            t = statistics.median(times[name])
            results["latency"].setdefault(name, {})[f"batch_{bsz}"] = {"median_s": round(t, 6),
                                                                       "ratio_to_baseline": round(t / base_t, 2)}
    for name in pipes:
        lat = results["latency"][name]
        lat_rows.append([name, lat["batch_1"]["median_s"] * 1000, lat["batch_1"]["ratio_to_baseline"],
                         lat["batch_100"]["median_s"] * 1000, lat["batch_100"]["ratio_to_baseline"]])

    results["seconds"] = round(time.time() - started, 1)
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    results["command"] = "python bench/detectors.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    print(f"\nAttacks ({len(x)} test digits; PGD-40 on the first {pgd_n}, CW-L2 on the first {cw_n} "
          f"({gb_cw_n} on the fingerprinted network), stratified)")
    print(table([[k, v["n"], v["success_rate_on_target"], v["mean_l2"]] for k, v in results["attacks"].items()],
                ["attack@target", "n", "success on target", "mean L2"]))
    print("\nClean and oblivious attacks (computed on the base classifier): share rejected or classified correctly")
    print(table(rows, ["pipeline", "clean FPR", "clean acc", "FGSM 0.3", "PGD-40 0.3", "CW-L2"]))
    print("\nNeuralFP gray-box (attacks on the fingerprinted network's logits): detection AUC-ROC vs clean")
    print(table(auc_rows, ["attack", "n", "successful", "AUC all", "AUC successful", "rejected@tau (succ.)"]))
    print("\nLatency (median per pipeline.run call), ratio to baseline in the same run")
    print(table(lat_rows, ["pipeline", "batch 1 ms", "x baseline", "batch 100 ms", "x baseline"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out} in {results['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
