"""Post test images from an .npz to a running shieldserve and count the answers per pipeline.

    # the bundle's TorchScript files run only where trusted by the sha256 `train` printed
    SHIELDSERVE_BUNDLE=/tmp/digits/bundle SHIELDSERVE_TRUSTED_IMPORTS='["torchscript:…"]' shieldserve serve &
    python examples/check_service.py --url http://127.0.0.1:8000 --npz /tmp/digits/uci_digits.npz --limit 100

Prints, for every pipeline the service serves, how many of the first `--limit` test images
(taken from each class in turn, so a short run covers every class) it answered right,
rejected or abstained on, and the pipelines it left out with the reason. Plain HTTP with the
standard library: what any client does. With `api_keys` on the server, pass `--api-key`.
"""

from __future__ import annotations

import argparse
import io
import json
import urllib.error
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


def fetch(req: urllib.request.Request | str, timeout: float) -> dict:
    """The JSON answer, or the program's end with one line saying why there is none."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # before URLError: it is one
        raise SystemExit(f"check_service: {exc.code} from the service: {exc.read()[:300].decode(errors='replace')}")
    except urllib.error.URLError as exc:
        raise SystemExit(f"check_service: cannot reach the service: {exc.reason}")


def predict(url: str, pipeline: str, data: bytes, headers: dict[str, str]) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}/predict?pipeline={pipeline}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **headers})
    return fetch(req, 300)["results"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--npz", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--pipelines", help="comma-separated (default: every pipeline served)")
    ap.add_argument("--api-key", help="sent as X-API-Key (the server's api_keys)")
    args = ap.parse_args()
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    try:
        with np.load(args.npz, allow_pickle=False) as f:
            x, y = f["x_test"].astype(np.float32), f["y_test"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"check_service: {args.npz} is not an .npz with x_test and y_test ({exc})")
    if x.max() > 1:
        x = x / 255.0
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3:  # (N, H, W) gray images
        x = x[:, None]
    # one of each class in turn; a class with fewer test images drops out when it has none left
    # (equal slices per class crashed past 10x the smallest class: --limit 500 on UCI's 400)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    idx = [ix[k] for k in range(max(map(len, by_class))) for ix in by_class if k < len(ix)][:args.limit]
    info = fetch(urllib.request.Request(f"{args.url}/pipelines", headers=headers), 30)
    names = args.pipelines.split(",") if args.pipelines else [p["name"] for p in info["pipelines"]]
    print(f"default pipeline: {info['default']}")
    for name, why in info.get("unavailable", {}).items():
        print(f"not served: {name}: {why}")
    print(f"{'pipeline':<12} {'right':>7} {'rejected':>9} {'abstained':>10}  ({len(idx)} test images over HTTP)")
    for name in names:
        right = rejected = abstained = 0
        for i in idx:
            out = predict(args.url, name, png(x[i]), headers)
            status = out.get("status")
            right += status == "accepted" and out.get("label") == int(y[i])
            rejected += status == "rejected"
            abstained += status == "abstained"
        n = len(idx)
        print(f"{name:<12} {right / n:>7.3f} {rejected / n:>9.3f} {abstained / n:>10.3f}")


if __name__ == "__main__":
    main()
