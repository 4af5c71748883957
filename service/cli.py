"""The `shieldserve` command (also `python -m service`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        try:
            from service import ray_app
        except ImportError as exc:
            raise SystemExit(f"--ray needs Ray Serve: pip install 'shieldserve[ray]' ({exc})") from None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        ray_app.run(args.config, host=args.host, port=args.port, address=args.ray_address)
        return 0
    from service.server import serve
    from service.settings import load_settings

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    serve(load_settings(args.config, **overrides), args.config)
    return 0


def _train(args: argparse.Namespace) -> int:
    from models.train import build_bundle, parse_classifier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    classifier = None
    if args.classifier:
        classifier = parse_classifier(args.classifier, args.classifier_weights,
                                      json.loads(args.classifier_kwargs or "{}"))
    overrides = {}
    if args.value_range:
        overrides["value_range"] = tuple(float(v) for v in args.value_range.split(","))
    if args.mean:
        overrides["mean"] = tuple(float(v) for v in args.mean.split(","))
        overrides["std"] = tuple(float(v) for v in (args.std or "1").split(","))
    options = json.loads(args.options) if args.options else {}
    manifest = build_bundle(args.out, dataset=args.dataset, preset=args.preset, seed=args.seed,
                            steps=args.steps.split(",") if args.steps else None, classifier=classifier,
                            device=args.device, input_overrides=overrides, options=options,
                            argv=sys.argv[2:])
    data = json.loads(Path(manifest).read_text())
    print(json.dumps({"bundle": str(Path(args.out)), "version": data["version"],
                      "metrics": data.get("metrics", {})}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shieldserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a bundle over HTTP")
    s.add_argument("--config", help="YAML config merged over the packaged one")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, help="worker processes (metrics aggregated across them)")
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve, autoscaled (settings: SHIELDSERVE_RAY_*, see service/ray_app.py)")
    s.add_argument("--ray-address", help="with --ray: an existing Ray cluster ('auto', 'ray://HOST:10001'); "
                                         "default: start a local one")
    s.set_defaults(func=_serve)

    t = sub.add_parser("train", help="build a complete bundle (every artifact every defense needs)")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--dataset", default="mnist5k", help="mnist5k | idx:DIR | npz:FILE")
    t.add_argument("--preset", default="default", choices=["default", "quick"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", help="comma-separated steps to (re)build into an existing bundle")
    t.add_argument("--classifier", help="your pretrained classifier: import:pkg.module:factory or torchscript:FILE")
    t.add_argument("--classifier-weights", help="safetensors weights for an import: classifier")
    t.add_argument("--classifier-kwargs", help="JSON keyword arguments for the factory")
    t.add_argument("--value-range", help="the classifier's input range as LO,HI (default 0,1)")
    t.add_argument("--mean", help="per-channel normalisation mean, e.g. 0.1307")
    t.add_argument("--std", help="per-channel normalisation std, e.g. 0.3081")
    t.add_argument("--device", default="cpu")
    t.add_argument("--options", help="JSON recipe overrides, e.g. '{\"classifier\": {\"adversarial\": \"pgd\"}}'")
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
