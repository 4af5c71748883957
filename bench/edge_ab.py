"""A/B of the request edge: /predict and /v2 req/s on `baseline`, this checkout against another
(e.g. 0.6.0 unpacked by `git archive`), in alternating rounds on the same machine.

    flock /work/bench.lock .venv/bin/python bench/edge_ab.py --old /tmp/old_main --bundle DIR

Each round starts one server per code (`python -m service serve`, batching on, the same
bundle and settings), and drives it with bench/serving.py's closed-loop client from another
process: POST /predict (raw image/png bodies of 64 real test digits), POST
/v2/models/baseline/infer with the binary tensor extension (FP32 [1, 1, 28, 28], as
tritonclient sends it) and with a JSON body (UINT8 data), at --clients. Prints a table of
every window and the new/old ratio of the median windows; writes bench/results/edge_ab.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import serving  # noqa: E402

common.ensure_repo_on_path()


class Server(serving.Server):
    """serving.Server, run from `repo`'s code."""

    def __init__(self, repo: Path, *args: Any, **kwargs: Any) -> None:
        self.repo = repo
        import os

        os.environ["PYTHONPATH"] = str(repo)
        try:
            super().__init__(*args, **kwargs)
        finally:
            os.environ.pop("PYTHONPATH", None)

    def command(self) -> list[str]:
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(self.repo)!r}); "
                "from service.cli import main; sys.exit(main())", "serve", "--host", serving.HOST,
                "--port", str(self.port)]


def v2_requests(x: Any) -> dict[str, list[bytes]]:
    host = serving._HOST_PLACEHOLDER + b"\r\n"
    binary, js = [], []
    for img in x:
        tensor = img.reshape(1, 1, 28, 28).numpy().astype("<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(tensor)}}],
                             "outputs": [{"name": "label", "parameters": {"binary_data": False}}]}).encode()
        body = header + tensor
        binary.append(b"POST /v2/models/baseline/infer HTTP/1.1\r\n" + host
                      + b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
                      + str(len(header)).encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
        data = [int(round(float(v) * 255)) for v in img.reshape(-1)]
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8",
                                       "data": data}]}).encode()
        js.append(b"POST /v2/models/baseline/infer HTTP/1.1\r\n" + host
                  + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
    return {"v2_binary": binary, "v2_json": js}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the other checkout's root (the A side)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--targets", default="predict,v2_binary,v2_json")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    codes = {"old": Path(args.old).resolve(), "new": common.REPO_ROOT}
    requests, (x, _) = serving.load_requests(64)
    requests.update(v2_requests(x))
    started = common.now_iso()
    load_before = serving._loadavg()
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        drive_args = argparse.Namespace(duration=args.duration, warmup=args.warmup)
        for rnd in range(args.rounds):
            for label in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                server = Server(codes[label], Path(args.bundle), True, 64, 2.0, work)
                try:
                    server.wait_ready()
                    rf = work / f"requests-{server.port}.json"
                    common.write_requests(rf, {k: [r.replace(serving._HOST_PLACEHOLDER,
                                                             f"Host: {serving.HOST}:{server.port}".encode()) for r in v]
                                               for k, v in requests.items()})
                    for target in targets:
                        r = serving.drive(server, target, args.clients, drive_args, work, rf)
                        windows.append({"round": rnd, "code": label, "target": target, "clients": args.clients,
                                        "req_s": r["rps"], "p50_ms": r["latency"]["p50_ms"],
                                        "p99_ms": r["latency"]["p99_ms"], "errors": r["errors"],
                                        "server_cpu_ms_req": serving._cpu_ms_per_req(r)})
                        common.log(f"round {rnd} {label} {target}: {r['rps']:.0f} req/s, errors {r['errors']}")
                finally:
                    server.stop()
    common.print_table(windows, title=f"edge A/B at {args.clients} clients (every window)")
    summary = []
    for target in targets:
        med = {c: statistics.median(w["req_s"] for w in windows if w["target"] == target and w["code"] == c)
               for c in ("old", "new")}
        summary.append({"target": target, "old_req_s": med["old"], "new_req_s": med["new"],
                        "new_over_old": med["new"] / med["old"] if med["old"] else None})
    common.print_table(summary, title="median windows, new / old")
    load_after = serving._loadavg()
    common.write_results("edge_ab", {"old": str(codes["old"]), "load_avg_before": load_before,
                                     "load_avg_after": load_after, "windows": windows, "summary": summary},
                         out=args.out, started=started)
    print(f"load average before {load_before}, after {load_after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
