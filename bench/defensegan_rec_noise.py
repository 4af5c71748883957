"""Defense-GAN experiment: does a Defense-GAN-Rec classifier trained on projections of
*randomly perturbed* training digits label FGSM projections better?

FGSM at eps 0.3 leaves hazy, grey-background projections (docs/defenses/defensegan.md, "Why
FGSM gets through"). If the Rec classifier only failed because it never saw such haze, training
it on projections of digits with random sign noise of the same size (+-0.3 on every pixel,
no gradient, so nothing of the attack) would fix it. This trains such a classifier the way the
recipe trains the bundle's (mnist_cnn width 16, hidden 128, Adam, cosine schedule, small
affine augmentation; projections with the recipe's cheap settings: 2 restarts, 40 steps) on
clean digits + their projections + the noisy digits' projections, then compares it with the
bundle's Rec classifier and the base classifier on stratified *validation* digits (never the
test split), clean and FGSM (computed on the base classifier), through the `default` projection.

Usage:
  OMP_NUM_THREADS=1 PYTHONPATH=. python bench/defensegan_rec_noise.py --bundle models/default \\
      --per-class 10 --epochs 8
Writes bench/results/defensegan_rec_noise.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

from models.architectures import MnistCNN  # noqa: E402
from models.bundle import Bundle  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from models.recipes.common import batches, random_affine  # noqa: E402
from service.attacks import fgsm  # noqa: E402
from service.defenses.defensegan import project, settings_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    ap.add_argument("--per-class", type=int, default=10, help="validation digits per class")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = common.now_iso()
    t0 = time.monotonic()
    bundle = Bundle.load(args.bundle)
    sec = bundle.defense("defensegan")
    gen, enc, clf = bundle.module(sec["generator"]), bundle.module(sec["encoder"]), bundle.classifier()
    rec_bundle = bundle.module(sec["classifier"])
    ds = load_dataset(bundle.manifest.get("build", {}).get("dataset", "mnist5k"))
    x_train, y_train = ds.train.x, ds.train.y
    g = torch.Generator().manual_seed(args.seed)
    rng = torch.Generator().manual_seed(args.seed + 1)
    cheap = replace(settings_for("default", sec), restarts=2, steps=40)  # the recipe's rec_projection

    def project_all(x: torch.Tensor, what: str) -> torch.Tensor:
        out = []
        for i in range(0, len(x), 100):
            out.append(project(gen, x[i:i + 100], cheap, encoder=enc, rng=rng).x)
        common.log(f"projected {len(x)} {what} training digits ({time.monotonic() - t0:.0f}s)")
        return torch.cat(out)

    noisy = (x_train + args.eps * torch.sign(torch.randn(x_train.shape, generator=g))).clamp(0, 1)
    proj_clean, proj_noisy = project_all(x_train, "clean"), project_all(noisy, "noisy")

    net = MnistCNN(x_train.shape[1], len(ds.class_names), x_train.shape[2], width=16, hidden=128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * math.ceil(len(x_train) / 64))
    net.train()
    for _ in range(args.epochs):
        for idx in batches(len(x_train), 64, g):
            xb = random_affine(torch.cat([proj_clean[idx], proj_noisy[idx], x_train[idx]]), g, 1.0, 5.0, 0.05)
            loss = F.cross_entropy(net(xb), torch.cat([y_train[idx]] * 3))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    common.log(f"trained the noise-augmented Rec classifier ({time.monotonic() - t0:.0f}s)")

    val = ds.val.per_class(args.per_class)
    x_adv = fgsm(clf, val.x, val.y, args.eps)
    s = settings_for("default", sec)
    p_clean = project(gen, val.x, s, encoder=enc, rng=torch.Generator().manual_seed(0)).x
    p_adv = project(gen, x_adv, s, encoder=enc, rng=torch.Generator().manual_seed(1)).x

    def acc(model: torch.nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            return round(float((model(x).argmax(1) == val.y).float().mean()), 3)

    rows = [{"classifier on G(z*)": name, "clean": acc(m, p_clean), "FGSM": acc(m, p_adv)}
            for name, m in (("base", clf), ("Rec (bundle)", rec_bundle), ("Rec (+ noisy projections)", net))]
    common.print_table(rows, ["classifier on G(z*)", "clean", "FGSM"], digits=3,
                       title=f"{len(val)} validation digits, FGSM eps {args.eps} on the base classifier, "
                             f"default projection")
    path = common.write_results("defensegan_rec_noise", {
        "settings": vars(args), "validation_digits": len(val), "rows": rows,
        "seconds": round(time.monotonic() - t0, 1)}, out=args.out, started=started)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
