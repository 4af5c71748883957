"""Sequential certification at a target radius (issue 20): samples, certified accuracy, images/s.

    PYTHONPATH=. flock /work/bench.lock python bench/certify_seq.py [--sections accuracy,pgd,certify,http]
        [--old DIR] [--digits 1000] [--duration 8] [--rounds 1] [--bundle DIR] [--split test|val]
        [--sigmas 0.25,0.5]

`--split val` runs the accuracy section on the 500 validation digits: choose a recipe or a
setting there, then report it on the test digits (the default).

Sections (each adds to bench/results/certify_seq.json as it finishes):
  accuracy  the 1,000 test digits (models/default): the sequential test at r = 0.5 for sigma
            0.25 and 0.5 (the served code: certify_batch_at_radius in batches of 64 digits,
            sound noise, n_max and n0 as served): certified accuracy at 0.5, samples per image
            (mean, median, p99), seconds.
  today     0.6.0's /predict on the same digits (CERTIFY, n0 = 64, n = 1,000, alpha = 0.001,
            sigma 0.25, float32 noise): certified accuracy at 0.5.
  pgd       the same for oblivious PGD digits (L-inf 0.1, 40 steps, against the plain base
            classifier), sequential test only; and a PNG of both distributions of samples
            (docs/defenses/smoothing_samples.png).
  certify   CERTIFY with n = 100,000 (n0 = 100) on one digit as GET /certify runs it
            (--certify-sigma, default 0.5 as `default` and `smoothing` serve it; sound noise):
            seconds, forwards/s and GFLOP/s (the network's FLOPs counted by torch), as a
            share of this machine's ceiling (one large float32 linear layer's GFLOP/s, the
            yardstick of issue 20) and the seconds that ceiling allows (100,100 forwards at it).
  http      images/s of `default`, `smoothing` and `denoised` at 1 and 8 closed-loop clients
            (raw image/png bodies, keep-alive, httpx), this tree against --old (0.6.0:
            `git archive b1d3fb7 | tar -x -C DIR`), alternating old/new per
            pipeline, each server with its own defaults; uptime's load average beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402

from models.bundle import Bundle  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from service.defenses.smoothing import (  # noqa: E402
    NoiseSampler,
    certify,
    certify_batch_at_radius,
    resolve_precision,
    sampling_network,
)

RESULTS = REPO / "bench" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # stdout: the tables


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(width[c]) for c in cols), "-+-".join("-" * width[c] for c in cols)]
    return "\n".join(lines + [" | ".join(fmt(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows])


def stats(samples: list[int]) -> dict[str, float]:
    a = np.asarray(samples)
    return {"mean": round(float(a.mean()), 1), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": int(a.max())}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bundle = Bundle.load(args.bundle)
        self.section = self.bundle.defense("smoothing")
        digits = getattr(load_dataset("mnist5k"), args.split)
        self.x, self.y = digits.x[:args.digits], digits.y[:args.digits]
        self.out: dict[str, Any] = {"command": " ".join(sys.argv), "bundle_version": self.bundle.version,
                                    "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                "torch": torch.__version__, "python": platform.python_version()},
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path = Path(args.out)
        if self.path.exists():  # sections add to an earlier run's results
            self.out = {**json.loads(self.path.read_text()), **{k: self.out[k] for k in ("command", "started")}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.out, indent=2) + "\n")

    def model(self, sigma: float, precision: str | None = None) -> Any:
        """The sampled network as the service builds it (smoothing.sampling_network), in
        --precision (auto: bfloat16 where the CPU has it natively)."""
        f = self.bundle.classifier("cpu", artifact=self.section["classifiers"][f"{sigma:g}"]["artifact"])
        precision = resolve_precision(precision or self.args.precision, torch.device("cpu"))
        return sampling_network(f, tuple(self.bundle.input_spec.shape), precision)

    def sequential(self, f: Any, sigma: float, x: torch.Tensor, seed: int) -> tuple[list[int], list[bool], list[int]]:
        a = self.args
        labels, certified, samples = [], [], []
        for b0 in range(0, len(x), 64):  # the server's batches
            xs = x[b0:b0 + 64]
            done = certify_batch_at_radius(f, xs, sigma, a.radius, a.n0, a.n_max, a.alpha,
                                           [seed + b0 + i for i in range(len(xs))], 10, batch_size=8000)
            for cert, _ in done:
                labels.append(cert.label)
                certified.append(bool(cert.certified))
                samples.append(cert.samples)
        return labels, certified, samples

    # ------------------------------------------------------------------ sections
    def accuracy(self) -> None:
        a, y = self.args, self.y.tolist()
        rows, res = [], self.out.setdefault("accuracy", {})
        res["load_before"] = loadavg()
        for sigma in self.args.sigmas:
            t = time.perf_counter()
            labels, certified, samples = self.sequential(self.model(sigma), sigma, self.x, seed=0)
            secs = time.perf_counter() - t
            acc = sum(c and lab == yy for c, lab, yy in zip(certified, labels, y)) / len(y)
            # what /predict answers whatever the radius: the right label, and abstentions
            answered = sum(lab == yy for lab, yy in zip(labels, y)) / len(y)
            abstained = sum(lab < 0 for lab in labels) / len(y)
            res[f"sequential_sigma{sigma:g}"] = {"certified_accuracy": acc, "answered_accuracy": answered,
                                                 "abstained": abstained, "samples": stats(samples),
                                                 "all_samples": samples, "seconds": round(secs, 1),
                                                 "n0": a.n0, "n_max": a.n_max, "alpha": a.alpha}
            rows.append({"what": f"sequential r={a.radius:g} n0={a.n0} n_max={a.n_max}", "sigma": sigma,
                         "cert_acc@r": acc, "answered_acc": answered, "abstained": abstained, **stats(samples),
                         "seconds": round(secs, 1)})
            self.save()
        res["load_after"] = loadavg()
        self.save()
        print(table(rows, ["what", "sigma", "cert_acc@r", "answered_acc", "abstained", "mean", "median", "p99",
                           "seconds"]))

    def today(self) -> None:
        """0.6.0's /predict on the same digits: CERTIFY n0 = 64, n = 1,000, float32 noise, sigma 0.25."""
        a, y = self.args, self.y.tolist()
        rows, res = [], self.out.setdefault("accuracy", {})
        f25 = self.model(0.25, "float32")  # 0.6.0 sampled in float32
        t = time.perf_counter()
        sampler = NoiseSampler(f25, 0.25, 10, batch_size=1064, sound=False)  # 0.6.0's /predict
        ok = 0
        for i in range(len(y)):
            cert, _ = certify(sampler, self.x[i], 64, 1000, a.alpha, seed=i)
            ok += int(cert.label == y[i] and cert.radius >= a.radius)
        secs = time.perf_counter() - t
        res["today"] = {"procedure": "CERTIFY n0=64 n=1000, float32 noise", "sigma": 0.25,
                        "certified_accuracy": ok / len(y), "samples": {"mean": 1064, "median": 1064, "p99": 1064},
                        "seconds": round(secs, 1)}
        rows.append({"what": "today: CERTIFY n0=64 n=1000", "sigma": 0.25, "cert_acc@r": ok / len(y),
                     "mean": 1064, "median": 1064, "p99": 1064, "seconds": round(secs, 1)})
        self.save()
        print(table(rows, ["what", "sigma", "cert_acc@r", "mean", "median", "p99", "seconds"]))

    def pgd(self) -> None:
        from service.attacks.gradient import pgd

        a, y = self.args, self.y
        base = self.bundle.classifier("cpu")
        g = torch.Generator().manual_seed(0)
        adv = torch.cat([pgd(base, self.x[i:i + 250], y[i:i + 250], a.pgd_eps, steps=40, generator=g)
                         for i in range(0, len(y), 250)])
        with torch.no_grad():
            fooled = float((base(adv).argmax(1) != y).float().mean())
        res = self.out.setdefault("pgd", {"eps_linf": a.pgd_eps, "steps": 40, "base_fooled": round(fooled, 4)})
        rows = []
        for sigma in self.args.sigmas:
            labels, certified, samples = self.sequential(self.model(sigma), sigma, adv, seed=50_000)
            acc = sum(c and lab == yy for c, lab, yy in zip(certified, labels, y.tolist())) / len(y)
            res[f"sigma{sigma:g}"] = {"certified_accuracy": acc, "samples": stats(samples), "all_samples": samples}
            rows.append({"digits": "pgd", "sigma": sigma, "cert_acc@r": acc, **stats(samples)})
            self.save()
        print(table(rows, ["digits", "sigma", "cert_acc@r", "mean", "median", "p99", "max"]))
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc, adv = self.out.get("accuracy", {}), self.out.get("pgd", {})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, sigma in zip(axes, (0.25, 0.5)):
            series = [("clean digits", acc.get(f"sequential_sigma{sigma:g}", {}).get("all_samples")),
                      (f"oblivious PGD (L-inf {adv.get('eps_linf', 0):g})", adv.get(f"sigma{sigma:g}", {}).get("all_samples"))]
            series = [(name, s) for name, s in series if s]
            if not series:
                continue
            bins = sorted({v for _, s in series for v in s})
            edges = np.array(bins + [bins[-1] + 1]) - 0.5
            for name, s in series:
                counts, _ = np.histogram(s, bins=edges)
                ax.bar(np.arange(len(bins)) + (0.2 if "PGD" in name else -0.2), counts / len(s), width=0.4, label=name)
            ax.set_xticks(np.arange(len(bins)), [str(b) for b in bins], rotation=60, fontsize=7)
            ax.set_title(f"sigma {sigma:g}: samples per image to decide r = {self.args.radius:g}")
            ax.set_xlabel("noise samples (stopping look)")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("fraction of images")
        fig.tight_layout()
        # the README's plot only from the run it documents (the packaged bundle, test digits,
        # both sigmas); any other run's plot goes beside its JSON
        documented = (Path(self.args.bundle).resolve() == (REPO / "models" / "default").resolve()
                      and self.args.split == "test" and sorted(self.args.sigmas) == [0.25, 0.5]
                      and self.args.digits >= 1000)  # a short trial run never replaces it
        path = REPO / "docs" / "defenses" / "smoothing_samples.png" if documented \
            else self.path.with_name(self.path.stem + "_samples.png")
        fig.savefig(path, dpi=110)
        log(f"wrote {path}")

    def mflop_per_forward(self, sigma: float) -> float:
        net = self.bundle.classifier("cpu", artifact=self.section["classifiers"][f"{sigma:g}"]["artifact"])
        return common.forward_flops(net, self.bundle.input_spec.shape) / 1e6

    def certify(self) -> None:
        sigma = self.args.certify_sigma
        f = self.model(sigma)
        mflop = self.mflop_per_forward(sigma)
        x = self.x[0]
        rows, res = [], self.out.setdefault("certify", {})
        ceiling = common.linear_ceiling_gflops()
        bound = 100_100 * mflop / 1000 / ceiling
        res.update(sigma=sigma, mflop_per_forward=round(mflop, 3), ceiling_gflops=round(ceiling, 1),
                   bound_seconds=round(bound, 3), threads=torch.get_num_threads(), cpu=common.cpu_model())
        for sound in (True, False):
            sampler = NoiseSampler(f, sigma, 10, batch_size=8000, forward_batch=1000, sound=sound)
            certify(sampler, x, 100, 8000, 0.001, seed=1)  # warm
            best = None
            for rep in range(3):
                t = time.perf_counter()
                cert, _ = certify(sampler, x, 100, 100_000, 0.001, seed=rep)
                secs = time.perf_counter() - t
                best = secs if best is None else min(best, secs)
            fps = 100_100 / best
            gflops = fps * mflop / 1000
            res["sound" if sound else "float32"] = {"seconds": round(best, 3), "forwards_per_s": round(fps),
                                                    "gflops": round(gflops, 1),
                                                    "share_of_ceiling": round(gflops / ceiling, 3),
                                                    "radius": round(cert.radius, 4)}
            rows.append({"noise": "sound (float64, grid)" if sound else "float32", "seconds": round(best, 3),
                         "forwards/s": round(fps), "GFLOP/s": round(gflops, 1),
                         "of ceiling": f"{gflops / ceiling:.0%}"})
        res["load"] = loadavg()
        self.save()
        print(table(rows, ["noise", "seconds", "forwards/s", "GFLOP/s", "of ceiling"]))
        log(f"sigma {sigma:g}, {mflop:.2f} MFLOP per forward; ceiling {ceiling:.0f} GFLOP/s "
            f"({torch.get_num_threads()} threads, a float32 linear layer): at it, 100,100 forwards take {bound:.2f} s")

    def http(self) -> None:
        a = self.args
        if not a.old:
            raise SystemExit("--old DIR (0.6.0's tree) is needed for the http section")
        from service.imaging import encode_png

        bodies = [encode_png(img) for img in self.x[:64]]
        res = self.out.setdefault("http", {})
        rows = []
        for rnd in range(a.rounds):
            for pipeline in a.pipelines.split(","):
                for tree, name in ((Path(a.old), "old"), (REPO, "new")):
                    with _Server(tree, a.bundle, [pipeline]) as server:
                        for clients in (1, 8):
                            load = loadavg()
                            rate = asyncio.run(_drive(server.url, pipeline, bodies, clients, a.duration, a.warmup))
                            key = f"{pipeline}/{clients}/{name}"
                            res.setdefault(key, []).append({**rate, "load": load})
                            rows.append({"round": rnd, "pipeline": pipeline, "clients": clients, "code": name,
                                         "images/s": rate["images_per_s"], "errors": rate["errors"],
                                         "load1": load[0]})
                            log(str(rows[-1]))
                            self.save()
        print(table(rows, ["round", "pipeline", "clients", "code", "images/s", "errors", "load1"]))


