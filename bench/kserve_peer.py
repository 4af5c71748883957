"""The peer comparison: the same classifier served by KServe's Python model server and by
shieldserve, over the Open Inference Protocol (/v2), in alternating windows.

    .venv/bin/python bench/kserve_peer.py --kserve-python /tmp/kserve-venv/bin/python
        [--bundle models/default] [--clients 1,8,32] [--duration 4] [--repeats 2] [--out FILE]

KServe runs in its own virtual environment (`--kserve-python`; make it with
`python3 -m venv DIR && DIR/bin/pip install torch==2.13.0 && DIR/bin/pip install kserve`,
torch first so kserve pulls no second build; `--make-kserve-venv DIR` does exactly that).
The classifier it serves is the bundle's base classifier, traced to TorchScript and, on
load, frozen and optimised for inference as shieldserve's decision copy is
(service.defenses.base.optimize_for_cpu), so both servers run the same network the same way; KServe's model
(`_kserve_main` below, the textbook `kserve.Model`: load, predict) answers a V2 request with
the labels and the softmax probabilities, as shieldserve's /v2 does.

Both servers get the same torch thread count: `--threads N`, or each one's default (torch's
default for both). On a machine busy with other work, two threads for a one-image forward
pass can cost 40x one (the second thread is descheduled while the first waits for it), and
KServe runs one image a call: compare at --threads 1 there too.

Targets, each a server of its own on 127.0.0.1, one process, default settings:
  kserve/v2        POST /v2/models/classifier/infer, one FP32 digit as JSON
  shieldserve/v2   POST /v2/models/baseline/infer, the same JSON body
  shieldserve/predict  POST /predict?pipeline=baseline, the digit as a PNG
Every window drives one target at a time (bench/serving.py's load driver, its own process;
closed loop, keep-alive), targets in turn and the order reversed on each repeat; req/s is
the mean over the repeats. Goals (issue 17): at 32 clients shieldserve /v2 >= 1.3x KServe's
/v2, and /predict with PNGs >= 2x KServe's /v2. Prints a table and writes
`bench/results/kserve_peer.json`, with the load average before each window.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
GOALS = {"shieldserve/v2": 1.3, "shieldserve/predict": 2.0}


# ============================================================================ KServe's side
def _kserve_main(model_path: str, port: int, threads: int) -> None:
    """Runs in KServe's venv: a kserve.Model around the TorchScript classifier."""
    import uuid

    import kserve
    import numpy as np
    import torch
    from kserve import InferOutput, InferRequest, InferResponse

    if threads:
        torch.set_num_threads(threads)

    class Classifier(kserve.Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.net: Any = None
            self.load()

        def load(self) -> bool:
            # shieldserve's optimize_for_cpu: freeze (weights as constants), then oneDNN
            net = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.load(model_path).eval()))
            with torch.no_grad():
                for n in (1, 2, 16, 1):  # TorchScript specialises on its first calls
                    net(torch.zeros(n, 1, 28, 28))
            self.net = net
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            x = torch.from_numpy(np.ascontiguousarray(payload.inputs[0].as_numpy(), dtype=np.float32))
            if x.dim() == 3:
                x = x.unsqueeze(0)
            with torch.no_grad():
                probs = torch.softmax(self.net(x).float(), dim=1)
            labels = probs.argmax(dim=1)
            out_l = InferOutput(name="label", shape=list(labels.shape), datatype="INT64")
            out_l.set_data_from_numpy(labels.numpy())
            out_p = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
            out_p.set_data_from_numpy(probs.numpy())
            return InferResponse(model_name=self.name, infer_outputs=[out_l, out_p],
                                 response_id=payload.id or uuid.uuid4().hex)  # as KServe's examples do

    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([Classifier("classifier")])


# ============================================================================ orchestrator
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _make_venv(path: Path) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "kserve"], check=True)
    return py


def _check_one_torch(py: str) -> dict[str, str]:
    """The KServe venv's torch and kserve versions, and proof there is one torch (no CUDA build)."""
    code = ("import importlib.metadata as m, torch, kserve, json; "
            "print(json.dumps({'torch': torch.__version__, 'kserve': m.version('kserve'), "
            "'nvidia': sorted(d.metadata['Name'] for d in m.distributions() "
            "if d.metadata['Name'].lower().startswith(('nvidia', 'triton')))}))")
    info = json.loads(subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout)
    if info["nvidia"]:
        raise SystemExit(f"KServe's venv pulled CUDA packages: {info['nvidia']}")
    return info


def _requests(n: int) -> tuple[dict[str, list[bytes]], Any]:
    from models.datasets import load_dataset
    from service.imaging import encode_png

    test = load_dataset("mnist5k").test
    x = test.x[:n]
    host = b"Host: 127.0.0.1\r\n"

    def post(path: str, ctype: bytes, body: bytes) -> bytes:
        return (b"POST " + path.encode() + b" HTTP/1.1\r\n" + host + b"Content-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def v2(img: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "input", "shape": [1, *img.shape], "datatype": "FP32",
                                       "data": [round(float(v), 6) for v in img.flatten().tolist()]}]}).encode()

    return {
        "kserve/v2": [post("/v2/models/classifier/infer", b"application/json", v2(img)) for img in x],
        "shieldserve/v2": [post("/v2/models/baseline/infer", b"application/json", v2(img)) for img in x],
        "shieldserve/predict": [post("/predict?pipeline=baseline", b"image/png", encode_png(img)) for img in x],
    }, x


