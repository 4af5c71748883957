"""The `shieldserve` command (also `python -m service`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        try:
            from service import ray_app
        except ImportError as exc:
            raise SystemExit(f"--ray needs Ray Serve: pip install 'shieldserve[ray]' ({exc})") from None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        ray_app.run(args.config, host=args.host, port=args.port, address=args.ray_address)
        return 0
    from logging.handlers import BufferingHandler

    from service.logs import configure_logging
    from service.server import serve
    from service.settings import load_settings

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    # what reading the settings logs (an unknown SHIELDSERVE_* variable) is held until the
    # settings say how to log, then logged that way: it was a bare stderr line with no level
    held = BufferingHandler(capacity=1000)
    logging.getLogger().addHandler(held)
    try:
        settings = load_settings(args.config, **overrides)
    except Exception:
        # refused: what was held is told as before, to stderr (it may be why: an ignored
        # misspelt variable beside the one refused)
        for record in held.buffer:
            if logging.lastResort is not None:
                logging.lastResort.handle(record)
        raise
    finally:
        logging.getLogger().removeHandler(held)
    configure_logging(settings.log_level, settings.json_logs)
    for record in held.buffer:
        logging.getLogger(record.name).handle(record)
    serve(settings, args.config)
    return 0


def _check_dataset(spec: str) -> None:
    """An npz dataset is checked (file, declared sizes, arrays) before the build starts, so a
    file that lacks x_test is named now, before anything else is opened or written."""
    kind, _, path = spec.partition(":")
    if kind == "npz" and path:  # mnist5k, idx:DIR and an unknown kind: load_dataset says what is wrong
        from models.datasets import check_npz

        check_npz(path)


def _check_classifier(src: Any) -> None:  # models.train.ClassifierSource
    """The classifier the user brings is opened before the build starts (the file exists; an
    import: network takes its weights), so a wrong path or weights for another network is a
    one-line error here instead of torch's load_state_dict RuntimeError (which we cannot tell
    from a real bug) after the dataset was loaded and the bundle directory written."""
    if src.kind == "torchscript":
        if not Path(src.target).is_file():
            raise ValueError(f"--classifier torchscript:{src.target}: no such file")
        return
    from models.architectures import import_factory

    weights = Path(src.weights)
    if not weights.is_file():
        raise ValueError(f"--classifier-weights {weights}: no such file")
    try:
        factory = import_factory(src.target)
    except AttributeError as exc:
        raise ValueError(f"--classifier import:{src.target}: {exc}") from None
    try:
        net = factory(**src.kwargs)
    except TypeError as exc:
        raise ValueError(f"--classifier-kwargs do not fit {src.target}: {exc}") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise ValueError(f"--classifier-weights {weights}: not a safetensors file ({exc})") from None
    try:  # strict=False: the key lists come back (torch's strict message lists every key of a big network)
        keys = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # strict or not, a tensor of the wrong shape
        raise ValueError(f"--classifier-weights {weights} do not fit {src.target}: {exc}") from None

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    wrong = [f"{len(k)} missing ({some(k)})" for k in [keys.missing_keys] if k]
    wrong += [f"{len(k)} unexpected ({some(k)})" for k in [keys.unexpected_keys] if k]
    if wrong:
        raise ValueError(f"--classifier-weights {weights} do not fit {src.target}: "
                         f"state_dict keys {'; '.join(wrong)}")


def _train(args: argparse.Namespace) -> int:
    from models.train import build_bundle, parse_classifier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _check_out_dir(args.out, "bundle")
    classifier = None
    if args.classifier:
        classifier = parse_classifier(args.classifier, args.classifier_weights, args.classifier_kwargs or {})
        classifier.feature_layer = args.feature_layer
        _check_classifier(classifier)
    else:
        # each modifies --classifier: without it, the built-in classifier was trained (hours)
        # with no word that a weights file (even a missing one) was never read
        given = [flag for flag, value in (("--classifier-weights", args.classifier_weights),
                                          ("--classifier-kwargs", args.classifier_kwargs),
                                          ("--feature-layer", args.feature_layer)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a classifier you bring: "
                             f"add --classifier import:MODULE:FACTORY (or torchscript:FILE)")
    if args.std and not args.mean:
        raise ValueError("--std goes with --mean (the input is (x - mean) / std): give both (--mean 0 to scale only)")
    if args.dataset is not None:  # None: the bundle's recorded dataset (models.train.build_bundle)
        _check_dataset(args.dataset)
    overrides = {}
    if args.value_range:
        overrides["value_range"] = args.value_range
    if args.mean:
        overrides["mean"] = args.mean
        overrides["std"] = args.std or (1.0,)
    options = args.options or {}
    if args.max_accuracy_drop is not None:
        options.setdefault("quality", {})["max_accuracy_drop"] = args.max_accuracy_drop
    from service.settings import load_settings

    # --trust-import, and the `trusted_imports` setting (--config, else the config named by
    # SHIELDSERVE_CONFIG; SHIELDSERVE_TRUSTED_IMPORTS) as `serve` reads it; what --classifier
    # import: names is trusted
    trusted = [*(args.trust_import or []), *load_settings(args.config, bundle=args.out).trusted_imports]
    manifest = build_bundle(args.out, dataset=args.dataset, preset=args.preset, seed=args.seed,
                            steps=args.steps, classifier=classifier,
                            device=args.device, input_overrides=overrides, options=options,
                            argv=args.argv, trusted_imports=tuple(trusted), config=args.config, force=args.force)
    data = json.loads(Path(manifest).read_text())
    print(json.dumps({"bundle": str(Path(args.out)), "version": data["version"],
                      "metrics": data.get("metrics", {})}, indent=2))
    if data.get("quality", {}).get("defenses"):
        from models.recipes.quality import table

        print(table(data))
    from models.bundle import trust_needed

    needed = trust_needed(data)
    if needed:  # the next command a user runs, `serve`, would refuse the bundle without them
        print(f"the bundle runs code (its import: module, its TorchScript files): serving or evaluating it takes "
              f"trusted_imports: {json.dumps(needed)} (SHIELDSERVE_TRUSTED_IMPORTS='{json.dumps(needed)}'); "
              f"`--steps` on it later takes {' '.join('--trust-import ' + n for n in needed)}", file=sys.stderr)
    return 0


def _check_out_dir(out: str, what: str) -> None:
    """--out names a directory to write: an existing file there is one line now, not
    os.makedirs' FileExistsError traceback once the work is done (or before it starts)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; --out names the {what} directory to write")


