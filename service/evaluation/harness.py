"""The evaluation run: every section for every requested pipeline, then the report.

Everything runs in process on the real pipelines built from the bundle and the packaged
configuration (the same objects the service serves), except the optional HTTP black-box
mode, which talks to a running service through /predict only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service.evaluation import adaptive, blackbox, metrics, targets
from service.evaluation.attacks import Budget, art_attack, gmsa_rmc, progress_enabled
from service.evaluation.report import write_text
from service.evaluation.targets import Outcome

log = logging.getLogger("shieldserve.evaluate")

SMOOTHING_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
ALL_SECTIONS = ("oblivious", "transfer", "graybox", "adaptive", "blackbox", "certify")
OPTIONAL_SECTIONS = ("autoattack",)  # costly: run only when asked (--sections / --attacks autoattack)
# the attack names EvalConfig.attacks (--attacks) keeps: those the sections ask `wants` about,
# and autoattack, which also turns its section on
ATTACKS = ("pgd", "apgd", "cw", "bpda", "gmsa", "square", "hsj", "autoattack", "mifgsm")
NORMS = ("linf", "l2")  # transfer_norms and autoattack_norms: at budget.linf_eps and max(budget.l2_eps)
# EvalConfig's per-pipeline counts (NAME=N: the field's flag is --pipeline-limit, ...) and the
# least N each takes: 0 black-box digits leave a pipeline out of that section (blackbox()),
# every other count needs at least one digit or sample
PIPELINE_COUNTS = {"pipeline_limit": 1, "smoothing_n": 1, "certify_limit": 1, "certify_n_for": 1,
                   "blackbox_limit": 0, "adaptive_limit": 1, "autoattack_limit": 1}
# EvalConfig's other counts: their flag and the least each takes
COUNTS = {"limit": ("--limit", 1), "offset": ("--offset", 0), "certify_n": ("--certify-n", 1),
          "blackbox_default_limit": ("--blackbox-digits", 0), "transfer_surrogates": ("--transfer-surrogates", 1)}


@dataclass
class EvalConfig:
    bundle: str = "models/default"
    out: str = "evaluation"
    pipelines: list[str] | None = None          # None: every configured pipeline
    limit: int = 100                            # test digits (stratified)
    offset: int = 0                             # skip this many of them first (one long run split over processes)
    pipeline_limit: dict[str, int] = field(default_factory=dict)   # fewer digits for costly pipelines
    sections: tuple[str, ...] = ALL_SECTIONS
    attacks: tuple[str, ...] | None = None      # keep only these attack names (e.g. pgd, cw, square)
    budget: Budget = field(default_factory=Budget)
    smoothing_n: dict[str, int] = field(default_factory=dict)      # PREDICT samples per pipeline (default: the service's)
    certify_n: int = 10_000
    certify_n0: int = 100
    certify_alpha: float = 0.001
    certify_limit: dict[str, int] = field(default_factory=dict)
    blackbox_limit: dict[str, int] = field(default_factory=dict)   # digits per pipeline for black-box
    blackbox_default_limit: int = 20
    adaptive_limit: dict[str, int] = field(default_factory=dict)   # digits for the adaptive section
    certify_n_for: dict[str, int] = field(default_factory=dict)    # CERTIFY samples per pipeline
    doc: str | None = None                      # also write the published report here (plots linked relative to it)
    adaptive_sweep: bool = False                # adaptive PGD at every sweep eps too (cheap pipelines)
    sweep_max_seconds: float = 0.05             # eps sweep only where a clean digit costs less than this
    url: str | None = None                      # black-box over HTTP against this service
    api_key: str | None = field(default=None, repr=False)  # sent as Authorization: Bearer; never in a report
    seed: int = 0
    batch: int = 100
    config: str | None = None                   # service config YAML merged over the packaged one
    command: str = ""
    jobs: int = 1                               # pipelines evaluated side by side in this many processes
    threads: int = 1                            # torch threads per process
    autoattack_limit: dict[str, int] = field(default_factory=dict)  # digits for a pipeline's AutoAttack
    autoattack_norms: tuple[str, ...] = NORMS                       # at budget.linf_eps and max(budget.l2_eps)
    autoattack_budget: dict[str, int] = field(default_factory=dict)  # AutoAttackBudget overrides (default: standard)
    transfer_surrogates: int = 3                # independently trained surrogates in the transfer ensemble
    transfer_norms: tuple[str, ...] = NORMS                         # at budget.linf_eps and max(budget.l2_eps)

    def n_for(self, name: str) -> int:
        return min(self.limit, self.pipeline_limit.get(name, self.limit))

    def wants(self, attack: str) -> bool:
        if attack not in ATTACKS:  # every attack asked about must be one check() lets --attacks name
            raise AssertionError(f"attack {attack!r} is not in harness.ATTACKS")
        return self.attacks is None or attack in self.attacks

    def check(self, configured: Collection[str] | None = None) -> None:
        """ValueError naming the first value no evaluation could use: an unknown section, attack,
        norm, AutoAttack budget key or pipeline (`configured`: the configured pipelines; default:
        those of `config`), or a count below what its field takes. Cheap (no bundle, no
        network): the command calls it before any work, Evaluation again for other callers.

        A NAME=N field may name any configured pipeline, not only those this run evaluates: the
        same flags serve runs split by --pipelines (report.merge), and without --pipelines which
        configured pipelines run is known only once the bundle is open (a pipeline whose
        defenses it lacks is left out)."""
        from dataclasses import fields

        from service.evaluation.autoattack import AutoAttackBudget

        if configured is None:
            from service.settings import load_settings

            configured = load_settings(self.config, bundle=self.bundle).pipelines
        configured = list(configured)
        pipelines = f"configured pipelines: {', '.join(configured)}"
        check_names("--pipelines", self.pipelines or (), configured, "pipeline", choices=pipelines)
        check_names("--sections", self.sections, (*ALL_SECTIONS, *OPTIONAL_SECTIONS), "section")
        check_names("--attacks", self.attacks or (), ATTACKS, "attack")
        check_names("--transfer-norms", self.transfer_norms, NORMS, "norm")
        check_names("--autoattack-norms", self.autoattack_norms, NORMS, "norm")
        for name, (flag, least) in COUNTS.items():
            if getattr(self, name) < least:
                raise ValueError(f"{flag} {getattr(self, name)}: must be >= {least}")
        for name, least in PIPELINE_COUNTS.items():
            flag = "--" + name.replace("_", "-")
            for pipeline, n in getattr(self, name).items():
                if pipeline not in configured:
                    raise ValueError(f"{flag} {pipeline}={n}: no pipeline {pipeline!r} is configured; {pipelines}")
                if not isinstance(n, int) or n < least:
                    raise ValueError(f"{flag} {pipeline}={n}: N must be a whole number >= {least}")
        keys = [f.name for f in fields(AutoAttackBudget)]
        for key, n in self.autoattack_budget.items():
            if key not in keys:
                raise ValueError(f"--autoattack-budget {key}={n}: unknown key {key!r}; choose from {', '.join(keys)}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"--autoattack-budget {key}={n}: N must be a whole number >= 1")


def finished_report(out: Path) -> dict[str, Any] | None:
    """The report.json in `out` if a run finished it (it has `finished`), else None: no report,
    or an interrupted run's (saved as it went; rerunning the command starts it over)."""
    try:
        report = json.loads((Path(out) / "report.json").read_text())
    except (OSError, ValueError):  # none, or not one of ours
        return None
    return report if isinstance(report, dict) and "finished" in report else None