def _export_classifier(bundle: Path, out: Path) -> str:
    """The bundle's base classifier, traced to TorchScript (a frozen, oneDNN-optimised module
    cannot be saved and loaded again: KServe's side freezes and optimises after loading)."""
    import torch

    from models.bundle import Bundle

    b = Bundle.load(bundle)
    clf = b.classifier("cpu").eval()
    with torch.no_grad():
        torch.jit.trace(clf, torch.zeros(1, *b.input_spec.shape)).save(str(out))
    return "traced, then frozen and optimize_for_inference on load (as shieldserve decides)"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(BENCH))
    import common

    common.ensure_repo_on_path()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kserve-python", help="python of a venv with kserve and torch==2.13.0")
    p.add_argument("--make-kserve-venv", help="make that venv here first (torch==2.13.0, then kserve)")
    p.add_argument("--bundle", default=str(common.REPO_ROOT / "models" / "default"))
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of both servers; 0: each one's default (torch's default for both)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.make_kserve_venv:
        args.kserve_python = str(_make_venv(Path(args.make_kserve_venv)))
    if not args.kserve_python:
        p.error("--kserve-python or --make-kserve-venv is required")
    kinfo = _check_one_torch(args.kserve_python)
    common.log(f"KServe venv: {kinfo}")
    clients = [int(c) for c in args.clients.split(",")]
    started = common.now_iso()
    rows, windows = [], []
    with tempfile.TemporaryDirectory(prefix="shieldserve-kserve-") as tmp:
        workdir = Path(tmp)
        requests, _ = _requests(64)
        requests_file = workdir / "requests.json"
        common.write_requests(requests_file, requests)
        model = workdir / "classifier.pt"
        kind = _export_classifier(Path(args.bundle), model)
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SHIELDSERVE_") and k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
        kport, sport = _free_port(), _free_port()
        servers = {
            "kserve": common.ServerProcess("kserve", [args.kserve_python, str(Path(__file__).resolve()), "_kserve", str(model),
                                      str(kport), str(args.threads)], base_env, workdir, kport, "/v2/health/ready", workdir),
            "shieldserve": common.ServerProcess("shieldserve", [sys.executable, "-m", "service", "serve", "--host", HOST, "--port",
                                                str(sport)],
                                {**base_env, "SHIELDSERVE_BUNDLE": str(Path(args.bundle).resolve()),
                                 "SHIELDSERVE_LOG_LEVEL": "warning", "PYTHONPATH": str(common.REPO_ROOT),
                                 "SHIELDSERVE_TORCH_THREADS": str(args.threads)},
                                common.REPO_ROOT, sport, "/readyz", workdir),
        }
        targets = {"kserve/v2": servers["kserve"], "shieldserve/v2": servers["shieldserve"],
                   "shieldserve/predict": servers["shieldserve"]}
        try:
            for s in servers.values():
                s.wait_ready()
            common.log("servers ready")
            for c in clients:
                rates: dict[str, list[float]] = {t: [] for t in targets}
                loads = []
                for rep in range(args.repeats):
                    order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                    for t in order:
                        load = round(os.getloadavg()[0], 2)
                        s = targets[t]
                        r = common.drive_load(s, t, c, args.warmup, args.duration, workdir, requests_file)
                        if r["errors"]:
                            common.log(f"{t} x{c}: {r['errors']} errors: {r['error_examples'][:2]}")
                        rates[t].append(r["rps"])
                        loads.append(load)
                        windows.append({"target": t, "clients": c, "load_before": load, **r})
                        common.log(f"{t:20} x{c:<3}: {r['rps']:8.1f} req/s p50 {r['latency'].get('p50_ms', 0):.1f} ms"
                                   f" (load {load})")
                k = mean(rates["kserve/v2"])
                for t in targets:
                    v = mean(rates[t])
                    goal = GOALS.get(t) if c == 32 else None
                    ratio = v / k if k else None
                    rows.append({"clients": c, "target": t, "req_s": v, "vs_kserve_v2": ratio, "goal_at_32": goal,
                                 "met": None if goal is None or ratio is None else ("yes" if ratio >= goal else "no"),
                                 "load_avg": f"{min(loads):.2f}-{max(loads):.2f}"})
        finally:
            for s in servers.values():
                s.stop()
    common.print_table(rows, digits=2, title=f"req/s, one digit a request (KServe {kinfo['kserve']}, "
                                             f"torch {kinfo['torch']}, torch threads "
                                             f"{args.threads or 'default'}; KServe's model: {kind})")
    path = common.write_results("kserve_peer", {"kserve": kinfo, "kserve_model": kind, "rows": rows,
                                                "torch_threads": args.threads or "default",
                                                "windows": windows}, out=args.out, started=started)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_kserve":
        _kserve_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        raise SystemExit(0)
    raise SystemExit(main())
