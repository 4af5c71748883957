"""Bring your own model, example 1: scikit-learn's UCI handwritten digits (8x8, one channel,
10 classes) and a small MLP of the user's own, exported with `torch.jit.trace`.

    python examples/uci_digits.py --out /tmp/byom-digits
    shieldserve train --out /tmp/byom-digits/bundle --dataset npz:/tmp/byom-digits/uci_digits.npz \
        --classifier torchscript:/tmp/byom-digits/mlp.pt

Writes `uci_digits.npz` (x_* float32 in [0, 1], shape (N, 1, 8, 8); 1,397 train, 400 test,
stratified, fixed seed) and `mlp.pt` (the traced MLP). Nothing here uses shieldserve's code:
it stands for what a user already has.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # pixels 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=400, stratify=y, random_state=seed)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "class_names": np.array([str(i) for i in range(10)])}


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train(data: dict[str, np.ndarray], epochs: int = 60, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_mlp()
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(args.seed)
    np.savez(out / "uci_digits.npz", **data)
    net = train(data, args.epochs, args.seed)
    with torch.no_grad():
        acc = float((net(torch.from_numpy(data["x_test"])).argmax(1).numpy() == data["y_test"]).mean())
    traced = torch.jit.trace(net, torch.zeros(1, 1, 8, 8))
    traced.save(str(out / "mlp.pt"))
    print(f"wrote {out / 'uci_digits.npz'} ({len(data['y_train'])} train, {len(data['y_test'])} test) "
          f"and {out / 'mlp.pt'} (test accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
