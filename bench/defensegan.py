"""Defense-GAN benchmark: the `defensegan` pipeline on the mnist5k test split, one run.

  * clean accuracy of the `defensegan` pipeline (goal >= 95%), on all test digits: its own
    purifier component, G(z*) labelled by the base classifier (what the pipeline serves) and by
    the Defense-GAN-Rec classifier (`classifier: rec`); `Pipeline.run` itself on the subset;
  * FGSM eps = 0.3 computed on the base classifier (oblivious attack), accuracy through the
    pipeline (goal >= 90%);
  * the projection's cost, `paper` (L = 200, R = 10) versus `default`, as ratios:
    generator forward+backward passes per image and wall time per image. `paper` costs
    2,000 passes per image, so it runs on a stratified subset (--paper-per-class digits of
    each class, clean and FGSM); `default` runs on all digits and on that same subset, and the
    ratios compare the two on the subset;
  * mean reconstruction error ||G(z*) - x||^2 (per pixel), default versus paper on the subset;
  * the optional error detector at its calibrated threshold: clean and FGSM rejection rates.

Usage:
  OMP_NUM_THREADS=1 PYTHONPATH=. python bench/defensegan.py --bundle models/default [--paper-sphere]
(--paper-sphere: also `paper` with z on the sphere, the default projection's objective.)
Prints a table and writes bench/results/defensegan.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import now_iso, write_results  # noqa: E402
from models.bundle import Bundle  # noqa: E402
from models.datasets import Split, load_dataset  # noqa: E402
from service.attacks import fgsm  # noqa: E402
from service.defenses.base import DefenseEnv, RunContext  # noqa: E402
from service.defenses.defensegan import build as build_defense  # noqa: E402
from service.pipeline import Pipeline  # noqa: E402


def run_pipeline(pipeline: Pipeline, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> dict:
    """Through `Pipeline.run`: accuracy, per-image reconstruction error and generator passes,
    wall seconds per image."""
    labels, errors, evals = [], [], []
    seconds = 0.0
    for i in range(0, len(x), batch):
        ctx = RunContext(seed=seed + i)
        t0 = time.perf_counter()
        results = pipeline.run(x[i:i + batch], ctx)
        seconds += time.perf_counter() - t0
        for r in results:
            labels.append(r.label if r.label is not None else -1)
            stage = [s for s in r.stages if s.defense == "defensegan" and s.role == "purifier"]
            errors.append(stage[0].details["reconstruction_error"] if stage else float("nan"))
            evals.append(stage[0].details["generator_evals"] if stage else 0.0)
    labels_t, err_t, ev_t = torch.tensor(labels), torch.tensor(errors), torch.tensor(evals)
    return {"images": len(x), "accuracy": float((labels_t == y).float().mean()),
            "mean_reconstruction_error": float(err_t.mean()),
            "generator_evals_per_image": float(ev_t.mean()),
            "seconds_per_image": seconds / len(x), "errors": err_t}


def run_components(purifier, classifiers: dict, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> dict:
    """The pipeline's own purifier component, its output classified by each classifier (the
    projection is the cost; classifying it twice is not): accuracy per classifier."""
    labels: dict[str, list] = {k: [] for k in classifiers}
    errors, evals = [], []
    seconds = 0.0
    for i in range(0, len(x), batch):
        ctx = RunContext(seed=seed + i)
        t0 = time.perf_counter()
        out = purifier.purify(x[i:i + batch], None, ctx)
        seconds += time.perf_counter() - t0
        errors.append(out.details["reconstruction_error"])
        evals.append(out.details["generator_evals"])
        with torch.no_grad():
            for k, clf in classifiers.items():
                labels[k].append(clf(out.x).argmax(1))
    err_t, ev_t = torch.cat(errors), torch.cat(evals)
    row = {"images": len(x), "mean_reconstruction_error": float(err_t.mean()),
           "generator_evals_per_image": float(ev_t.mean()), "seconds_per_image": seconds / len(x),
           "errors": err_t}
    for k, lab in labels.items():
        row[f"accuracy_{k}"] = float((torch.cat(lab) == y).float().mean())
    row["accuracy"] = row["accuracy_base"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "models" / "default"))
    ap.add_argument("--limit", type=int, default=0, help="test digits for the default projection (0: all)")
    ap.add_argument("--paper-per-class", type=int, default=10, help="subset for `paper`: digits per class")
    ap.add_argument("--paper-sphere", action="store_true",
                    help="also run `paper` with z kept on the sphere (the default's objective) on the subset")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "defensegan.json"))
    args = ap.parse_args(argv)
    started_at = now_iso()
    torch.set_num_threads(1)

    bundle = Bundle.load(args.bundle)
    clf = bundle.classifier()
    env = DefenseEnv(bundle=bundle, classifier=clf, device=torch.device("cpu"))
    ds = load_dataset(bundle.manifest.get("build", {}).get("dataset", "mnist5k"))
    test = ds.test if not args.limit else ds.test.per_class(max(1, args.limit // 10))
    subset = ds.test.per_class(args.paper_per_class)
    section = bundle.defense("defensegan")
    threshold = float(section["detector"]["reconstruction_error"]["thresholds"]["reconstruction_error"])
    classifiers = {"base": clf}
    if section.get("classifier"):
        classifiers["rec"] = bundle.module(section["classifier"])

    def attack(s: Split) -> torch.Tensor:
        return torch.cat([fgsm(clf, s.x[i:i + 500], s.y[i:i + 500], args.eps) for i in range(0, len(s), 500)])

    x_adv, sub_adv = attack(test), attack(subset)
    with torch.no_grad():
        base = {"clean": float((clf(test.x).argmax(1) == test.y).float().mean()),
                "fgsm": float((clf(x_adv).argmax(1) == test.y).float().mean())}
    served = Pipeline.build("defensegan", {"defenses": [{"defense": "defensegan"}]}, env)
    purifiers = {"default": build_defense({"projection": "default", "classifier": "base"}, env)[0],
                 "paper": build_defense({"projection": "paper", "classifier": "base"}, env)[0]}
    if args.paper_sphere:
        purifiers["paper+sphere"] = build_defense({"projection": "paper", "classifier": "base",
                                                   "overrides": {"min_norm": 1.0, "max_norm": 1.0}}, env)[0]
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    rows["default/all"] = {"clean": run_components(purifiers["default"], classifiers, test.x, test.y, args.batch,
                                                   args.seed),
                           "fgsm": run_components(purifiers["default"], classifiers, x_adv, test.y, args.batch,
                                                  args.seed + 10_000)}
    print(f"  default/all: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    # the served pipeline itself (Pipeline.run, base classifier) on the subset: must agree with default/subset
    rows["pipeline/subset"] = {"clean": run_pipeline(served, subset.x, subset.y, args.batch, args.seed),
                               "fgsm": run_pipeline(served, sub_adv, subset.y, args.batch, args.seed + 10_000)}
    print(f"  pipeline/subset: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    for name, pur in purifiers.items():
        label = f"{name}/subset"
        rows[label] = {"clean": run_components(pur, classifiers, subset.x, subset.y, args.batch, args.seed),
                       "fgsm": run_components(pur, classifiers, sub_adv, subset.y, args.batch, args.seed + 10_000)}
        print(f"  {label}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)

    d, p = rows["default/subset"], rows["paper/subset"]
    kinds = ("clean", "fgsm")
    evals_ratio = {k: p[k]["generator_evals_per_image"] / d[k]["generator_evals_per_image"] for k in kinds}
    time_ratio = {k: p[k]["seconds_per_image"] / d[k]["seconds_per_image"] for k in kinds}
    err_ratio = {k: d[k]["mean_reconstruction_error"] / p[k]["mean_reconstruction_error"] for k in kinds}
    acc_diff = {f"{k}_{c}": 100 * (d[k][f"accuracy_{c}"] - p[k][f"accuracy_{c}"]) for k in kinds for c in classifiers}
    all_ = rows["default/all"]
    detector = {"threshold": threshold,
                "clean_rejection_rate": float((all_["clean"]["errors"] > threshold).float().mean()),
                "fgsm_rejection_rate": float((all_["fgsm"]["errors"] > threshold).float().mean())}
    goals = {
        "clean_accuracy_>=_0.95": all_["clean"]["accuracy_base"] >= 0.95,
        "fgsm_accuracy_>=_0.90": all_["fgsm"]["accuracy_base"] >= 0.90,
        "evals_ratio_>=_10": min(evals_ratio.values()) >= 10,
        "reconstruction_error_within_5%": max(err_ratio.values()) <= 1.05,
        "accuracy_within_1_point": min(acc_diff.values()) >= -1.0,
    }

    served_cls = "base"
    print(f"\nDefense-GAN on {ds.name} test ({len(test)} digits; `paper` on a stratified subset of "
          f"{len(subset)}, {args.paper_per_class} per class); FGSM eps={args.eps} on the base classifier")
    cls_cols = "".join(f"{'clean ' + c:>11}{'FGSM ' + c:>10}" for c in classifiers)
    print(f"{'run':<20}{'images':>7}{cls_cols}{'rec err clean':>15}{'rec err FGSM':>14}{'G evals/img':>13}{'s/img':>8}")
    print(f"{'no defense':<20}{len(test):>7}{base['clean']:>11.4f}{base['fgsm']:>10.4f}")
    for label, row in rows.items():
        c, a = row["clean"], row["fgsm"]
        evals = (c["generator_evals_per_image"] + a["generator_evals_per_image"]) / 2
        secs = (c["seconds_per_image"] + a["seconds_per_image"]) / 2
        if label.startswith("pipeline/"):
            accs = f"{c['accuracy']:>11.4f}{a['accuracy']:>10.4f}  (served: {served_cls} classifier)"
            print(f"{label:<20}{c['images']:>7}{accs}")
            print(f"{'':<20}{'':>7}{'':>{21 * len(classifiers)}}{c['mean_reconstruction_error']:>15.5f}"
                  f"{a['mean_reconstruction_error']:>14.5f}{evals:>13.1f}{secs:>8.3f}")
            continue
        accs = "".join(f"{c['accuracy_' + k]:>11.4f}{a['accuracy_' + k]:>10.4f}" for k in classifiers)
        print(f"{label:<20}{c['images']:>7}{accs}{c['mean_reconstruction_error']:>15.5f}"
              f"{a['mean_reconstruction_error']:>14.5f}{evals:>13.1f}{secs:>8.3f}")
    print("\nratios on the subset (paper / default):")
    for k in kinds:
        diffs = "  ".join(f"{c} {acc_diff[f'{k}_{c}']:+.1f} pt" for c in classifiers)
        print(f"  {k:<6} generator evals x{evals_ratio[k]:.1f}   wall time x{time_ratio[k]:.1f}   "
              f"rec err default/paper {err_ratio[k]:.3f}   accuracy default-paper: {diffs}")
    print(f"\nerror detector (threshold {threshold:.5f}, calibrated to 1% of validation): rejects "
          f"{detector['clean_rejection_rate']:.3f} of clean test digits, {detector['fgsm_rejection_rate']:.3f} of FGSM")
    print("goals: " + ", ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in goals.items()))

    out = {"bundle": str(args.bundle), "bundle_version": bundle.version, "dataset": ds.name, "eps": args.eps,
           "paper_subset": len(subset), "test_images": len(test), "no_defense": base,
           "served_classifier": served_cls,
           "runs": {k: {kk: {m: v for m, v in vv.items() if m != "errors"} for kk, vv in row.items()}
                    for k, row in rows.items()},
           "ratios_paper_over_default": {"generator_evals": evals_ratio, "wall_time": time_ratio},
           "reconstruction_error_default_over_paper": err_ratio, "accuracy_default_minus_paper_points": acc_diff,
           "detector": detector, "goals": goals,
           "command": "python bench/defensegan.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    path = write_results("defensegan", out, out=args.out, started=started_at)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