class _Server:
    """`python -m service serve` from a source tree, with that tree's defaults and the bundle."""

    def __init__(self, tree: Path, bundle: str, pipelines: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory()
        import yaml

        # only the pipelines measured (and baseline): start-up does not warm the others
        packaged = yaml.safe_load((tree / "service" / "default_config.yaml").read_text())
        keep = {"baseline", *pipelines}
        config = Path(self.tmp.name) / "config.yaml"
        config.write_text(yaml.safe_dump({"default_pipeline": pipelines[0],
                                          "pipelines": {n: None for n in packaged["pipelines"] if n not in keep}}))
        env = {**os.environ, "PYTHONPATH": str(tree), "SHIELDSERVE_BUNDLE": str(Path(bundle).resolve()),
               "SHIELDSERVE_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--config", str(config), "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=tree, env=env,
                                     stdout=open(Path(self.tmp.name) / "log", "wb"), stderr=subprocess.STDOUT)

    def __enter__(self) -> "_Server":
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit((Path(self.tmp.name) / "log").read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.tmp.cleanup()


async def _drive(url: str, pipeline: str, bodies: list[bytes], clients: int, duration: float,
                 warmup: float) -> dict[str, Any]:
    """Closed-loop clients, each on one keep-alive connection: images/s in the window after warm-up."""
    import httpx

    done = {"images": 0, "errors": 0}
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            k = i
            while time.monotonic() < window[1]:
                r = await c.post(f"/predict?pipeline={pipeline}", content=bodies[k % len(bodies)],
                                 headers={"content-type": "image/png"})
                k += clients
                now = time.monotonic()
                if window[0] <= now <= window[1]:
                    done["images" if r.status_code == 200 else "errors"] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"images_per_s": round(done["images"] / duration, 2), "errors": done["errors"], "seconds": duration}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(REPO / "models" / "default"))
    p.add_argument("--sections", default="accuracy,pgd,today,certify,http")
    p.add_argument("--digits", type=int, default=1000)
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="which digits: val (500) to choose a recipe or setting, test (1,000) to report it")
    p.add_argument("--radius", type=float, default=0.5)
    p.add_argument("--sigmas", type=lambda v: [float(s) for s in v.split(",")], default=[0.25, 0.5],
                   help="noise levels of the accuracy and pgd sections (comma-separated)")
    p.add_argument("--certify-sigma", type=float, default=0.5,
                   help="noise level of the certify section (0.5: as `default` and `smoothing` serve it)")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--n0", type=int, default=0, help="selection samples (0: the clean image's class, as served)")
    p.add_argument("--n-max", type=int, default=4000, help="the sequential test's budget (as served)")
    p.add_argument("--pgd-eps", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="of the sampled network, as the service's certify.precision")
    p.add_argument("--old", help="0.6.0's source tree, for the http section")
    p.add_argument("--pipelines", default="default,smoothing,denoised")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per HTTP phase")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "certify_seq.json"))
    args = p.parse_args(argv)
    if "http" in args.sections.split(",") and not args.old:  # before hours of the other sections
        p.error("--old DIR (0.6.0's tree: git archive b1d3fb7) is needed for the http section; "
                "or leave http out of --sections")
    bench = Bench(args)
    for section in args.sections.split(","):
        log(f"section {section} (load {loadavg()})")
        getattr(bench, section)()
    bench.out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
