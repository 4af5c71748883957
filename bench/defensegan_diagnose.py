"""Defense-GAN diagnostics on validation digits: why does FGSM get through the projection?

For each projection variant (a preset plus ProjectionSettings overrides) on a stratified slice
of the validation split, clean and FGSM eps=0.3 (computed on the base classifier):
  * accuracy of the base classifier and of the Defense-GAN-Rec classifier on G(z*);
  * mean reconstruction error, generator passes per image, mean ||z*||;
  * `clean z better`: the share of FGSM digits whose *clean* digit's projection G(z*_clean)
    is closer to the FGSM input than the projection found for it. 0 means the search is not
    the problem: the least-squares optimum itself is another picture (the generator's range
    holds images that explain the perturbation better than the true digit does).

Usage (validation split only, never the test split):
  OMP_NUM_THREADS=1 PYTHONPATH=. python bench/defensegan_diagnose.py --bundle models/default --per-class 5 \
      default 'default:{"min_norm":0,"max_norm":0}' 'paper' 'paper:{"min_norm":1,"max_norm":1}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.bundle import Bundle  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from service.attacks import fgsm  # noqa: E402
from service.defenses.defensegan import project, settings_for  # noqa: E402


def val_shape(bundle: Bundle) -> tuple[int, int]:
    spec = bundle.input_spec
    return spec.shape[0], spec.shape[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "models" / "default"))
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--checkpoint", help="a training work directory (state.json + checkpoint.safetensors): "
                    "use its generator instead of the bundle's (no encoder: give variants with init random)")
    ap.add_argument("variants", nargs="*", default=["default", "paper"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bundle = Bundle.load(args.bundle)
    section = bundle.defense("defensegan")
    clf = bundle.classifier()
    gen = bundle.module(section["generator"])
    enc = bundle.module(section["encoder"])
    rec = bundle.module(section["classifier"]) if section.get("classifier") else None
    if args.checkpoint:
        from models.recipes.defensegan import Checkpoint, Generator, _unpack
        tensors, state = Checkpoint(Path(args.checkpoint)).load()  # type: ignore[misc]
        r = state["recipe"]
        gen = Generator(r["latent_dim"], r["width"], *val_shape(bundle))
        gen.load_state_dict(_unpack("gen", tensors))
        gen.eval()
        print(f"generator from {args.checkpoint}: width {r['width']}, step {state['generator_step']} "
              f"of {r['generator_steps']}")
        enc = None
    ds = load_dataset(bundle.manifest.get("build", {}).get("dataset", "mnist5k"))
    val = ds.val.per_class(args.per_class)
    x_adv = fgsm(clf, val.x, val.y, args.eps)

    def acc(model, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == val.y).float().mean())

    with torch.no_grad():
        line = f"{len(val)} validation digits; base classifier: clean {acc(clf, val.x):.2f}, FGSM {acc(clf, x_adv):.2f}"
        if enc is not None:
            line += f"; G(E(x)): clean {acc(clf, gen(enc(val.x))):.2f}, FGSM {acc(clf, gen(enc(x_adv))):.2f}"
        print(line)
    head = f"{'variant':<44}{'base cl':>8}{'base adv':>9}{'rec cl':>7}{'rec adv':>8}{'err cl':>9}{'err adv':>9}" \
           f"{'evals':>7}{'|z| adv':>8}{'clean z better':>15}{'s':>6}"
    print(head)
    for spec in args.variants:
        name, _, over = spec.partition(":")
        s = replace(settings_for(name, section), **json.loads(over or "{}"))
        t0 = time.perf_counter()
        pc = project(gen, val.x, s, encoder=enc, rng=torch.Generator().manual_seed(0))
        pa = project(gen, x_adv, s, encoder=enc, rng=torch.Generator().manual_seed(1))
        with torch.no_grad():
            err_clean_z = (gen(pc.z) - x_adv).pow(2).flatten(1).mean(1)
        better = float((err_clean_z < pa.error).float().mean())
        evals = float(torch.cat([pc.generator_evals, pa.generator_evals]).float().mean())
        r_cl = f"{acc(rec, pc.x):>7.2f}{acc(rec, pa.x):>8.2f}" if rec is not None else f"{'-':>7}{'-':>8}"
        print(f"{spec:<44}{acc(clf, pc.x):>8.2f}{acc(clf, pa.x):>9.2f}{r_cl}{float(pc.error.mean()):>9.5f}"
              f"{float(pa.error.mean()):>9.5f}{evals:>7.0f}{float(pa.z.norm(dim=1).mean()):>8.1f}{better:>15.2f}"
              f"{time.perf_counter() - t0:>6.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