def check_names(flag: str, given: Collection[str], valid: Collection[str], what: str, choices: str = "") -> None:
    """ValueError naming the values of `given` that are not in `valid`, and the valid ones."""
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise ValueError(f"{flag}: unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         + (choices or f"choose from {', '.join(valid)}"))


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not progress_enabled(),
                file=sys.stderr, dynamic_ncols=True)


def _outcome_json(o: Outcome, y: np.ndarray, clean: Outcome | None) -> dict[str, Any]:
    d = {"n": int(len(y)), "accepted_correct": round(float(o.correct(y).mean()), 4),
         "wrong": round(float(o.wrong(y).mean()), 4), "rejected": round(float(o.rejected.mean()), 4),
         "abstained": round(float(o.abstained.mean()), 4),
         "seconds_per_image": round(o.seconds / max(1, len(y)), 4)}
    if clean is not None:
        d["robust_accuracy"] = round(metrics.robust_accuracy(clean, o, y), 4)
        robust = int((clean.correct(y) & ~o.wrong(y)).sum())
        lo, hi = metrics.clopper_pearson(robust, len(y))  # rounded outwards: the interval stays >= 95%
        d["robust_accuracy_ci95"] = [math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4]
    return d


class Evaluation:
    def __init__(self, cfg: EvalConfig) -> None:
        from models.bundle import Bundle
        from models.datasets import load_dataset
        from models.recipes.common import require_same_data
        from service.defenses.base import DefenseEnv
        from service.pipeline import Pipeline
        from service.settings import load_settings

        self.cfg = cfg
        self.started = time.time()
        settings = load_settings(cfg.config, bundle=cfg.bundle)
        cfg.check(settings.pipelines)  # before the bundle is opened (the command checked it already)
        self.bundle = Bundle.load(settings.bundle, trusted_imports=settings.trusted_imports)
        self.bundle.require_finished()
        self.base = self.bundle.classifier()
        env = DefenseEnv(bundle=self.bundle, classifier=self.base, device=torch.device("cpu"), settings=settings)
        names = cfg.pipelines or [n for n in settings.pipelines if not self._unusable(settings, n)]
        # the bundle's own dataset: a user's bundle is evaluated on its test split, not on MNIST
        ds = load_dataset(self.bundle.manifest.get("build", {}).get("dataset", "mnist5k"))
        # by content, as `train --steps` checks it: an npz replaced in place was evaluated
        # without a word, its report under the bundle's name
        where = (self.bundle.manifest.get("build") or {}).get("dataset", "its dataset")
        require_same_data(ds, self.bundle.manifest, where, self.bundle.path, "evaluate a bundle built on this data")
        if cfg.offset < 0 or cfg.limit < 1:
            raise ValueError("--limit must be >= 1 and --offset >= 0")
        # the stratified order is the same whatever the count (any prefix is balanced), so digits
        # [offset, offset + limit) of it are exactly those a run over offset + limit adds
        per = max(1, math.ceil((cfg.offset + cfg.limit) / len(ds.class_names)))
        test = ds.test.per_class(per)
        part = slice(cfg.offset, cfg.offset + cfg.limit)
        self.x, self.y = test.x[part], test.y[part]
        if not len(self.y):
            raise ValueError(f"--offset {cfg.offset} is past the {len(test.y)} test digits of the stratified order")
        span = f"first {len(self.y)} digits" if not cfg.offset else f"digits {cfg.offset + 1}-{cfg.offset + len(self.y)}"
        self.pipes = {n: Pipeline.build(n, settings.pipelines[n].model_dump(), env) for n in names}
        if not cfg.pipelines:  # as the service: a composition the gate did not pass as a whole is left out,
            # and a defense with other settings than the gate measured it with (unmeasured where enforced)
            from service.runtime import gated_digests

            here = gated_digests(self.bundle, self.base, torch.device("cpu"))
            for n in list(self.pipes):
                reason = self.bundle.composition_refusal(settings.pipelines[n].defenses, self.pipes[n].settings_digest,
                                                         here)
                if reason is not None:
                    log.warning("pipeline %s is not evaluated: %s", n, reason)
                    del self.pipes[n]
        self.report: dict[str, Any] = {
            "command": self.scrub(cfg.command), "bundle": str(cfg.bundle), "bundle_version": self.bundle.version,
            "dataset": f"{ds.name} test split, {span} stratified by class",
            "limit": len(self.y), "offset": cfg.offset, "seed": cfg.seed, "budget": cfg.budget.to_json(),
            "sections": list(cfg.sections), "attacks": list(cfg.attacks) if cfg.attacks is not None else None,
            "transfer_norms": list(cfg.transfer_norms), "autoattack_norms": list(cfg.autoattack_norms),
            "certify": {"n": cfg.certify_n, "n0": cfg.certify_n0, "alpha": cfg.certify_alpha},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "oblivious_attacks": {}, "transfer_attacks": {}, "pipelines": {}}
        self.dataset = ds
        self.oblivious: dict[str, torch.Tensor] = {}
        self.transfer: dict[str, torch.Tensor] = {}
        self._advs: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def scrub(self, text: str) -> str:
        """`text` without the --url's password and the API key (reports, logs, errors)."""
        return blackbox.scrub(text, self.cfg.url, (self.cfg.api_key,))

    def http_client(self) -> Any:
        """The HTTP client of the black-box section's `--url` mode (a test replaces it)."""
        import httpx

        headers = {}
        if self.cfg.api_key:
            # a URL with credentials (a gateway's Basic auth) has httpx put them in
            # Authorization, over a Bearer key: the key then goes in the service's other header
            headers = ({"X-API-Key": self.cfg.api_key} if httpx.URL(self.cfg.url).userinfo
                       else {"Authorization": f"Bearer {self.cfg.api_key}"})
        return httpx.Client(base_url=self.cfg.url, timeout=120.0, headers=headers)

    def _unusable(self, settings: Any, name: str) -> str | None:
        """Why a configured pipeline is not served on this bundle (the service leaves it out too)."""
        from models.bundle import defense_key

        for entry in settings.pipelines[name].defenses:
            reason = self.bundle.unusable(defense_key(entry))
            if reason is not None:
                log.warning("pipeline %s is not evaluated: %s", name, reason)
                return reason
        return None

    def options(self, name: str) -> dict[str, Any]:
        n = self.cfg.smoothing_n.get(name)
        return {"n": int(n)} if n else {}

    def run(self, name: str, x: torch.Tensor, seed: int, desc: str) -> Outcome:
        with _bar(len(x), f"{name}: {desc}") as bar:
            return targets.run(self.pipes[name], x, batch=self.cfg.batch, seed=seed, options=self.options(name), bar=bar)

    def save(self) -> None:
        """report.json as measured so far, replaced whole (a kill mid-write leaves the last one)."""
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "report.json", json.dumps(clean_json(self.report), indent=2, default=_json_default) + "\n")

    # ------------------------------------------------------------------ oblivious
    def make_oblivious(self) -> None:
        b, x, y = self.cfg.budget, self.x, self.y
        plan: list[tuple[str, str, dict[str, Any]]] = []
        if self.cfg.wants("pgd"):
            plan += [(f"pgd_linf_{e:g}", "pgd", {"eps": e, "norm": "linf"}) for e in b.linf_sweep]
            if b.linf_eps not in b.linf_sweep:
                plan.append((f"pgd_linf_{b.linf_eps:g}", "pgd", {"eps": b.linf_eps, "norm": "linf"}))
        if self.cfg.wants("apgd"):
            plan.append((f"apgd_linf_{b.linf_eps:g}", "apgd", {"eps": b.linf_eps, "norm": "linf"}))
        if self.cfg.wants("cw"):
            plan.append(("cw_l2", "cw", {}))
        for label, kind, kw in tqdm(plan, desc="oblivious attacks on the base classifier", leave=False,
                                    disable=not progress_enabled(), file=sys.stderr):
            t = time.perf_counter()
            adv = art_attack(kind, self.base, x, y, budget=b, seed=self.cfg.seed, **kw)
            secs = time.perf_counter() - t
            self.oblivious[label] = adv
            with torch.no_grad():
                wrong = self.base(adv).argmax(1) != y
            if kind == "cw":
                # within the run's largest L2 budget, as the pipelines' rows count it (at any
                # size, the base table said 0.50 fooled where the baseline row said 0.40)
                wrong &= (adv - x).flatten(1).norm(dim=1) <= max(b.l2_eps) + 1e-6
                kw = {**kw, "counted_within_l2": max(b.l2_eps)}
            fooled = float(wrong.float().mean())
            self.report["oblivious_attacks"][label] = {"attack": kind, **kw, "n": len(y),
                                                       "success_on_base": round(fooled, 4),
                                                       **{k: round(v, 4) for k, v in metrics.norms(x, adv).items()},
                                                       "seconds_per_image": round(secs / len(y), 4)}
            log.info("oblivious %s: base fooled on %.3f", label, fooled)

    # ------------------------------------------------------------------ transfer
    def make_transfer(self) -> None:
        """Adversarials crafted on an ensemble of surrogates the attacker trained (never on the
        bundle's weights), made once like the oblivious ones; the base classifier's own
        failure rate on them is recorded beside the surrogates'."""
        from service.evaluation import transfer

        cfg, b, x, y = self.cfg, self.cfg.budget, self.x, self.y
        if not cfg.wants("mifgsm"):
            return
        t = time.perf_counter()
        surrogates = transfer.load_or_train_surrogates(self.dataset, self.bundle.version,
                                                       Path(cfg.out) / "transfer_surrogates",
                                                       k=cfg.transfer_surrogates, seed=cfg.seed)
        train_secs = time.perf_counter() - t
        ensemble = transfer.LogitEnsemble([s.net for s in surrogates])
        for norm in cfg.transfer_norms:
            eps = b.linf_eps if norm == "linf" else max(b.l2_eps)
            label = f"mifgsm_di_{norm}_{eps:g}"
            with _bar(len(x), f"transfer {label} on {len(surrogates)} surrogates") as bar:
                t = time.perf_counter()
                adv = transfer.transfer_attack(ensemble, x, y, eps, norm=norm, steps=b.transfer_steps,
                                               decay=b.transfer_decay, diversity=b.transfer_diversity,
                                               batch_size=cfg.batch, seed=cfg.seed, bar=bar)
                secs = time.perf_counter() - t
            self.transfer[label] = adv
            with torch.no_grad():
                on_base = float((self.base(adv).argmax(1) != y).float().mean())
                on_ensemble = float((ensemble(adv).argmax(1) != y).float().mean())
            self.report["transfer_attacks"][label] = {
                "attack": "mi-fgsm + input diversity on the surrogates' mean logits", "norm": norm, "eps": eps,
                "steps": b.transfer_steps, "decay": b.transfer_decay, "diversity": b.transfer_diversity,
                "n": len(y), "success_on_surrogates": round(on_ensemble, 4), "success_on_base": round(on_base, 4),
                **{k: round(v, 4) for k, v in metrics.norms(x, adv).items()},
                "seconds_per_image": round(secs / len(y), 4)}
            log.info("transfer %s: surrogates fooled on %.3f, base on %.3f", label, on_ensemble, on_base)
        self.report["transfer_surrogates"] = {"surrogates": [s.to_json() for s in surrogates],
                                              "train_split": f"{self.dataset.name} train ({len(self.dataset.train)} "
                                                             f"images; validation picks the epoch)",
                                              "seconds": round(train_secs, 1)}

    # ------------------------------------------------------------------ one pipeline
    def evaluate_pipeline(self, name: str) -> None:
        cfg, b = self.cfg, self.cfg.budget
        pipe = self.pipes[name]
        a = targets.anatomy(pipe)
        n = cfg.n_for(name)
        x, y = self.x[:n], self.y[:n]
        yn = y.numpy()
        rep: dict[str, Any] = {"digits": n, "defenses": a.defenses, "description": pipe.description,
                               "certifies": pipe.certifies, "has_detector": bool(a.detectors),
                               "smoothing_n": self.options(name).get("n"), "attacks": {}}
        self.report["pipelines"][name] = rep
        clean = self.run(name, x, cfg.seed, "clean")
        rep["clean"] = {"accuracy": round(metrics.accuracy(clean, yn), 4),
                        "false_rejection_rate": round(float(clean.rejected.mean()), 4),
                        "abstention_rate": round(float(clean.abstained.mean()), 4),
                        "seconds_per_image": round(clean.seconds / n, 4)}
        self.save()
        findings: list[metrics.Finding] = []
        cheap = clean.seconds / n < cfg.sweep_max_seconds

        def record(section: str, label: str, adv: torch.Tensor, gen_seconds: float, extra: dict[str, Any] | None = None,
                   digits: int | None = None, answered: Outcome | None = None) -> None:
            k = digits or n
            xa, ya = adv[:k], yn[:k]
            diff = (xa - self.x[:k]).flatten(1)  # the scored adversarials' distances, once
            if label.endswith("cw_l2"):
                # CW minimises L2 with no bound: its adversarial counts within the run's largest L2
                # budget only, as HopSkipJump's does (counted at any size, it broke digits at L2 5.5
                # and set the headline's "worst of all attacks" below every bounded attack)
                eps = max(b.l2_eps)
                far = diff.norm(dim=1) > eps + 1e-6
                xa = torch.where(far.view(-1, *([1] * (xa.dim() - 1))), self.x[:k], xa)
                diff = torch.where(far[:, None], torch.zeros_like(diff), diff)  # those rows: the clean digit
                extra = {**(extra or {}), "eps": eps, "norm": "l2",
                         "beyond_eps": round(float(far.float().mean()), 4)}
            if answered is not None:  # black-box over HTTP: scored from the answers the attack got
                o = answered
            else:
                o = self.run(name, xa, cfg.seed + 1000 * (len(rep["attacks"]) + 1), f"{section} {label}")
            cl = _slice(clean, k)
            row = {"section": section, "attack": label, **_outcome_json(o, ya, cl),
                   "attack_success": round(metrics.attack_success(o, ya), 4),
                   **{k2: round(v, 4) for k2, v in metrics.norms(self.x[:k], xa).items()},
                   "attack_seconds_per_image": round(gen_seconds / max(1, k), 4)}
            if answered is not None:  # no one answer per digit to split into accepted / rejected / abstained
                row.update({"accepted_correct": None, "rejected": None, "abstained": None, "seconds_per_image": None,
                            "scored_from": "the attack's own answers (broken: an accepted wrong answer within eps)"})
            if a.detectors:
                # the digits the attack changed: where it failed it hands back the clean digit, and
                # a clean digit against itself is no test of the detector (Square's AUC read 0.585
                # with 8 of 10 digits unchanged, 0.950 on the two it changed)
                moved = (diff.abs().amax(dim=1) > 0).numpy()
                scores = np.asarray(o.score)[moved]
                row["detection_auc_digits"] = int(moved.sum())
                row["detection_auc"] = round(metrics.auc_roc(clean.score, scores), 4) if moved.any() else None
                fpr, tpr = metrics.roc_curve(clean.score, scores) if moved.any() else ([], [])
                row["roc"] = {"fpr": fpr, "tpr": tpr}
            row.update(extra or {})
            rep["attacks"][f"{section}/{label}"] = row
            if a.smoothing is not None:  # kept for the invariant's re-check
                self._advs[(name, f"{section}/{label}")] = xa
            l2 = diff.norm(dim=1)
            for i in np.flatnonzero(o.wrong(ya)):
                findings.append(metrics.Finding(int(i), f"{section}/{label}", float(l2[i]), int(o.labels[i])))
            self.save()

        # -------- oblivious: the base classifier's adversarials
        if "oblivious" in cfg.sections:
            for label, adv in self.oblivious.items():
                sweep_only = label.startswith("pgd_linf_") and not label.endswith(f"_{b.linf_eps:g}")
                if sweep_only and not cheap:
                    continue
                meta = self.report["oblivious_attacks"][label]
                record("oblivious", label, adv[:n], meta["seconds_per_image"] * n)

        # -------- transfer: adversarials of the attacker's own surrogate ensemble
        if "transfer" in cfg.sections:
            for label, adv in self.transfer.items():
                meta = self.report["transfer_attacks"][label]
                record("transfer", label, adv[:n], meta["seconds_per_image"] * n)

        # -------- gray-box: the labeling network without secrets, detectors or noise
        ka = min(n, cfg.adaptive_limit.get(name, n))  # gray-box and adaptive digits
        x, y = self.x[:ka], self.y[:ka]
        rep["attack_digits"] = ka
        if "graybox" in cfg.sections and cfg.wants("pgd"):
            g = adaptive.graybox_model(a)
            if g is None:
                rep["graybox_note"] = "the labeling network is the base classifier: gray-box = oblivious"
            else:
                t = time.perf_counter()
                adv = art_attack("pgd", g, x, y, eps=b.linf_eps, norm="linf", budget=b, seed=cfg.seed)
                record("graybox", f"pgd_linf_{b.linf_eps:g}", adv, time.perf_counter() - t, digits=ka)
                if a.smoothing is not None:
                    for e in b.l2_eps:
                        t = time.perf_counter()
                        adv = art_attack("pgd", g, x, y, eps=e, norm="l2", budget=b, seed=cfg.seed)
                        record("graybox", f"pgd_l2_{e:g}", adv, time.perf_counter() - t, digits=ka)

        # -------- adaptive white-box
        if "adaptive" in cfg.sections:
            self.adaptive(name, a, x, y, lambda *args, **kw: record(*args, **kw, digits=ka), cheap)
        x, y = self.x[:n], self.y[:n]

        # -------- AutoAttack (standard version) and PGD with restarts, on the white-box model
        if "autoattack" in cfg.sections or (cfg.attacks is not None and "autoattack" in cfg.attacks):
            self.autoattack(name, a, record)

        # -------- black-box: /predict answers only, query budget
        if "blackbox" in cfg.sections:
            self.blackbox(name, x, y, record)

        # -------- certification and the invariant
        if "certify" in cfg.sections and a.smoothing is not None:
            self.certify(name, a, x, y, clean, findings, rep)
        self.save()

    def adaptive(self, name: str, a: targets.Anatomy, x: torch.Tensor, y: torch.Tensor, record: Any, cheap: bool) -> None:
        cfg, b = self.cfg, self.cfg.budget
        rep = self.report["pipelines"][name]
        if a.rmc is not None:
            if cfg.wants("gmsa"):
                with _bar(len(x), f"{name}: GMSA") as bar:
                    t = time.perf_counter()
                    adv, rounds = gmsa_rmc(a.rmc, x, y, eps=b.linf_eps, budget=b, seed=cfg.seed, bar=bar)
                record("adaptive", f"gmsa_pgd_linf_{b.linf_eps:g}", adv, time.perf_counter() - t, extra={"gmsa": rounds})
            return
        if not (a.purifiers or a.detectors or a.smoothing) and a.labeler is self.base:
            rep["adaptive_model"] = "no defense: the oblivious adversarials are already white-box"
            for label, adv in self.oblivious.items():
                if label.endswith(f"_{b.linf_eps:g}") or not label.startswith("pgd_linf_"):
                    record("adaptive", label, adv[:len(x)], self.report["oblivious_attacks"][label]["seconds_per_image"] * len(x))
            return
        model = adaptive.adaptive_model(a, eot_draws=b.eot_draws, seed=cfg.seed)
        what = []
        if a.purifiers:
            what.append("BPDA" if any(p.defense == "defensegan" for p in a.purifiers) else "exact reformer gradient")
        if model.eot:
            what.append(f"EOT x{b.eot_draws}")
        if model.detectors:
            what.append("detector-aware (targeted at the runner-up class, K+1 outputs)")
        rep["adaptive_model"] = ", ".join(what) or "the classifier itself"
        bpda = any(p.defense == "defensegan" for p in a.purifiers)
        plan: list[tuple[str, str, dict[str, Any]]] = []
        if model.eot is not None:
            if cfg.wants("pgd"):
                plan.append((f"eot_pgd_linf_{b.linf_eps:g}", "pgd", {"eps": b.linf_eps, "norm": "linf", "steps": b.eot_steps}))
                plan += [(f"eot_pgd_l2_{e:g}", "pgd", {"eps": e, "norm": "l2", "steps": b.eot_steps}) for e in b.l2_eps]
        elif bpda:
            if cfg.wants("pgd") or cfg.wants("bpda"):
                plan.append((f"bpda_pgd_linf_{b.linf_eps:g}", "pgd", {"eps": b.linf_eps, "norm": "linf", "steps": b.bpda_steps}))
        else:
            prefix = "aware_" if model.detectors else ("reformer_" if a.purifiers else "")
            eps_list = b.linf_sweep if cheap and cfg.adaptive_sweep else (b.linf_eps,)
            if b.linf_eps not in eps_list:
                eps_list = (*eps_list, b.linf_eps)
            if cfg.wants("pgd"):
                plan += [(f"{prefix}pgd_linf_{e:g}", "pgd", {"eps": e, "norm": "linf"}) for e in eps_list]
            if cfg.wants("apgd"):
                plan.append((f"{prefix}apgd_linf_{b.linf_eps:g}", "apgd", {"eps": b.linf_eps, "norm": "linf"}))
            if cfg.wants("cw"):
                plan.append((f"{prefix}cw_l2", "cw", {}))
        for label, kind, kw in plan:
            t = time.perf_counter()
            adv = art_attack(kind, model, x, y, budget=b, seed=cfg.seed, batch_size=cfg.batch,
                             num_classes=self.bundle.input_spec.num_classes, **kw)
            record("adaptive", label, adv, time.perf_counter() - t)

    def autoattack(self, name: str, a: targets.Anatomy, record: Any) -> None:
        from service.evaluation import autoattack as aa

        cfg, b = self.cfg, self.cfg.budget
        rep = self.report["pipelines"][name]
        if a.rmc is not None:
            rep["autoattack_note"] = "not run: RMC adapts to each request; its adaptive attack is GMSA"
            return
        if any(p.defense == "defensegan" for p in a.purifiers):
            rep["autoattack_note"] = "not run: Defense-GAN's projection has no gradient; its adaptive attack is BPDA"
            return
        n = cfg.n_for(name)
        k = min(n, cfg.autoattack_limit.get(name, n))
        x, y = self.x[:k], self.y[:k]
        randomized = a.smoothing is not None
        # the standard version on deterministic, detector-free pipelines; else rand (EOT over the
        # noise: one draw per gradient, averaged over eot_iter gradients, as the reference does)
        # and/or detector-aware (a (K+1)-th rejected logit); candidates judged by many draws
        model = adaptive.adaptive_model(a, eot_draws=1, seed=cfg.seed)  # purifiers with exact gradients, then the labeler
        budget = aa.AutoAttackBudget(**cfg.autoattack_budget)
        # APGD-T has K - 1 wrong classes to aim at: the budget recorded (and printed) is what ran
        budget = replace(budget, targets=min(budget.targets, self.bundle.input_spec.num_classes - 1))
        check = adaptive.adaptive_model(a, eot_draws=budget.check_draws, seed=cfg.seed + 1) if randomized else model
        classes = self.bundle.input_spec.num_classes if model.rejects else None
        rep["autoattack_digits"] = k
        for norm in cfg.autoattack_norms:
            eps = b.linf_eps if norm == "linf" else max(b.l2_eps)
            with _bar(k, f"{name}: AutoAttack {norm} {eps:g}") as bar:
                t = time.perf_counter()
                adv, log_ = aa.autoattack(model, x, y, eps, norm=norm, budget=budget, seed=cfg.seed,
                                          batch_size=cfg.batch, classes=classes, randomized=randomized,
                                          check=check, bar=bar)
            record("autoattack", f"autoattack_{norm}_{eps:g}", adv, time.perf_counter() - t,
                   extra={"autoattack": log_, "budget": budget.__dict__}, digits=k)
            if randomized or classes is not None:
                continue  # PGD on these models: the adaptive section's EOT and detector-aware PGD
            t = time.perf_counter()
            adv = aa.pgd_restarts(model, x, y, eps, norm=norm, steps=budget.pgd_steps, restarts=budget.pgd_restarts,
                                  seed=cfg.seed, batch_size=cfg.batch)
            record("autoattack", f"pgd{budget.pgd_steps}x{budget.pgd_restarts}_{norm}_{eps:g}", adv,
                   time.perf_counter() - t, digits=k)

    def blackbox(self, name: str, x: torch.Tensor, y: torch.Tensor, record: Any) -> None:
        cfg, b = self.cfg, self.cfg.budget
        k = min(len(x), cfg.blackbox_limit.get(name, cfg.blackbox_default_limit))
        if k <= 0:
            return
        if cfg.url:
            client = self.http_client()
            where = blackbox.scrub(cfg.url, cfg.url)
            oracle: Any = blackbox.HttpOracle(client, name, expected_version=self.bundle.version, where=where)
        else:
            client = None
            oracle = blackbox.PipelineOracle(self.pipes[name], seed=cfg.seed + 555)
        hsj_eps = max(b.l2_eps)
        try:
            for kind, budget, eps in (("square", b.square_queries, b.linf_eps), ("hsj", b.hsj_queries, hsj_eps)):
                if not cfg.wants(kind):
                    continue
                refused, blocked = getattr(oracle, "refused", 0), getattr(oracle, "blocked", 0)
                with _bar(k, f"{name}: black-box {kind}") as bar:
                    t = time.perf_counter()
                    # eps bounds Square's queries; HopSkipJump takes no eps (it minimises L2 from a
                    # digit of another class): its result is judged against hsj_eps below
                    adv, rows = blackbox.attack_many(kind, oracle, x[:k], y[:k], budget=budget, eps=b.linf_eps,
                                                     http=bool(cfg.url), seed=cfg.seed, bar=bar,
                                                     pool=(self.dataset.test.x, self.dataset.test.y))
                    secs = time.perf_counter() - t
                dist = np.array([r["distance"] if r["distance"] is not None else np.inf for r in rows])
                if kind == "hsj":  # label-only, minimises L2: a success counts within L2 <= eps only
                    far = dist > eps
                    adv[torch.from_numpy(far)] = x[:k][torch.from_numpy(far)]
                found = np.isfinite(dist)
                norm = "linf" if kind == "square" else "l2"
                extra = {"digits": k, "query_budget": budget, "mode": "http" if cfg.url else "in-process",
                         "queries_used_mean": round(float(np.mean([r["queries"] for r in rows])), 1),
                         "queries_used_max": int(max(r["queries"] for r in rows)),
                         "found_any_adversarial": round(float(found.mean()), 4),
                         "median_distance_found": round(float(np.median(dist[found])), 4) if found.any() else None,
                         "eps": eps, "norm": norm}
                answered = None
                if cfg.url:  # scored from the answers received: a re-post would be one more (monitored) query
                    answered = blackbox.answered_outcome(rows, eps, norm)
                    extra["refused_images"] = oracle.refused - refused      # 429 overloaded / 503
                    extra["digits_blocked"] = oracle.blocked - blocked      # 429 attack_suspected ended the digit
                label = f"square_linf_{b.linf_eps:g}" if kind == "square" else f"hsj_l2_{eps:g}"
                record("blackbox", label, adv, secs, extra=extra, digits=k, answered=answered)
        finally:
            if client is not None:
                client.close()

    def certify(self, name: str, a: targets.Anatomy, x: torch.Tensor, y: torch.Tensor, clean: Outcome,
                findings: list[metrics.Finding], rep: dict[str, Any]) -> None:
        from service.defenses.smoothing import NoiseSampler, certify

        cfg = self.cfg
        s = a.smoothing
        k = min(len(x), cfg.certify_limit.get(name, len(x)))
        sampler = NoiseSampler(s.function(s.sigma, a.labeler), s.sigma, 10, s.batch_size)  # type: ignore[attr-defined]
        cache = getattr(self, "_cert_cache", {})
        self._cert_cache = cache
        n_cert = cfg.certify_n_for.get(name, cfg.certify_n)
        key = certify_key(a, k, n_cert)
        t = time.perf_counter()
        if key in cache:  # the same smoothed classifier (e.g. `default` = MagNet + `smoothing`)
            labels, radii = cache[key]
            reused = True
        else:
            labels, radii = [], []
            with _bar(k, f"{name}: certify n={n_cert}") as bar:
                for i in range(k):
                    cert, _ = certify(sampler, x[i], cfg.certify_n0, n_cert, cfg.certify_alpha, seed=cfg.seed + i)
                    labels.append(cert.label)
                    radii.append(cert.radius)
                    bar.update(1)
            cache[key] = (labels, radii)
            reused = False
        secs = time.perf_counter() - t
        yk = y[:k].numpy()
        accepted = ~clean.rejected[:k]
        cert_acc = metrics.certified_accuracy(labels, radii, yk, SMOOTHING_RADII, accepted=accepted)
        # the certificate covers the smoothed classifier; a detector before it may still reject
        eff_radii = np.where(accepted, np.asarray(radii), 0.0)
        eff_labels = np.where(accepted, np.asarray(labels), -1)

        def recheck(f: metrics.Finding) -> dict[str, Any]:
            # PREDICT again on the same adversarial with 10x the samples and another seed
            adv = self._adversarial_for(name, f)
            if adv is None:
                return {"confirmed": True, "note": "adversarial not kept"}
            n_big = 10 * int(self.options(name).get("n", s.n))  # type: ignore[attr-defined]
            o = targets.run(self.pipes[name], adv.unsqueeze(0), batch=1, seed=cfg.seed + 99_991 + f.digit,
                            options={"n": n_big})
            return {"n": n_big, "status": str(o.status[0]), "label": int(o.labels[0]),
                    "confirmed": bool(o.wrong(np.array([int(yk[f.digit])]))[0])}

        inside = [f for f in findings if f.digit < k]
        inv = metrics.invariant_check(eff_labels, eff_radii, yk, inside, radii_grid=SMOOTHING_RADII,
                                      clean_wrong=clean.wrong(y.numpy())[:k], recheck=recheck)
        rep["certified"] = {"digits": k, "n": n_cert, "n0": cfg.certify_n0, "alpha": cfg.certify_alpha,
                            "sigma": float(s.sigma), "accuracy": cert_acc,  # type: ignore[attr-defined]
                            "mean_radius_correct": round(float(np.mean([r for r, lab, yy in zip(radii, labels, yk)
                                                                         if lab == yy] or [0.0])), 4),
                            "seconds_per_image": round(secs / max(1, k), 4) if not reused else None,
                            "reused_from_same_smoothed_classifier": reused,
                            "covers_detector": not bool(a.detectors)}
        rep["invariant"] = inv

    def _adversarial_for(self, name: str, f: metrics.Finding) -> torch.Tensor | None:
        adv = self._advs.get((name, f.attack))
        return None if adv is None or f.digit >= len(adv) else adv[f.digit]

    # ------------------------------------------------------------------ main
    def make_shared(self) -> None:
        """The adversarials every pipeline is measured on (made once, before the pipelines)."""
        if "oblivious" in self.cfg.sections:
            self.make_oblivious()
            self.save()
        if "transfer" in self.cfg.sections:
            self.make_transfer()
            self.save()

    def shared(self) -> dict[str, Any]:
        """The shared adversarials and their rows, as numpy for a worker process."""
        return {"oblivious": {k: v.numpy() for k, v in self.oblivious.items()},
                "transfer": {k: v.numpy() for k, v in self.transfer.items()},
                **{k: self.report.get(k, {}) for k in ("oblivious_attacks", "transfer_attacks", "transfer_surrogates")}}

    def run_all(self) -> dict[str, Any]:
        self.make_shared()
        for name in tqdm(list(self.pipes), desc="pipelines", disable=not progress_enabled(), file=sys.stderr):
            t = time.perf_counter()
            try:
                self.evaluate_pipeline(name)
            except Exception as exc:  # noqa: BLE001 - one pipeline's failure must not stop the others
                # recorded as the parallel path records a failed worker: what was measured, no
                # `seconds` (partial), and the error
                log.error("pipeline %s failed: %s", name, self.scrub(repr(exc)))
                self.report["pipelines"][name] = _mark_failed(self.report["pipelines"].get(name, {}), exc, self.scrub)
                self.save()
                continue
            self.report["pipelines"][name]["seconds"] = round(time.perf_counter() - t, 1)
            log.info("pipeline %s evaluated in %.0fs", name, time.perf_counter() - t)
        self.report["seconds"] = round(time.time() - self.started, 1)
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        return self.report