def _check_finished_report(out: str, force: bool) -> None:
    """`evaluate` into an --out that holds the finished report.json of an earlier run replaced
    it without a word: refused unless --force. An unfinished one (an interrupted run; no
    `finished`) is what rerunning the command is for: it starts over, the transfer surrogates
    cached in --out are reused."""
    from service.evaluation.harness import finished_report

    earlier = finished_report(Path(out))
    if earlier is None:
        return
    if force:
        logging.getLogger("shieldserve").warning("--force: replacing the finished report of an earlier run in %s "
                                                 "(finished %s)", out, earlier.get("finished"))
        return
    raise ValueError(f"--out {out} holds the finished report of an earlier run (finished {earlier.get('finished')}"
                     f", `{earlier.get('command') or '?'}`): give another --out, or add --force to replace it")


def _pairs(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        for part in item.split(","):
            name, _, value = part.partition("=")
            if not value:
                raise ValueError(f"expected NAME=N, got {part!r}")
            try:
                out[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"expected NAME=N with N a whole number, got {part!r}") from None
    return out


def _evaluate(args: argparse.Namespace) -> int:
    import os
    from dataclasses import replace

    import torch

    from service.evaluation import EvalConfig, evaluate
    from service.evaluation.attacks import Budget
    from service.evaluation.harness import ALL_SECTIONS, ATTACKS, NORMS, OPTIONAL_SECTIONS, PIPELINE_COUNTS, check_names

    def names(flag: str, text: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
        """A comma-separated list of `valid` names (spaces and empty items dropped)."""
        given = tuple(n.strip() for n in text.split(",") if n.strip())
        if not given:
            raise ValueError(f"{flag} {text!r}: no {what} given; choose from {', '.join(valid)}")
        check_names(flag, given, valid, what)
        return given

    def pairs(dest: str) -> dict[str, int]:
        try:
            return _pairs(getattr(args, dest))
        except ValueError as exc:
            raise ValueError(f"--{dest.replace('_', '-')}: {exc}") from None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # the query section sends thousands of requests: httpx logs each one at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget()
    overrides = {k: getattr(args, k) for k in ("pgd_steps", "apgd_steps", "cw_steps", "eot_draws", "eot_steps",
                                               "bpda_steps", "gmsa_rounds", "gmsa_steps", "square_queries",
                                               "hsj_queries", "transfer_steps", "transfer_decay",
                                               "transfer_diversity") if getattr(args, k) is not None}
    if args.linf_eps is not None:
        overrides["linf_eps"] = args.linf_eps
    if args.l2_eps:
        overrides["l2_eps"] = args.l2_eps
    if args.linf_sweep:
        overrides["linf_sweep"] = args.linf_sweep
    elif args.linf_eps is not None:  # the sweep's default is MNIST's; scale it to the chosen eps
        overrides["linf_sweep"] = tuple(round(args.linf_eps * f, 6) for f in (1 / 3, 2 / 3, 1.0))
    budget = replace(budget, **overrides)
    # every name and NAME=N is checked here, before any work (the query attacks, the bundle's
    # pipelines, the transfer section's surrogates): a typo is one line and status 2, not a
    # section silently skipped or a failure after an hour. query is this command's own section.
    sections = names("--sections", args.sections, (*ALL_SECTIONS, *OPTIONAL_SECTIONS, "query"), "section") \
        if args.sections else None
    pipelines = [p.strip() for item in (args.pipelines or []) for p in item.split(",") if p.strip()] or None
    cfg = EvalConfig(bundle=_bundle(args), out=args.out, pipelines=pipelines, limit=args.limit, offset=args.offset,
                     budget=budget,
                     sections=tuple(s for s in sections if s != "query") if sections else EvalConfig.sections,
                     attacks=names("--attacks", args.attacks, ATTACKS, "attack") if args.attacks else None,
                     certify_n=args.certify_n, blackbox_default_limit=args.blackbox_digits, url=args.url,
                     api_key=args.api_key, doc=args.doc, adaptive_sweep=args.adaptive_sweep, seed=args.seed,
                     config=args.config, jobs=args.jobs, threads=args.threads,
                     autoattack_norms=names("--autoattack-norms", args.autoattack_norms, NORMS, "norm"),
                     autoattack_budget=pairs("autoattack_budget"),
                     transfer_surrogates=args.transfer_surrogates,
                     transfer_norms=names("--transfer-norms", args.transfer_norms, NORMS, "norm"),
                     command="shieldserve evaluate " + " ".join(args.argv),
                     **{dest: pairs(dest) for dest in PIPELINE_COUNTS})
    cfg.check()  # the pipelines: configured ones (--config), the counts: in range
    _check_out_dir(args.out, "report")
    if cfg.sections:  # report.json will be written (--sections query alone writes query_attacks.*)
        _check_finished_report(args.out, args.force)
    if sections and "query" in sections:  # query attacks over HTTP: only a running service
        from pathlib import Path

        from service.evaluation import query_attacks

        if not args.url:
            raise ValueError("--sections query attacks a running service: give its --url")
        query_attacks.run(args.url, Path(args.out), off=args.query_off, reject=args.query_reject,
                          block=args.query_block, digits=args.query_digits, budget=args.query_budget,
                          attacks=tuple(args.query_attacks), adaptive=not args.query_no_adaptive,
                          adaptive_digits=args.query_adaptive_digits, benign_images=args.query_benign,
                          seed=args.seed, l2_eps=args.query_l2_eps, command="shieldserve evaluate " + " ".join(
                              args.argv), api_key=args.api_key)
        print(f"wrote {args.out}/query_attacks.json and {args.out}/query_attacks.md")
        if not cfg.sections:
            return 0
    created = not os.path.exists(args.out)
    os.makedirs(args.out, exist_ok=True)
    try:
        report = evaluate(cfg)
    except BaseException:
        # refused before any result (a bundle not trusted or not loadable): no empty --out left
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    print(f"wrote {args.out}/report.json, {args.out}/report.md and plots in {report['seconds'] / 60:.1f} min")
    failed = {n: r["error"] for n, r in report["pipelines"].items() if r.get("error")}
    for name, error in failed.items():
        print(f"pipeline {name} FAILED (its sections are missing from the report): {error}", file=sys.stderr)
    return 1 if failed else 0


def _bundle(args: argparse.Namespace) -> str:
    """--bundle, else the `bundle` setting as `serve` reads it (SHIELDSERVE_BUNDLE, the config's
    `bundle:`, the packaged models/default)."""
    from service.settings import load_settings

    return str(args.bundle or load_settings(args.config).bundle)


def _export(args: argparse.Namespace) -> int:
    from service.export import ExportRefused, export

    try:
        p = export(_bundle(args), args.pipeline, args.out, config=args.config, force=args.force)
    except ExportRefused as exc:
        print(f"shieldserve: error: export refused: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "pipeline": p.pipeline, "input": "[0, 1] NCHW float32",
                      "output": "logits", "parts": p.parts, "left_out": p.left_out, "exact": p.exact}, indent=2))
    for item in p.left_out:
        print(f"left out: {item}", file=sys.stderr)
    return 0


