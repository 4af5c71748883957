"""Per-pipeline throughput over HTTP, old code against this checkout, in alternating windows.

    .venv/bin/python bench/pipelines.py [--old-ref 0.6.0's commit | --old DIR]
        [--pipelines baseline,magnet,...] [--clients 1,8] [--scale 1.0] [--out FILE]

Two servers run side by side on 127.0.0.1, each `python -m service serve` from its own tree
(the old one from `git archive OLD_REF`, this checkout's), both on the same bundle
(models/default unless --bundle) with their own default settings (no SHIELDSERVE_* and no
OMP_NUM_THREADS from the caller's environment): only one is driven at a time, the other
idles. For each pipeline and client count the two are measured in turn, old then new, then
new then old for the next (the order alternates, so a drift in the machine's load favours
neither); `--repeats N` measures N such pairs. Each client POSTs a real test digit as a PNG to
/predict?pipeline=NAME (one image per request) and sends its next request when the answer is
complete (bench/serving.py's load driver, in its own process); images/s is the count of 200
answers completed inside the window. Slow pipelines (seconds per batch) get longer windows
(`WINDOWS`, times --scale).

Prints a table with the load average before each window and writes JSON to
`bench/results/pipelines.json` (git-ignored). Goals (issue 17): `default`, `smoothing`,
`denoised`, `rmc`, `defensegan` >= 1.6x the old code on 2 cores; `baseline`, `magnet` >= 0.8x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

HOST = "127.0.0.1"
OLD_REF = "b1d3fb7"  # 0.6.0
# (warm-up s, window s) per pipeline at 1 client and at more: a window holds several batches
# even of the slow ones (denoised: ~1 s per image on a quiet 2-core machine, and 8 clients
# make batches of 8), and the warm-up lets the first full batch finish before it opens
WINDOWS = {"baseline": ((1, 4), (1, 4)), "magnet": ((1, 4), (1, 4)), "neuralfp": ((1, 4), (1, 4)),
           "default": ((2, 6), (2, 8)), "smoothing": ((2, 6), (2, 8)), "rmc": ((2, 8), (4, 10)),
           "defensegan": ((4, 12), (15, 30)), "denoised": ((6, 15), (30, 60))}
GOALS = {"default": 1.6, "smoothing": 1.6, "denoised": 1.6, "rmc": 1.6, "defensegan": 1.6,
         "baseline": 0.8, "magnet": 0.8}


def server(name: str, tree: Path, bundle: Path, logdir: Path, torch_threads: int = 0) -> common.ServerProcess:
    """`python -m service serve` from `tree`, on `bundle`, with that tree's default settings."""
    from serving import _free_port

    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SHIELDSERVE_") and k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    env.update({"SHIELDSERVE_BUNDLE": str(bundle), "SHIELDSERVE_LOG_LEVEL": "warning",
                "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"})
    if torch_threads:  # both sides the same count (0: each side's own default)
        env["SHIELDSERVE_TORCH_THREADS"] = str(torch_threads)
    return common.ServerProcess(f"server-{name}", [sys.executable, "-m", "service", "serve", "--host", HOST,
                                                   "--port", str(port)], env, tree, port, "/readyz", logdir)


def old_tree(args: argparse.Namespace, workdir: Path) -> Path:
    if args.old:
        return Path(args.old).resolve()
    out = workdir / "old"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(common.REPO_ROOT), "archive", args.old_ref],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


def requests_for(pipelines: list[str], n: int) -> dict[str, list[bytes]]:
    pngs = common.digit_pngs(n)
    host = b"Host: 127.0.0.1\r\n"
    return {p: [b"POST /predict?pipeline=" + p.encode() + b" HTTP/1.1\r\n" + host
                + b"Content-Type: image/png\r\nContent-Length: " + str(len(png)).encode() + b"\r\n\r\n" + png
                for png in pngs] for p in pipelines}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-ref", default=OLD_REF, help="git ref of the old code (default: 0.6.0)")
    p.add_argument("--old", help="a tree of the old code instead of --old-ref")
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--pipelines", default="baseline,magnet,default,smoothing,denoised,rmc,defensegan")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--repeats", type=int, default=1, help="old/new pairs per pipeline and client count")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every warm-up and window")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch_threads of both servers (0: each side's default)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    pipelines = args.pipelines.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    bundle = Path(args.bundle).resolve()
    started = common.now_iso()
    rows, windows = [], []
    with tempfile.TemporaryDirectory(prefix="shieldserve-pipelines-") as tmp:
        workdir = Path(tmp)
        requests_file = workdir / "requests.json"
        common.write_requests(requests_file, requests_for(pipelines, 64))
        old = old_tree(args, workdir)
        servers = {"old": server("old", old, bundle, workdir, args.torch_threads),
                   "new": server("new", common.REPO_ROOT, bundle, workdir, args.torch_threads)}
        try:
            for s in servers.values():
                s.wait_ready()
            common.log("both servers ready")
            flip = False
            for pipeline in pipelines:
                for c in clients:
                    warmup, duration = (v * args.scale for v in WINDOWS.get(pipeline, ((2, 6), (4, 12)))[c > 1])
                    rates: dict[str, list[float]] = {"old": [], "new": []}
                    loads = []
                    for _ in range(args.repeats):
                        for name in (("new", "old") if flip else ("old", "new")):
                            load = round(os.getloadavg()[0], 2)
                            r = common.drive_load(servers[name], pipeline, c, warmup, duration, workdir, requests_file)
                            if r["errors"]:
                                common.log(f"{name} {pipeline} x{c}: {r['errors']} errors: {r['error_examples'][:2]}")
                            rates[name].append(r["rps"])
                            loads.append(load)
                            windows.append({"code": name, "pipeline": pipeline, "clients": c, "load_before": load, **r})
                            common.log(f"{name:3} {pipeline:10} x{c}: {r['rps']:8.2f} images/s (load {load})")
                        flip = not flip
                    o, n = mean(rates["old"]), mean(rates["new"])
                    goal = GOALS.get(pipeline)
                    ratio = n / o if o else None
                    rows.append({"pipeline": pipeline, "clients": c, "old_img_s": o, "new_img_s": n, "ratio": ratio,
                                 "goal": goal, "met": None if goal is None or ratio is None else ("yes" if ratio >= goal else "no"),
                                 "load_avg": f"{min(loads):.2f}-{max(loads):.2f}"})
        finally:
            for s in servers.values():
                s.stop()
    common.print_table(rows, digits=2, title=f"images/s per pipeline, old ({args.old or args.old_ref}) vs this checkout")
    path = common.write_results("pipelines", {"started": started, "old": args.old or args.old_ref,
                                              "bundle": str(bundle), "rows": rows, "windows": windows},
                                out=args.out, started=started)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