def certify_key(a: targets.Anatomy, k: int, n_cert: int) -> tuple[Any, ...]:
    """What makes two pipelines' certificates the same: the smoothed function (sigma, with or
    without the denoiser, precision) and the networks it evaluates, by their weights (the
    noise-trained classifier at sigma; or the denoiser at sigma and the labeling network
    after it), the digits and the samples. Two denoised-smoothing pipelines with different
    labelers never share certificates; `default` (MagNet + smoothing) and `smoothing` do."""
    s: Any = a.smoothing
    if s.use_denoiser:
        nets = (s.eager_denoisers[s.sigma], a.labeler)
    else:
        nets = (s.eager_classifiers[s.sigma],)
    return (float(s.sigma), bool(s.use_denoiser), str(getattr(s, "precision", "")),
            tuple(weights_id(m) for m in nets), k, n_cert)


def weights_id(net: Any) -> str:
    """A stable id of a network: the sha256 of its parameters and buffers (names, shapes,
    dtypes, values); for a callable without a state_dict, its type and object id."""
    import hashlib

    state = getattr(net, "state_dict", None)
    if state is None:
        return f"{type(net).__qualname__}@{id(net):x}"
    h = hashlib.sha256()
    for key, t in sorted(state().items()):
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _slice(o: Outcome, k: int) -> Outcome:
    return Outcome(o.status[:k], o.labels[:k], o.confidence[:k], o.score[:k], o.seconds * k / max(1, len(o.status)))


