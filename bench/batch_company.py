"""Does an image's answer depend on the other requests' images it is batched with?

    .venv/bin/python bench/batch_company.py [--pipelines baseline,magnet,defensegan,...]
        [--images 20] [--bundle models/default] [--out FILE]

The batcher merges requests of different clients into one batch, so the rule "one client's
request never changes another's answer" holds only as far as a pipeline's answer for an image
is independent of the rest of its batch. For each of the first `--images` test digits, the
pipeline runs it first in a batch (same seed, so the same noise: smoothing's per-image seed
is the batch's plus the index, Defense-GAN draws its restarts in row order) alone, then
followed by 3 and by 7 other images (test digits, the same digits with noise, blank images);
and last in a batch of 4 behind three such companies (the same row, seed and noise each time).
Prints, per pipeline, the largest change over those companies of: the label (flips), the
status (accepted/rejected/abstained flips), the top probability, every detector score (as a
share of the detector's threshold, where the pipeline has one) and the certified radius.
Writes bench/results/batch_company.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()


def thresholds_of(pipeline: Any) -> dict[str, float]:
    """'defense/detector' -> threshold, for the detectors that expose theirs."""
    out: dict[str, float] = {}
    for comp in pipeline.components:
        for name, value in (getattr(comp, "thresholds", None) or {}).items():
            out[f"{comp.defense}/{name}"] = float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", default="baseline,robust,magnet,neuralfp,rmc,defensegan,default,smoothing")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--out")
    args = p.parse_args()

    import torch

    from models.datasets import load_dataset
    from service.defenses.base import RunContext
    from service.runtime import Runtime
    from service.settings import load_settings

    rt = Runtime(load_settings(None, bundle=args.bundle, warmup=False, log_level="warning"))
    ds = load_dataset(rt.bundle.manifest.get("build", {}).get("dataset", "mnist5k"))
    x = ds.test.x.float()
    g = torch.Generator().manual_seed(0)
    others = x[-7:]
    companies = {
        "3 digits": others[:3],
        "7 digits": others,
        "7 noisy digits": (others + 0.35 * torch.randn(others.shape, generator=g)).clamp(0, 1),
        "7 blank": torch.zeros_like(others),
    }
    rows = []
    for name in args.pipelines.split(","):
        if name not in rt.pipelines:
            common.log(f"{name}: not served on this bundle, skipped")
            continue
        pipe = rt.pipelines[name]
        limits = thresholds_of(pipe)
        worst = {"label_flips": 0, "status_flips": 0, "max_d_prob": 0.0, "max_d_score_share": 0.0,
                 "max_d_score": 0.0, "max_d_radius": 0.0}
        details: dict[str, float] = {}
        started = time.monotonic()
        for i in range(args.images):
            me = x[i:i + 1]
            answers = []
            for company in [None, *companies.values()]:
                batch = me if company is None else torch.cat([me, company])
                ctx = RunContext(device=rt.device, seed=1234 + i, noise_key=rt.noise_key)  # as served
                answers.append(rt.compute.call(pipe.run, batch.to(rt.device), ctx)[0])
            # and last in a batch of 4, behind three different companies (its row, seed and noise
            # the same each time): only the others' pixels differ
            behind = []
            for company in companies.values():
                ctx = RunContext(device=rt.device, seed=1234 + i, noise_key=rt.noise_key)  # as served
                behind.append(rt.compute.call(pipe.run, torch.cat([company[:3], me]).to(rt.device), ctx)[3])
            for alone, other in [(answers[0], a) for a in answers[1:]] + [(behind[0], b) for b in behind[1:]]:
                worst["label_flips"] += other.label != alone.label
                worst["status_flips"] += other.status != alone.status
                if alone.probabilities and other.probabilities:
                    d = max(abs(a - b) for a, b in zip(alone.probabilities, other.probabilities))
                    worst["max_d_prob"] = max(worst["max_d_prob"], d)
                for stage, then in zip(alone.stages, other.stages):  # e.g. Defense-GAN's reconstruction error
                    for key, value in stage.details.items():
                        if isinstance(value, float) and isinstance(then.details.get(key), float):
                            d = abs(then.details[key] - value)
                            details[key] = max(details.get(key, 0.0), d)
                for key, score in alone.scores.items():
                    if key in other.scores:
                        d = abs(other.scores[key] - score)
                        worst["max_d_score"] = max(worst["max_d_score"], d)
                        if limits.get(key):
                            worst["max_d_score_share"] = max(worst["max_d_score_share"], d / abs(limits[key]))
                if alone.certified_radius is not None and other.certified_radius is not None:
                    worst["max_d_radius"] = max(worst["max_d_radius"],
                                                abs(other.certified_radius - alone.certified_radius))
        rows.append({"pipeline": name, "images": args.images, "companies": len(companies), **worst,
                     "max_d_details": "; ".join(f"{k} {v:.2e}" for k, v in sorted(details.items())) or "-",
                     "seconds": round(time.monotonic() - started, 1)})
        common.log(f"{name}: {rows[-1]}")

    columns = ["pipeline", "images", "companies", "label_flips", "status_flips", "max_d_prob", "max_d_score",
               "max_d_score_share", "max_d_radius", "max_d_details", "seconds"]
    print("an image alone vs followed by other images in its batch, and behind different ones (same seed, "
          "same noise); max_d_*: the "
          "largest change of the top probability, a detector score (absolute, and as a share of its "
          "threshold), the certified radius, each number a stage reports (Defense-GAN's reconstruction error, generator passes)")
    shown = [{k: (f"{v:.2e}" if isinstance(v, float) and k.startswith("max_d") else v) for k, v in r.items()}
             for r in rows]
    common.print_table(shown, columns)
    common.write_results("batch_company", {"argv": sys.argv, "companies": list(companies), "rows": rows},
                         out=args.out)


if __name__ == "__main__":
    main()