def _floats(count: int | None = None, positive: bool = False):  # noqa: ANN202
    """An argparse type: comma-separated numbers (exactly `count` of them when given)."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        if positive and min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected numbers above 0, got {text!r}")
        return values
    return parse


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False,  # noqa: ANN202
            high_open: bool = False, hint: str = ""):
    """An argparse type: an int or float in [low, high] ((low, ... with low_open, ..., high) with
    high_open); NaN and infinity never. `evaluate`'s budgets took 0 or a negative (`--linf-eps
    -0.1`) and failed, or measured nothing, later; `--max-accuracy-drop 2` (meant as 2 %) turned
    the quality gate off; `serve --port 99999` listened on 99999 mod 65536. `hint` follows the
    range in the message."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        # not (low <= value): NaN fails every comparison, and passed `value < low`
        below = not (value > low if low_open else value >= low)
        above = high is not None and not (value < high if high_open else value <= high)
        if below or above or not math.isfinite(value):
            where = f"{'above' if low_open else 'at least'} {low:g}"
            if high is not None:
                where += f" and {'below' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"expected a number {where}{hint}, got {text!r}")
        return value
    return parse


def _query_attacks(text: str) -> tuple[str, ...]:
    """--query-attacks: square_EPS (0 < EPS <= 1), hsj, boundary."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name in ("hsj", "boundary"):
            continue
        kind, _, eps = name.partition("_")
        try:
            ok = kind == "square" and 0 < float(eps) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"unknown query attack {name!r}: square_EPS (0 < EPS <= 1), hsj, boundary")
    if not names:
        raise argparse.ArgumentTypeError("no query attack given: square_EPS, hsj, boundary")
    return names


def _value_range(text: str) -> tuple[float, float]:
    lo, hi = _floats(2)(text)
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO < HI, got {text!r}")
    return lo, hi


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def _steps(text: str) -> list[str]:
    from models.train import STEPS  # here, not at import: only `train --steps` pays for torch

    known = [name for name, _ in STEPS] + ["quality"]
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in known]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown) or repr(text)}; "
                                         f"choose from {','.join(known)}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shieldserve", description=__doc__, epilog=(
        "A mistake in what you give (a missing file, a bad option) is one line 'shieldserve: "
        "error: ...' and exit status 2; add --traceback after the command for the full traceback "
        "(for a bug report)."))
    sub = p.add_subparsers(dest="command", required=True)
    # on every subcommand (after it, where users add flags), not on the top parser: argparse lets
    # a subparser's default overwrite the top parser's value for the same name
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true",
                        help="on an error, print the full Python traceback instead of one line (for bug reports)")

    s = sub.add_parser("serve", parents=[common], help="serve a bundle over HTTP")
    s.add_argument("--config", help="YAML config merged over the packaged one")
    s.add_argument("--host")
    s.add_argument("--port", type=_number(int, 0, 65535), help="TCP port, 0-65535 (0: one the system picks)")
    s.add_argument("--workers", type=_number(int, 1), help="worker processes (metrics aggregated across them)")
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve, autoscaled (settings: SHIELDSERVE_RAY_*, see service/ray_app.py)")
    s.add_argument("--ray-address", help="with --ray: an existing Ray cluster ('auto', 'ray://HOST:10001'); "
                                         "default: start a local one")
    s.set_defaults(func=_serve)

    t = sub.add_parser("train", parents=[common], help="build a complete bundle (every artifact every defense needs)")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--dataset", default=None,
                   help="mnist5k | idx:DIR | npz:FILE (default: the dataset an existing bundle at --out was built on, else mnist5k)")
    # None: a new bundle gets "default" and 0; --steps on a bundle takes the ones it was built with
    t.add_argument("--preset", default=None, choices=["default", "quick"])
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--steps", type=_steps, help="comma-separated steps to (re)build into an existing bundle; "
                                   "'quality' measures its defenses again (the quality gate)")
    t.add_argument("--classifier", help="your pretrained classifier: import:pkg.module:factory or torchscript:FILE")
    t.add_argument("--trust-import", action="append", metavar="MODULE",
                   help="let the bundle at --out build networks with this Python module's code (\"pkg\" covers "
                        "pkg.*; repeatable): a bundle you extend with --steps whose classifier came from "
                        "--classifier import:... (the module --classifier names is trusted for its own build)")
    t.add_argument("--classifier-weights", help="safetensors weights for an import: classifier")
    t.add_argument("--classifier-kwargs", type=_json_object, help="JSON keyword arguments for the factory")
    t.add_argument("--feature-layer", help="the submodule whose output are the penultimate features RMC indexes "
                                           "(default: the input of the last Linear layer)")
    t.add_argument("--max-accuracy-drop", type=_number(float, 0, 1, high_open=True, hint=" (a fraction: 0.02 is 2%)"),
                   help="quality gate: a defense whose clean validation accuracy is more than this below the "
                        "base classifier's is recorded as unusable and not served; a fraction in [0, 1): "
                        "0.02 is 2 points (default 0.02)")
    t.add_argument("--value-range", type=_value_range, help="the classifier's input range as LO,HI (default 0,1; "
                                                                  "a negative LO needs '=': --value-range=-1,1)")
    t.add_argument("--mean", type=_floats(), help="per-channel normalisation mean, e.g. 0.1307")
    t.add_argument("--std", type=_floats(positive=True), help="per-channel normalisation std, e.g. 0.3081")
    t.add_argument("--device", default="cpu",
                   help="torch device to train and measure on: cpu, cuda or cuda:N (default cpu)")
    t.add_argument("--options", type=_json_object, help="JSON recipe overrides, e.g. '{\"classifier\": {\"adversarial\": \"pgd\"}}'")
    t.add_argument("--force", action="store_true",
                   help="without --steps: replace the bundle already at --out (refused without it)")
    t.add_argument("--config", help="the service YAML you will serve the bundle with (merged over the packaged "
                                     "one): the quality gate also measures each of its pipelines that composes two "
                                     "or more trained defenses, as a whole")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", parents=[common], help="security evaluation: report.json, report.md and PNG plots")
    e.add_argument("--bundle", help="the bundle (default: the `bundle` setting: SHIELDSERVE_BUNDLE, the config's "
                                     "`bundle:`, else the packaged models/default)")
    e.add_argument("--out", required=True, help="directory for report.json, report.md and the plots")
    e.add_argument("--pipelines", "--pipeline", action="append",
                   help="pipelines (comma-separated or repeated; default: every configured one)")
    e.add_argument("--limit", type=int, default=100, help="test digits, stratified by class")
    e.add_argument("--offset", type=int, default=0,
                   help="skip the first N digits of that order: split one long evaluation over processes "
                        "(--offset 0 --limit 500 and --offset 500 --limit 500 cover the digits of --limit 1000)")
    e.add_argument("--pipeline-limit", action="append", metavar="NAME=N", help="fewer digits for a costly pipeline")
    e.add_argument("--sections", help="comma-separated: oblivious,transfer,graybox,adaptive,blackbox,certify "
                                      "(default: all), "
                                      "and autoattack and query (only when named; query attacks a running "
                                      "service: --url)")
    e.add_argument("--attacks", help="keep only these: pgd,apgd,cw,bpda,gmsa,square,hsj,autoattack,mifgsm")
    e.add_argument("--autoattack-limit", action="append", metavar="NAME=N", help="digits for a pipeline's AutoAttack")
    e.add_argument("--autoattack-budget", action="append", metavar="KEY=N",
                   help="AutoAttack budget overrides: apgd_iters, targets, square_queries, pgd_steps, pgd_restarts, "
                        "eot_iter, check_draws (default: the standard version's 100, 9, 5000, and PGD 100 x 10; "
                        "for randomized pipelines, the rand version's gradients averaged over 20 noise draws "
                        "and candidates judged by the mean of 32)")
    e.add_argument("--autoattack-norms", default="linf,l2",
                   help="AutoAttack threat models: linf (at the L-inf eps), l2 (at the largest L2 eps)")
    e.add_argument("--smoothing-n", action="append", metavar="NAME=N",
                   help="PREDICT samples per digit for a smoothing pipeline (default: the service's)")
    e.add_argument("--certify-n", type=int, default=10_000, help="CERTIFY samples per digit")
    e.add_argument("--certify-limit", action="append", metavar="NAME=N", help="digits to certify for a pipeline")
    e.add_argument("--certify-n-for", action="append", metavar="NAME=N",
                   help="CERTIFY samples per digit for one pipeline, instead of --certify-n")
    e.add_argument("--adaptive-limit", action="append", metavar="NAME=N",
                   help="digits for a pipeline's gray-box and adaptive attacks")
    e.add_argument("--adaptive-sweep", action="store_true",
                   help="adaptive PGD at every eps of --linf-sweep too, not only at --linf-eps (on pipelines "
                        "that cost < 0.05 s per clean digit)")
    e.add_argument("--doc", help="also write the report here (e.g. docs/security-report.md), plot links relative to it")
    e.add_argument("--blackbox-digits", type=int, default=20, help="digits per pipeline for black-box attacks")
    e.add_argument("--blackbox-limit", action="append", metavar="NAME=N", help="black-box digits for a pipeline")
    e.add_argument("--url", help="black-box over HTTP: the base URL of a running service (/predict only)")
    e.add_argument("--api-key", default=os.environ.get("SHIELDSERVE_EVAL_API_KEY"),
                   help="with --url: the service's API key, sent as Authorization: Bearer (default: the "
                        "SHIELDSERVE_EVAL_API_KEY environment variable, which keeps it out of shell history); "
                        "never written to a report")
    q = e.add_argument_group("query attacks over HTTP (--sections query, with --url; docs/query_monitor.md)")
    q.add_argument("--query-off", default="baseline", help="pipeline without the query monitor")
    q.add_argument("--query-reject", default="baseline-monitored", help="pipeline with the monitor in reject mode")
    q.add_argument("--query-block", default="baseline-block", help="pipeline with the monitor in block mode")
    q.add_argument("--query-digits", type=_number(int, 1), default=10, help="digits per attack and mode")
    q.add_argument("--query-budget", type=_number(int, 1), default=1000, help="queries per digit (at most)")
    q.add_argument("--query-attacks", type=_query_attacks, default=("square_0.3", "square_0.15", "hsj", "boundary"),
                   help="comma-separated: square_EPS (Square at that L-inf eps), hsj (HopSkipJump), boundary")
    q.add_argument("--query-adaptive-digits", type=_number(int, 1), default=5, help="digits per adaptive run")
    q.add_argument("--query-no-adaptive", action="store_true", help="skip the adaptive attacker")
    q.add_argument("--query-l2-eps", type=_number(float, 0, low_open=True), default=2.0,
                   help="L2 success radius of HopSkipJump/boundary")
    q.add_argument("--query-benign", type=_number(int, 0), default=0, help="benign digits sent first (5000: all of mnist5k)")
    for flag, what in (("pgd-steps", "PGD steps"), ("apgd-steps", "APGD iterations"), ("cw-steps", "CW steps per binary step"),
                       ("eot-draws", "noise draws per EOT gradient"), ("eot-steps", "PGD steps with EOT"),
                       ("bpda-steps", "PGD steps through Defense-GAN (BPDA)"), ("gmsa-rounds", "GMSA rounds"),
                       ("gmsa-steps", "PGD steps per GMSA round"), ("square-queries", "Square query budget per digit"),
                       ("hsj-queries", "HopSkipJump query budget per digit")):
        e.add_argument(f"--{flag}", type=_number(int, 1), help=what)
    e.add_argument("--transfer-surrogates", type=int, default=3,
                   help="surrogates trained for the transfer section (cached in OUT/transfer_surrogates)")
    e.add_argument("--transfer-norms", default="linf,l2",
                   help="transfer threat models: linf (at the L-inf eps), l2 (at the largest L2 eps)")
    e.add_argument("--transfer-steps", type=_number(int, 1), help="MI-FGSM iterations on the surrogate ensemble (default 10)")
    e.add_argument("--transfer-decay", type=_number(float, 0), help="MI-FGSM momentum decay (default 1.0)")
    e.add_argument("--transfer-diversity", type=_number(float, 0, 1),
                   help="input-diversity probability per MI-FGSM step (default 0.5; 0: plain MI-FGSM)")
    e.add_argument("--linf-eps", type=_number(float, 0, 1, low_open=True), help="the L-inf budget of every L-inf attack (default 0.3, MNIST's; "
                                                  "e.g. 0.031 = 8/255 for photographs)")
    e.add_argument("--l2-eps", type=_floats(positive=True), help="L2 budgets, comma-separated; the largest is AutoAttack's and the "
                                    "transfer attack's (default 0.5,1.0,2.0)")
    e.add_argument("--linf-sweep", type=_floats(positive=True), help="L-inf eps for the oblivious PGD sweep (default 0.1,0.2,0.3; "
                                        "used only on pipelines that cost < 0.05 s per digit)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=_number(int, 0), default=1, help="torch threads per process (0: torch's default)")
    e.add_argument("--jobs", type=_number(int, 1), default=1,
                   help="evaluate pipelines side by side in this many processes (the oblivious attacks run once)")
    e.add_argument("--config", help="service YAML merged over the packaged configuration")
    e.add_argument("--force", action="store_true",
                   help="replace the finished report of an earlier run in --out (refused without it; an "
                        "unfinished one, of an interrupted run, is started over without it)")
    e.set_defaults(func=_evaluate)

    x = sub.add_parser("export", parents=[common], help="a pipeline's deterministic, differentiable part as TorchScript "
                                      "([0, 1] NCHW in, logits out), for your own evaluation tools")
    x.add_argument("--bundle", help="the bundle (default: the `bundle` setting: SHIELDSERVE_BUNDLE, the config's "
                                     "`bundle:`, else the packaged models/default)")
    x.add_argument("--pipeline", required=True)
    x.add_argument("--out", required=True, help="TorchScript file to write")
    x.add_argument("--config", help="service YAML merged over the packaged configuration")
    x.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an earlier shieldserve export")
    x.set_defaults(func=_export)
    return p


def user_modules_importable() -> None:
    """Let `import:package.module:factory` name a module in the current directory, as it does
    under `python -m service` (and as uvicorn imports an app): the `shieldserve` script does
    not put the directory on sys.path. Appended, so installed packages are never shadowed."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def main(argv: list[str] | None = None) -> int:
    user_modules_importable()
    args = build_parser().parse_args(argv)
    # what the manifest and the report record as the command: the words after the subcommand,
    # from main's own argv when given one (a program calling it), else the console script's
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.traceback:
            raise
        # what was stopped said so in its log line (a train step: the bundle as before it)
        print("shieldserve: interrupted", file=sys.stderr)
        return 130  # the shell's status for a process ended by SIGINT
    except Exception as exc:
        if args.traceback or not _user_error(exc):
            raise
        print(f"shieldserve: error: {_one_line(exc)}", file=sys.stderr)
        return 2  # argparse's status for its own usage errors


def _user_error(exc: BaseException) -> bool:
    """Exceptions that say the user gave something wrong (a file, an option, a bundle) and whose
    message says what: these end in one line. Anything else (a RuntimeError from torch in a
    training loop, an AttributeError in our code) is a bug or an environment failure and keeps its
    traceback. BundleError is a RuntimeError but names a bundle the user pointed us at (and
    ServiceError the service at --url);
    ValueError covers pydantic's ValidationError (settings), FeatureError, PipelineConfigError and
    ExportRefused; KeyError covers UnknownPipeline and np.load's missing array. The classes of
    modules not yet imported cannot have been raised, so none is imported here (that would load
    torch for `serve --help`)."""
    user: list[type] = [ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
                        NotADirectoryError, PermissionError]
    # ServiceError (a RuntimeError): the service at --url refused or could not be reached
    # (connection refused, a wrong API key, another model version); its message names it
    for module, name in (("models.bundle", "BundleError"), ("yaml", "YAMLError"),
                         ("safetensors", "SafetensorError"), ("service.evaluation.blackbox", "ServiceError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            user.append(cls)
    return isinstance(exc, tuple(user))


def _one_line(exc: BaseException) -> str:
    """The message on one line: pydantic's and torch's span several; str(KeyError) adds quotes."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__