def clean_json(v: Any) -> Any:
    """NaN and infinity become null (JSON has neither); numpy scalars become numbers."""
    if isinstance(v, dict):
        return {str(k): clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_json(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write report.json, report.md and the plots into cfg.out.

    With cfg.jobs > 1 the oblivious adversarials are computed once, here, and the pipelines
    are evaluated side by side in `jobs` worker processes (costliest first), each writing its
    own partial report under OUT/parts/ as it goes; their results join one report."""
    from service.evaluation import report as report_writer

    ev = Evaluation(cfg)
    if cfg.jobs > 1 and len(ev.pipes) > 1:
        result = _run_parallel(ev)
    else:
        result = ev.run_all()
    report_writer.write(result, Path(cfg.out), doc=Path(cfg.doc) if cfg.doc else None)
    return result


def _expected_cost(ev: Evaluation, name: str) -> float:
    """A rough order for scheduling: sample units per digit times digits, plus certification."""
    from service.admission import image_cost

    pipe, cfg = ev.pipes[name], ev.cfg
    units = image_cost(pipe) * cfg.n_for(name) * 10
    if pipe.certifies and "certify" in cfg.sections:
        units += cfg.certify_n_for.get(name, cfg.certify_n) * min(cfg.n_for(name), cfg.certify_limit.get(name, cfg.n_for(name)))
    return units


def _run_parallel(ev: Evaluation) -> dict[str, Any]:
    import concurrent.futures as cf
    import multiprocessing as mp

    cfg = ev.cfg
    ev.make_shared()
    shared = ev.shared()
    names = list(ev.pipes)
    order = sorted(names, key=lambda n: -_expected_cost(ev, n))
    parts = Path(cfg.out) / "parts"
    # an earlier run's parts (an interrupted run started over, or one replaced with --force):
    # a worker that failed before its first save was reported with their numbers as its own
    for n in names:
        shutil.rmtree(parts / n, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    log.info("evaluating %d pipelines in %d processes, costliest first: %s", len(names), cfg.jobs, ", ".join(order))
    with cf.ProcessPoolExecutor(max_workers=min(cfg.jobs, len(names)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_evaluate_one, replace(cfg, pipelines=[n], out=str(parts / n), doc=None, jobs=1),
                               n, shared): n for n in order}
        with tqdm(total=len(names), desc="pipelines", disable=not progress_enabled(), file=sys.stderr) as bar:
            for fut in cf.as_completed(futures):
                name = futures[fut]
                try:
                    results[name] = fut.result()
                    log.info("pipeline %s evaluated in %.0fs", name, results[name].get("seconds", 0))
                except Exception as exc:  # noqa: BLE001 - one pipeline's failure must not stop the others
                    log.error("pipeline %s failed: %s", name, ev.scrub(repr(exc)))
                    results[name] = _failed_part(parts / name, exc, ev.scrub)
                bar.update(1)
                ev.report["pipelines"] = {n: results[n] for n in names if n in results}
                ev.save()
    ev.report["pipelines"] = {n: results[n] for n in names}
    ev.report["jobs"] = cfg.jobs
    ev.report["seconds"] = round(time.time() - ev.started, 1)
    ev.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ev.save()
    return ev.report


def _failed_part(part: Path, exc: BaseException, scrub: Any = None) -> dict[str, Any]:
    """What a failed worker had saved of its pipeline (marked partial: no `seconds`), and the error."""
    saved: dict[str, Any] = {}
    try:
        saved = next(iter(json.loads((part / "report.json").read_text())["pipelines"].values()), {})
    except (OSError, ValueError, StopIteration):
        pass
    return _mark_failed(saved, exc, scrub)


def _mark_failed(saved: dict[str, Any], exc: BaseException, scrub: Any = None) -> dict[str, Any]:
    """A failed pipeline's entry, in serial and parallel runs alike: what it had measured,
    marked partial (no `seconds`), and the error (without the --url's password or the API key)."""
    saved.pop("seconds", None)
    error = f"{type(exc).__name__}: {exc}"
    saved["error"] = (scrub(error) if scrub is not None else error)[:500]
    return saved


def _evaluate_one(cfg: EvalConfig, name: str, shared: dict[str, Any]) -> dict[str, Any]:
    """One pipeline in a worker process, on the parent's oblivious and transfer adversarials."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{name}] %(name)s %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("SHIELDSERVE_PROGRESS", "0")  # one bar per worker would interleave
    ev = Evaluation(cfg)
    ev.oblivious = {k: torch.from_numpy(v) for k, v in shared["oblivious"].items()}
    ev.transfer = {k: torch.from_numpy(v) for k, v in shared["transfer"].items()}
    for key in ("oblivious_attacks", "transfer_attacks", "transfer_surrogates"):
        ev.report[key] = shared[key]
    t = time.perf_counter()
    ev.evaluate_pipeline(name)
    ev.report["pipelines"][name]["seconds"] = round(time.perf_counter() - t, 1)
    ev.save()
    return ev.report["pipelines"][name]
