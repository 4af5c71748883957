"""Bring your own model, example 2: 32x32 RGB patches of scikit-learn's two sample photographs
(`load_sample_images`: china.jpg and flower.jpg), labelled by photograph and quadrant (8
classes), and a small CNN of the user's own given to shieldserve by `import:`.

    python -m examples.sample_photos --out /tmp/byom-photos   # from the repository's root
    shieldserve train --out /tmp/byom-photos/bundle --dataset npz:/tmp/byom-photos/photo_patches.npz \
        --classifier import:examples.photo_cnn:PhotoCNN \
        --classifier-weights /tmp/byom-photos/photo_cnn.safetensors

Patches are cropped at random places of their quadrant, so a test patch may overlap training
ones (as tiles of one scene do; with test patches from a held-out strip of each quadrant the
task becomes one of telling textures apart, which this small CNN does at ~47%).
`photo_patches.npz` holds x_* as float32 in [0, 1], shape (N, 3, 32, 32); 300 train and 100
test patches per class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from examples.photo_cnn import PhotoCNN

SIDE = 32


def load(train_per_class: int = 300, test_per_class: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    names, xs = [], {"train": [], "test": []}
    ys: dict[str, list[int]] = {"train": [], "test": []}
    for p, (image, file) in enumerate(zip(photos.images, photos.filenames)):
        h, w = image.shape[0] // 2, image.shape[1] // 2
        for q, (r0, c0) in enumerate([(0, 0), (0, w), (h, 0), (h, w)]):
            label = 4 * p + q
            names.append(f"{Path(file).stem}/{['top-left', 'top-right', 'bottom-left', 'bottom-right'][q]}")
            for split, n in (("train", train_per_class), ("test", test_per_class)):
                for _ in range(n):
                    r, c = int(rng.integers(r0, r0 + h - SIDE + 1)), int(rng.integers(c0, c0 + w - SIDE + 1))
                    xs[split].append(image[r:r + SIDE, c:c + SIDE].transpose(2, 0, 1))
                    ys[split].append(label)
    out = {f"x_{s}": (np.stack(xs[s]).astype(np.float32) / 255.0) for s in xs}
    out.update({f"y_{s}": np.asarray(ys[s], dtype=np.int64) for s in ys})
    out["class_names"] = np.array(names)
    return out


def train(data: dict[str, np.ndarray], epochs: int = 10, seed: int = 0) -> PhotoCNN:
    torch.manual_seed(seed)
    net = PhotoCNN()
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb, xb.flip(3))  # mirror half
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(seed=args.seed)
    np.savez(out / "photo_patches.npz", **data)
    net = train(data, args.epochs, args.seed)
    with torch.no_grad():
        acc = float((net(torch.from_numpy(data["x_test"])).argmax(1).numpy() == data["y_test"]).mean())
    save_file(net.state_dict(), str(out / "photo_cnn.safetensors"))
    print(f"wrote {out / 'photo_patches.npz'} ({len(data['y_train'])} train, {len(data['y_test'])} test) "
          f"and {out / 'photo_cnn.safetensors'} (test accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
