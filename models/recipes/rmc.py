"""RMC's build step: the augmented set D′ and its FAISS index over the base network's features.

D′ = the training split (clean) + PGD L-inf copies of it at several step counts, all against
the frozen base classifier, as the reference builds it (PGD-10, -30, -100). The reference
keeps a full copy per step count (|D′| = 4|D|); to keep the bundle small each copy here is
made from a different, class-stratified `adv_fraction` of the training split (0.2 by
default: |D′| = 1.6|D|, 5,600 images for mnist5k, ~8.6 MiB with the index). Images are
stored as uint8 and the index is built from the features of the stored (rounded) images, so
what is searched is exactly what is fine-tuned on.

Artifacts: `rmc_dataset` (images uint8 (N,C,H,W), labels, pgd_steps per row: 0 = clean) and
`rmc_index` (the FAISS index, `faiss.serialize_index` bytes as a uint8 tensor: no pickle).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from models.recipes.common import progress, seeded


@dataclass(frozen=True)
class RmcRecipe:
    eps: float = 0.3
    pgd_steps: tuple[int, ...] = (10, 30, 100)
    adv_fraction: float = 0.2      # share of the train split each PGD copy is made from
    index: str = "flat"            # flat (exact IndexFlatL2) | ivf | hnsw
    nlist: int = 64                # ivf
    hnsw_m: int = 32               # hnsw
    # serving defaults written to the manifest (a pipeline's options override them)
    k: int | str = "auto"
    lr: float = 3e-3
    steps: int = 20
    patience: int = 3
    stop_loss: float = 0.01
    trainable: str = "auto"        # auto: service.defenses.rmc.default_trainable (head | last | all)
    # the manifest's metrics: K-nearest-neighbour vote on validation images
    eval_images: int = 500
    eval_pgd_steps: int = 40

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, RmcRecipe] = {
    "default": RmcRecipe(eval_images=200),
    "quick": RmcRecipe(pgd_steps=(2, 4, 8), adv_fraction=0.1, eval_images=100, eval_pgd_steps=5),
}


def recipe(preset: str, **overrides: Any) -> RmcRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if "pgd_steps" in overrides:
        overrides["pgd_steps"] = tuple(int(s) for s in overrides["pgd_steps"])
    return replace(PRESETS[preset], **overrides)


def adversarial_subsets(y: torch.Tensor, copies: int, fraction: float, g: torch.Generator) -> list[torch.Tensor]:
    """Row ids for each PGD copy: class-stratified, disjoint while copies * fraction <= 1."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(copies)]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        m = max(1, round(fraction * len(idx)))
        for i in range(copies):
            parts[i].append(idx[torch.arange(i * m, (i + 1) * m) % len(idx)])
    return [torch.sort(torch.cat(p)).values for p in parts]


def pgd_batches(classifier: Any, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                g: torch.Generator, device: torch.device, bar: Any, batch_size: int = 500) -> torch.Tensor:
    from service.attacks import pgd

    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out.append(pgd(classifier, xb, yb, eps, steps=steps, generator=g).cpu())
        bar.update(1)
    return torch.cat(out) if out else x[:0]


