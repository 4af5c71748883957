"""Post test images from an .npz to a running shieldserve and count the answers per pipeline.

    shieldserve serve &    # SHIELDSERVE_BUNDLE=/tmp/digits/bundle
    python examples/check_service.py --url http://127.0.0.1:8000 --npz /tmp/digits/uci_digits.npz --limit 100

Prints, for every pipeline the service serves, how many of the first `--limit` test images
(stratified by class) it answered right, rejected or abstained on, and the pipelines it left
out with the reason. Plain HTTP with the standard library: what any client does.
"""

from __future__ import annotations

import argparse
import io
import json
import urllib.request
import uuid

import numpy as np


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    a = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def predict(url: str, pipeline: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}/predict?pipeline={pipeline}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["results"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--npz", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--pipelines", help="comma-separated (default: every pipeline served)")
    args = ap.parse_args()
    with np.load(args.npz, allow_pickle=False) as f:
        x, y = f["x_test"].astype(np.float32), f["y_test"].astype(np.int64)
    if x.max() > 1:
        x = x / 255.0
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    classes = np.unique(y)
    per = -(-args.limit // len(classes))
    idx = np.stack([np.flatnonzero(y == c)[:per] for c in classes], 1).reshape(-1)[:args.limit]
    with urllib.request.urlopen(f"{args.url}/pipelines", timeout=30) as r:
        info = json.loads(r.read())
    names = args.pipelines.split(",") if args.pipelines else [p["name"] for p in info["pipelines"]]
    print(f"default pipeline: {info['default']}")
    for name, why in info.get("unavailable", {}).items():
        print(f"not served: {name}: {why}")
    print(f"{'pipeline':<12} {'right':>7} {'rejected':>9} {'abstained':>10}  ({len(idx)} test images over HTTP)")
    for name in names:
        right = rejected = abstained = 0
        for i in idx:
            out = predict(args.url, name, png(x[i]))
            status = out.get("status")
            right += status == "accepted" and out.get("label") == int(y[i])
            rejected += status == "rejected"
            abstained += status == "abstained"
        n = len(idx)
        print(f"{name:<12} {right / n:>7.3f} {rejected / n:>9.3f} {abstained / n:>10.3f}")


if __name__ == "__main__":
    main()
