"""The event loop under hostile uploads: /healthz latency while 8 clients post bodies built to
cost the server Python steps (issue 17's finding 1 and its variants).

    .venv/bin/python bench/hostile_uploads.py [--bundle models/default] [--clients 8]
        [--seconds 5] [--payloads plain64,ztxt,text256,text1000,idat4000] [--old DIR] [--out FILE]

A server (`python -m service serve`, the bundle given) is started, and with `--old DIR` a
second one from an older tree (`git archive REV | tar -x -C DIR`), measured payload by payload
alternately with the first (one at a time under load); for each payload, the
clients (threads of one process of their own, keep-alive connections) post it in a loop to
/predict?pipeline=baseline for `--seconds`, while this process probes GET /healthz every 10 ms
on a connection of its own. Prints, per payload, /healthz p50/p95/max and the clients'
answers; writes JSON to bench/results/hostile_uploads.json. Issue 17's goal: /healthz p95
<= 50 ms under the inflating PNG.

Payloads (one request each):
  none      no load: /healthz alone
  plain64   64 ordinary 28x28 PNGs, multipart (the control)
  ztxt      the issue's 63 KB 27x27 PNG with 60 zTXt chunks inflating to 1 MiB each, raw
  text256   64 PNGs of 256 tEXt chunks each, multipart (each within the per-image bounds)
  text1000  64 PNGs of 1,000 tEXt chunks each, multipart
  idat4000  64 PNGs of 4,000 IDAT chunks each, multipart
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PATH = "/predict?pipeline=baseline"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int = 28, height: int = 28, before: bytes = b"", idat_pieces: int = 1) -> bytes:
    """A gray PNG: `before` (chunks) after IHDR, its image data in `idat_pieces` IDAT chunks."""
    raw = b"".join(b"\0" + bytes((x * 7 + y * 3) % 256 for x in range(width)) for y in range(height))
    z = zlib.compress(raw)
    cuts = [z[j * len(z) // idat_pieces:(j + 1) * len(z) // idat_pieces] for j in range(idat_pieces)]
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + before
            + b"".join(_chunk(b"IDAT", c) for c in cuts) + _chunk(b"IEND", b""))


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = b"hostileUploadsBoundary"
    parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
             b"Content-Type: image/png\r\n\r\n" + f + b"\r\n" for f in files]
    return b"".join(parts) + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


def payload(name: str) -> tuple[bytes, str]:
    if name == "plain64":
        return _multipart([_png()] * 64)
    if name == "ztxt":
        z = zlib.compress(b"\0" * (1 << 20), 9)
        return _png(27, 27, _chunk(b"zTXt", b"Comment\0\0" + z) * 60), "image/png"
    if name == "text256":
        return _multipart([_png(before=_chunk(b"tEXt", b"k\0v") * 256)] * 64)
    if name == "text1000":
        return _multipart([_png(before=_chunk(b"tEXt", b"k\0v") * 1000)] * 64)
    if name == "idat4000":
        return _multipart([_png(idat_pieces=4000)] * 64)
    raise SystemExit(f"unknown payload {name!r}")


def _senders(port: int, body_path: str, ctype: str, clients: int, seconds: float, queue) -> None:
    """The clients, in a process of their own: each posts the body in a loop on one connection."""
    body = Path(body_path).read_bytes()
    counts: Counter = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < end:
            try:
                conn.request("POST", PATH, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except OSError as exc:
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                counts[status] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(dict(counts))


def measure(port: int, name: str, clients: int, seconds: float, workdir: Path) -> dict:
    senders = None
    queue = multiprocessing.get_context("spawn").Queue()
    size = 0
    if name != "none":
        body, ctype = payload(name)
        size = len(body)
        body_path = workdir / f"{name}.body"
        body_path.write_bytes(body)
        senders = multiprocessing.get_context("spawn").Process(
            target=_senders, args=(port, str(body_path), ctype, clients, seconds + 0.5, queue))
        senders.start()
        time.sleep(0.5)  # the clients are at it
    latencies = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        r.read()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    conn.close()
    answers = {}
    if senders is not None:
        answers = queue.get(timeout=120)
        senders.join(timeout=60)
    ms = sorted(v * 1000 for v in latencies)
    return {"payload": name, "bytes": size, "probes": len(ms), "healthz_p50_ms": common.percentile(ms, 50),
            "healthz_p95_ms": common.percentile(ms, 95), "healthz_max_ms": ms[-1],
            "answers": " ".join(f"{k}:{v}" for k, v in sorted(answers.items(), key=str))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--payloads", default="none,plain64,ztxt,text256,text1000,idat4000")
    ap.add_argument("--old", help="an older tree of the project: its server measured alternately")
    ap.add_argument("--out")
    args = ap.parse_args()
    started = common.now_iso()
    import socket

    trees = [("this", common.REPO_ROOT)] + ([("old", Path(args.old).resolve())] if args.old else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers = {}
        try:
            for label, tree in trees:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                env = dict(os.environ, SHIELDSERVE_BUNDLE=str(Path(args.bundle).resolve()), SHIELDSERVE_PROGRESS="0",
                           SHIELDSERVE_LOG_LEVEL="warning", PYTHONPATH=str(tree))
                servers[label] = common.ServerProcess(label, [sys.executable, "-m", "service", "serve", "--host",
                                                              "127.0.0.1", "--port", str(port)], env, tree, port,
                                                      "/readyz", workdir)
            for server in servers.values():
                server.wait_ready()
            for name in args.payloads.split(","):
                for label, server in servers.items():
                    rows.append({"server": label, **measure(server.port, name, args.clients, args.seconds, workdir)})
                    common.log(f"{label} {name}: /healthz p95 {rows[-1]['healthz_p95_ms']:.1f} ms")
        finally:
            for server in servers.values():
                server.stop()
    common.print_table(rows, ["server", "payload", "bytes", "probes", "healthz_p50_ms", "healthz_p95_ms",
                              "healthz_max_ms", "answers"])
    path = common.write_results("hostile_uploads", {"clients": args.clients, "seconds": args.seconds,
                                                    "bundle": args.bundle, "old": args.old, "rows": rows},
                                out=args.out, started=started)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