@torch.no_grad()
def knn_vote_accuracy(index: Any, feats: torch.Tensor, labels: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """How often the majority label of the K neighbours is the true label (no fine-tuning)."""
    _, ids = index.search(feats, k)
    votes = torch.nn.functional.one_hot(labels[ids.clamp_min(0)], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == y).float().mean())


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    from models.features import FeatureError
    from service.defenses.rmc import (
        FaissIndex, Finetuner, build_faiss_index, default_trainable, extract_features, from_uint8, scaled_k,
        serialize_index, to_uint8,
    )

    r = recipe(ctx.preset, **ctx.options.get("rmc", {}))
    g = seeded(ctx.seed, "rmc")
    clf = ctx.classifier()
    try:
        clf.feature_extractor()
    except FeatureError as exc:
        raise ValueError(f"rmc: {exc}") from exc
    trainable = default_trainable(clf) if r.trainable == "auto" else r.trainable
    Finetuner(clf, trainable)  # fails here, with the reason, if it cannot fine-tune this network
    train = ctx.dataset.train
    started = time.monotonic()

    subsets = adversarial_subsets(train.y, len(r.pgd_steps), r.adv_fraction, g)
    total = sum(-(-len(s) // 500) for s in subsets)
    bar = progress(total, "rmc D′ (PGD copies)")
    images, labels, sources = [to_uint8(train.x)], [train.y], [torch.zeros(len(train), dtype=torch.int16)]
    for steps, rows in zip(r.pgd_steps, subsets):
        adv = pgd_batches(clf, train.x[rows], train.y[rows], r.eps, steps, g, ctx.device, bar)
        images.append(to_uint8(adv))
        labels.append(train.y[rows])
        sources.append(torch.full((len(rows),), steps, dtype=torch.int16))
    bar.close()
    images_u8, labels_all, sources_all = torch.cat(images), torch.cat(labels), torch.cat(sources)

    feats = extract_features(clf, from_uint8(images_u8).to(ctx.device)).cpu()
    index = build_faiss_index(feats, r.index, nlist=r.nlist, hnsw_m=r.hnsw_m, seed=ctx.seed)
    k = scaled_k(len(labels_all)) if r.k == "auto" else int(r.k)

    # the manifest's metrics: how pure the neighbourhoods are, clean and under attack
    val = ctx.dataset.val.per_class(max(1, r.eval_images // len(ctx.dataset.class_names)))
    search = FaissIndex(index, torch.device("cpu"))
    vx, vy = val.x.to(ctx.device), val.y.to(ctx.device)
    bar = progress(-(-len(val) // 500), "rmc metrics (PGD on val)")
    vadv = pgd_batches(clf, val.x, val.y, r.eps, r.eval_pgd_steps, g, ctx.device, bar).to(ctx.device)
    bar.close()
    with torch.no_grad():
        base_adv_acc = float((clf(vadv).argmax(1) == vy).float().mean())
    metrics = {
        "dprime": len(labels_all), "dprime_clean": len(train),
        "dprime_adversarial": {str(s): len(rows) for s, rows in zip(r.pgd_steps, subsets)},
        "feature_dim": int(feats.shape[1]),
        "val_images": len(val),
        "knn_vote_val_accuracy_clean": round(knn_vote_accuracy(search, extract_features(clf, vx).cpu(),
                                                               labels_all, val.y, k), 4),
        f"knn_vote_val_accuracy_pgd{r.eval_pgd_steps}": round(knn_vote_accuracy(
            search, extract_features(clf, vadv).cpu(), labels_all, val.y, k), 4),
        f"base_val_accuracy_pgd{r.eval_pgd_steps}": round(base_adv_acc, 4),
        "build_seconds": round(time.monotonic() - started, 1),
    }

    training = {"recipe": r.to_json(), "seed": ctx.seed}
    ctx.writer.add_tensors("rmc_dataset", {"images": images_u8, "labels": labels_all, "pgd_steps": sources_all},
                           training=training)
    ctx.writer.add_tensors("rmc_index", {"index": serialize_index(index)}, training=training,
                           index={"kind": r.index, "faiss_class": type(index).__name__,
                                  "metric": "L2", "ntotal": int(index.ntotal), "dim": int(feats.shape[1])})
    ctx.writer.set_defense("rmc", {
        "classifier_sha256": ctx.writer.manifest["artifacts"]["classifier"]["sha256"],
        "dprime": {"clean": "train split", "pgd": {"eps": r.eps, "norm": "linf", "steps": list(r.pgd_steps),
                                                   "fraction_of_train_each": r.adv_fraction}},
        "settings": {"k": k, "lr": r.lr, "steps": r.steps, "patience": r.patience,
                     "stop_loss": r.stop_loss, "trainable": trainable, "optimizer": "adam"},
        "features": clf.feature_extractor().describe(),
        "metrics": metrics,
    })
