"""report.md (tables) and PNG plots from report.json's contents."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

SECTIONS = ("oblivious", "transfer", "graybox", "adaptive", "autoattack", "blackbox")
TITLES = {
    "oblivious": "Oblivious: adversarial digits computed on the base classifier only",
    "transfer": ("Transfer: MI-FGSM with input diversity on an ensemble of surrogates trained by the attacker "
                 "(no weights of the bundle)"),
    "graybox": "Gray-box: computed on the labeling network, without the defense's secrets, detectors or noise",
    "adaptive": "Adaptive white-box: BPDA, EOT, detector-aware losses, GMSA",
    # the versions and budgets each pipeline got are listed under the heading (autoattack_notes)
    "autoattack": ("AutoAttack on the white-box model (without FAB-T; worst case per digit over its attacks): the "
                   "standard version on deterministic pipelines without detectors, with PGD with restarts beside "
                   "it; for randomized pipelines the rand version (EOT gradients, no Square); for pipelines that "
                   "reject the detector-aware one (a wrong class must also beat the rejection)"),
    "blackbox": "Black-box: /predict answers only (status, label, confidence), with a query budget per digit",
}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ci95(row: dict[str, Any]) -> tuple[float, float] | None:
    """A row's 95% Clopper-Pearson interval for its robust accuracy: the one report.json
    holds, or (older reports) computed from its robust accuracy and digits."""
    if row.get("robust_accuracy_ci95"):
        lo, hi = row["robust_accuracy_ci95"]
        return float(lo), float(hi)
    if row.get("robust_accuracy") is None or not row.get("n"):
        return None
    from service.evaluation.metrics import clopper_pearson

    n = int(row["n"])
    return clopper_pearson(round(float(row["robust_accuracy"]) * n), n)


def _with_ci(value: float, name: str, row: dict[str, Any]) -> str:
    """`value (name; n=N, 95% CI lo-hi)`: the worst row of rows on different digits says its own."""
    ci = ci95(row)
    # rounded outwards, as report.json's: to the nearest it was narrower than the interval
    # (1 of 10 digits: 0.00253-0.44502 printed "0.003-0.445")
    shown = f", 95% CI {math.floor(ci[0] * 1000) / 1000:.3f}-{math.ceil(ci[1] * 1000) / 1000:.3f}" if ci else ""
    return f"{_f(value)} ({name}; n={row.get('n')}{shown})"


def autoattack_notes(report: dict[str, Any]) -> list[str]:
    """One line per pipeline and AutoAttack run: the version, the attacks and the budget it
    ran with, as recorded in its rows (not the standard version's numbers)."""
    lines = []
    for name, rep in report["pipelines"].items():
        attacks = rep.get("attacks", {})
        for key, r in attacks.items():
            if r.get("section") != "autoattack" or "autoattack" not in r:
                continue
            log, b = r["autoattack"], r.get("budget") or {}
            ran = log.get("attacks") or list(log.get("after", {}))  # older reports: the attacks' results
            parts = []
            if "apgd-ce" in ran:
                parts.append(f"APGD-CE {b.get('apgd_iters', '?')} iterations")
            if "apgd-t" in ran:
                parts.append(f"APGD-T against the {b.get('targets', '?')} most likely wrong classes, "
                             f"{b.get('apgd_iters', '?')} iterations each")
            if "square" in ran:
                sq = b.get("square_queries")
                parts.append(f"Square {sq:,} queries" if isinstance(sq, int) else "Square")
            line = f"- `{name}` {key.split('/', 1)[1]}: {log.get('version', '?')}: " + ", ".join(parts)
            if "rand" in str(log.get("version", "")):
                line += (f"; gradients averaged over {b['eot_iter']} noise draws" if "eot_iter" in b else "") + (
                    f", candidates judged by the mean of {b['check_draws']} draws" if "check_draws" in b else "")
            pgd = f"pgd{b.get('pgd_steps')}x{b.get('pgd_restarts')}_{key.split('_', 1)[1]}"
            if f"autoattack/{pgd}" in attacks:
                line += f"; beside it PGD-{b['pgd_steps']} with {b['pgd_restarts']} restarts (`{pgd}`)"
            lines.append(line + f"; {r['n']} digits.")
    return lines


def autoattack_budgets(report: dict[str, Any]) -> list[str]:
    """The AutoAttack budgets the runs used (report.json's rows), each with its pipelines."""
    seen: dict[str, list[str]] = {}
    for name, rep in report["pipelines"].items():
        for r in rep.get("attacks", {}).values():
            if r.get("section") == "autoattack" and r.get("budget"):
                text = ", ".join(f"{k} {v}" for k, v in r["budget"].items())
                if name not in seen.setdefault(text, []):
                    seen[text].append(name)
    return [f"AutoAttack budget ({', '.join(names)}): {text}." for text, names in seen.items()]


def worst(rep: dict[str, Any], section: str | None = None, key: str = "robust_accuracy") -> tuple[float | None, str | None]:
    """The lowest robust accuracy over a section's attacks, and the attack; without a section,
    over every attack of every section, named "section/attack"."""
    rows = [(r[key], name if section is None else name.split("/", 1)[1]) for name, r in rep.get("attacks", {}).items()
            if (section is None or r["section"] == section) and r.get(key) is not None]
    if not rows:
        return None, None
    return min(rows)


def headline(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    eps = report["budget"]["linf_eps"]
    for name, rep in report["pipelines"].items():
        if "clean" not in rep:
            continue
        obl = rep["attacks"].get(f"oblivious/pgd_linf_{eps:g}", {})
        wa, wa_name = worst(rep, "adaptive")
        wb, wb_name = worst(rep, "blackbox")
        cert = rep.get("certified", {}).get("accuracy", {})
        auc = obl.get("detection_auc")
        wall, wall_name = worst(rep)
        aa = rep["attacks"].get(f"autoattack/autoattack_linf_{eps:g}")
        rows.append([name if "seconds" in rep else f"{name} (partial)", rep["digits"], rep["clean"]["accuracy"], rep["clean"]["false_rejection_rate"],
                     obl.get("robust_accuracy"),
                     f"{_f(aa['robust_accuracy'])} ({aa['n']} digits)" if aa else "-",
                     f"{_f(wa)} ({wa_name})" if wa is not None else "-",
                     f"{_f(wb)} ({wb_name})" if wb is not None else "-",
                     _with_ci(wall, wall_name, rep["attacks"][wall_name]) if wall is not None else "-",
                     auc, cert.get("0.5"), rep["clean"]["seconds_per_image"]])
    return rows


def headline_header(linf_eps: float) -> list[str]:
    """The headline's columns; the L-inf ones name the run's budget (0.3 for MNIST)."""
    return ["pipeline", "digits", "clean acc", "clean FRR", f"oblivious PGD L-inf {linf_eps:g}",
            f"AutoAttack L-inf {linf_eps:g}", "adaptive (worst attack)", "black-box (worst)", "worst of all attacks",
            "detection AUC (obliv. PGD)", "certified acc @ L2 0.5", "s/img (clean)"]


PUBLISHED_BREAKS = {
    "magnet": "Carlini & Wagner 2017: an attack that knows the autoencoders defeats MagNet",
    "defensegan": "Athalye, Carlini & Wagner 2018: BPDA through the projection (MNIST accuracy 55%)",
    "rmc": "Chen et al. 2022 (GMSA) break RMC",
    "neuralfp": "adaptive attacks that model the fingerprint check (detector-aware loss)",
}


def findings(report: dict[str, Any]) -> list[str]:
    """One line per pipeline: oblivious versus adaptive, and whether a published break is reproduced."""
    eps = report["budget"]["linf_eps"]
    lines = []
    for name, rep in report["pipelines"].items():
        obl = rep.get("attacks", {}).get(f"oblivious/pgd_linf_{eps:g}", {}).get("robust_accuracy")
        wo, wo_name = worst(rep, "oblivious")
        wa, wa_name = worst(rep, "adaptive")
        if obl is None or wa is None:
            continue
        line = (f"- **{name}**: oblivious PGD L-inf {eps:g} robust accuracy {obl:.3f} (worst oblivious {wo:.3f}, "
                f"{wo_name}); worst adaptive {wa:.3f} ({wa_name}, {rep['adaptive_model'] if rep.get('adaptive_model') else 'GMSA'}"
                f", {rep['attacks'][f'adaptive/{wa_name}']['n']} digits).")
        if name in PUBLISHED_BREAKS:
            drop = wo - wa  # against the strongest oblivious attack, not only PGD
            verdict = ("reproduced" if drop >= 0.25 or (wo > 0 and wa <= 0.5 * wo) else
                       "NOT reproduced at this budget" if drop < 0.1 else "partly reproduced")
            line += (f" Published break ({PUBLISHED_BREAKS[name]}): {verdict} (adaptive {drop:.3f} below the "
                     f"worst oblivious attack).")
        wall, wall_name = worst(rep)
        if wall is not None and wall < wa - 0.02:  # a point or two on a few black-box digits is noise
            line += (f" The adaptive attacks at this budget are weaker than {wall_name} ({wall:.3f}, on "
                     f"{rep['attacks'][wall_name]['n']} digits): read {wall:.3f} as this pipeline's robust accuracy "
                     f"bound, and the adaptive rows as under-budgeted.")
        lines.append(line)
    for name, rep in report["pipelines"].items():
        # the point of the transfer section: an attacker without the bundle's weights may do
        # better than the oblivious attacks on the base classifier (whose perturbations a
        # defense such as RMC's adaptation or NeuralFP's fingerprints is tuned to)
        wt, wt_name = worst(rep, "transfer")
        wo, wo_name = worst(rep, "oblivious")
        if wt is not None and wo is not None and wt < wo - 0.02:
            lines.append(f"- **{name}**: the transfer attack on the attacker's own surrogates is stronger than every "
                         f"oblivious attack on the base classifier: robust accuracy {wt:.3f} ({wt_name}) against "
                         f"{wo:.3f} ({wo_name}).")
    for name, rep in report["pipelines"].items():
        inv = rep.get("invariant")
        if inv:
            lines.append(f"- **{name}** certificate invariant: {'holds' if inv['holds'] else 'VIOLATED'} "
                         f"({len(inv['violations'])} confirmed violations, {len(inv['unconfirmed_candidates'])} "
                         f"unconfirmed candidates, {rep['certified']['digits']} certified digits).")
    return lines


def _and(items: list[str], comma: str = "") -> str:
    """a, b and c (with comma=",": a, b, and c)"""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _g(v: Any) -> str:
    return "?" if v is None else f"{float(v):g}"


def _eps(values: Any) -> str:
    return _and([f"{float(e):g}" for e in values])


def _rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """Every pipeline's rows of one section."""
    return [r for rep in report["pipelines"].values() for r in rep.get("attacks", {}).values()
            if r.get("section") == section]


def threat_models(report: dict[str, Any]) -> str:
    """The threat models of the sections this run measured, with the budgets it used: the
    shared adversarials' and the rows' own records (eps, norms, steps, queries), else the run's
    budget (report.json's `budget`); never a default the run did not use."""
    b = report.get("budget", {})
    eps = float(b.get("linf_eps", 0.3))
    l2 = [float(e) for e in b.get("l2_eps") or []]
    cw_eps = max(l2) if l2 else 2.0  # CW's successes count within the run's largest L2 budget
    wanted = report.get("attacks")  # None: every attack (--attacks not given, or an older report)
    asked = set(report.get("sections") or ())
    lines = ["Threat models (each a section below):", ""]

    obl = report.get("oblivious_attacks") or {}
    if obl:
        kinds: dict[str, list[float]] = {}
        for v in obl.values():
            kinds.setdefault(v.get("attack", "?"), []).extend([float(v["eps"])] if v.get("eps") is not None else [])
        pgd, apgd = sorted(set(kinds.get("pgd", []))), sorted(set(kinds.get("apgd", [])))
        parts = []
        if pgd and apgd == [eps] and eps in pgd:
            parts.append(f"ART PGD and APGD-CE at L-inf eps {eps:g}")
        else:
            parts += [f"ART PGD at L-inf eps {eps:g}"] if eps in pgd else []
            parts += [f"ART APGD-CE at L-inf eps {_eps(apgd)}"] if apgd else []
        sweep = [e for e in pgd if e != eps]
        if sweep:
            parts.append(f"PGD at eps {_eps(sweep)} for the sweep")
        if "cw" in kinds:
            parts.append(f"Carlini-Wagner L2, a success counted within L2 {cw_eps:g}")
        if parts:
            lines += ["- **Oblivious**: the attacker knows only the base classifier; adversarial digits are computed "
                      f"on it ({_and(parts, ',')}) and then "
                      "sent through every pipeline."]

    transfer = report.get("transfer_attacks") or {}
    if transfer:
        first = next(iter(transfer.values()))
        at = [f"L-inf eps {float(v['eps']):g}" if v.get("norm") == "linf" else f"L2 eps {float(v['eps']):g}"
              for v in transfer.values()]
        k = len((report.get("transfer_surrogates") or {}).get("surrogates") or [])
        how = f"MI-FGSM (momentum {_g(first.get('decay'))}, {first.get('steps', '?')} steps)"
        p = first.get("diversity")
        how += (" without input diversity" if p == 0 else
                f" and input diversity (a random resize-and-pad per step with probability {_g(p)})")
        lines += [f"- **Transfer**: the attacker knows neither the defense nor the bundle's weights, but trains "
                  f"{f'{k} ' if k else ''}surrogates of their own (different architectures and seeds, on the training "
                  f"split) and crafts adversarial digits on the mean of their logits with {how}, at {_and(at)}; those "
                  f"digits are sent through every pipeline."]

    graybox = _rows(report, "graybox")
    notes = any(rep.get("graybox_note") for rep in report["pipelines"].values())
    if graybox or notes or ("graybox" in asked and (wanted is None or "pgd" in wanted)):
        budget = f"PGD at L-inf eps {eps:g}" + (f", and at L2 eps {_eps(l2)} on smoothing pipelines" if l2 else "")
        lines += ["- **Gray-box**: the attacker knows the network that labels the input in that pipeline (the "
                  "fingerprinted network for NeuralFP; the noise-trained classifier, or denoiser + classifier, for "
                  "smoothing) but not the defense's secrets (fingerprints, noise draws) and ignores its detectors "
                  f"({budget}). Where that network is the base classifier (MagNet, Defense-GAN, RMC) gray-box "
                  "equals oblivious and is not repeated."]

    adaptive = _rows(report, "adaptive")
    if adaptive or "adaptive" in asked:
        draws = b.get("eot_draws")
        sweep = sorted({float(m.group(1)) for r in adaptive
                        for m in [re.search(r"_linf_([0-9.e-]+)$", str(r.get("attack", "")))] if m} - {eps})
        at = f"L-inf attacks at eps {eps:g}" + (f" (PGD also at {_eps(sweep)} on cheap pipelines)" if sweep else "")
        lines += [f"- **Adaptive white-box** (everything known, secrets included; {at}"
                  f"{f', EOT also at L2 eps {_eps(l2)}' if l2 else ''}): MagNet: exact gradients through "
                  "the reformer plus a detector-aware model (an extra \"rejected\" output "
                  "max_j z_j + beta * log(max_d score_d / threshold_d), attacked towards the clean runner-up class "
                  "by PGD/APGD, and by CW-L2 whose loss needs a wrong class above both the true class and "
                  f"\"rejected\" (a success counted within L2 {cw_eps:g})); NeuralFP: the same detector-aware model with the real fingerprints; Defense-GAN: "
                  "BPDA (forward: the real projection; backward: identity); smoothing: EOT (log of the mean "
                  f"softmax over {f'{draws} ' if draws else ''}fresh Gaussian draws at every step), plus the "
                  "MagNet-aware output in `default`; RMC: GMSA-AVG (attack the average of the base model and the "
                  "models RMC adapted to the previous rounds' adversarial digits; isolated-mode adaptation is "
                  "deterministic, so the adapted model of a round is exactly what the service would use)."]

    blackbox = _rows(report, "blackbox")
    if blackbox:
        def budget_of(prefix: str) -> dict[str, Any] | None:
            rows = [r for r in blackbox if str(r.get("attack", "")).startswith(prefix)]
            if not rows:
                return None
            queries = sorted({r["query_budget"] for r in rows if r.get("query_budget") is not None})
            return {"eps": rows[0].get("eps"), "queries": _and([f"{q:,}" for q in queries]) if queries else None}

        attacks = []
        sq, hsj = budget_of("square_"), budget_of("hsj_")
        if sq:
            per = f", {sq['queries']} queries per digit" if sq["queries"] else ""
            attacks.append(f"ART Square (score-based, L-inf eps {_g(sq['eps'] if sq['eps'] is not None else eps)}{per})")
        if hsj:
            per = f"{hsj['queries']} queries per digit, " if hsj["queries"] else ""
            within = hsj["eps"] if hsj["eps"] is not None else (max(l2) if l2 else None)
            success = f"; success counted within L2 <= {_g(within)}" if within is not None else ""
            attacks.append(f"ART HopSkipJump (label-only, L2, {per}started from the nearest test digit of another "
                           f"class{success})")
        if attacks:
            lines += ["- **Black-box**: only what /predict returns (status, label, confidence) with a query budget "
                      f"per digit: {' and '.join(attacks)}. In process here; `--url` runs the same attacks against a "
                      "running service over HTTP, each digit scored from the answers its attack got (no adversarial "
                      "is posted a second time)."]
    if len(lines) == 2:
        return ""
    return "\n".join(lines) + "\n"


def limits(report: dict[str, Any]) -> str:
    """The limits of this evaluation, with the run's own L-inf eps, L2 norms and query budgets."""
    b = report.get("budget", {})
    eps = float(b.get("linf_eps", 0.3))
    blackbox = _rows(report, "blackbox")
    queries = sorted({r["query_budget"] for r in blackbox if r.get("query_budget") is not None})
    lines = ["## Limits of this evaluation", "",
             "- Budgets are CPU-sized (see Budgets above): more PGD/EOT/BPDA steps, more GMSA rounds, more "
             "black-box queries can only lower the robust accuracies reported here."
             + (f" Black-box numbers with at most {queries[-1]:,} queries per digit are weak attacks: read them as "
                "upper bounds." if queries else ""),
             "- Carlini-Wagner L2 is this project's torch implementation (`service/attacks/cw.py`), with the same "
             "objective as ART's `CarliniL2Method` (kept as attack `cw_art`), which ran about ten times slower "
             "here. The PGD and APGD of the oblivious, gray-box and adaptive sections and the black-box Square and "
             "HopSkipJump are ART's. AutoAttack's APGD-CE and APGD-T, its L-inf Square and the PGD with restarts "
             "beside it are this project's torch code (`service/evaluation/autoattack.py`, after the reference "
             "implementations); only its L2 Square is ART's. GMSA's PGD and the transfer section's MI-FGSM are "
             "this project's too."]
    certs = [rep["certified"] for rep in report["pipelines"].values() if rep.get("certified")]
    if certs:
        obl = (report.get("oblivious_attacks") or {}).get(f"pgd_linf_{eps:g}", {})
        radius = max((float(r) for c in certs for r in c.get("accuracy", {})), default=None)
        norm = obl.get("mean_l2")
        if norm is not None and radius is not None and norm > radius:
            said = (f"L-inf eps {eps:g} perturbations have L2 norms near {norm:.1f} here (mean L2 of the oblivious "
                    f"`pgd_linf_{eps:g}`), outside the largest certified radius ({radius:g}), so the L-inf rows do "
                    "not test the certificate")
        else:
            said = (f"the L-inf rows (eps {eps:g}) test the certificate only where their L2 norm (mean L2 column) "
                    "is within a certified radius")
        lines.append(f"- The smoothing certificates are L2 certificates: {said}; the L2 rows and the invariant do. "
                     "In `default` the certificate covers the smoothed classifier, not MagNet's detection in front "
                     "of it.")
    lines += ["- Gray-box MagNet as in the paper (a secret random choice among several autoencoders) is not "
              "evaluated: the bundle holds one autoencoder per role. RMC is evaluated in its isolated (serving "
              "default) mode; the online mode's poisoning risk is described in docs/defenses/rmc.md.",
              "- Defense-GAN is attacked with its serving projection preset (`default`), not the paper's."]
    return "\n".join(lines) + "\n"


def coverage(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, rep in report["pipelines"].items():
        bb = [r for k, r in rep.get("attacks", {}).items() if r["section"] == "blackbox"]
        # each attack's own budget (Square's was shown for HopSkipJump too)
        budgets = {k.split("/", 1)[1].split("_", 1)[0]: r.get("query_budget")
                   for k, r in rep.get("attacks", {}).items() if r["section"] == "blackbox"}
        cert = rep.get("certified")
        rows.append([name, rep.get("digits", 0), rep.get("attack_digits", rep.get("digits", 0)), bb[0]["n"] if bb else 0,
                     ", ".join(f"{a} {b}" for a, b in budgets.items()) if bb else "-", rep.get("smoothing_n") or ("service default" if rep.get("certifies") else "-"),
                     f"{cert['digits']} (n={cert['n']})" if cert else "-",
                     rep["seconds"] if "seconds" in rep else (f"failed, sections missing: {rep['error']}" if rep.get("error")
                                                              else "partial: stopped at the deadline, sections missing")])
    return rows


def markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    out = ["# shieldserve security evaluation",
           "",
           f"Bundle `{report['bundle']}` (version {report['bundle_version']}); {report['dataset']}; "
           f"seed {report['seed']}; {sum(r.get('seconds') or 0 for r in report['pipelines'].values()) / 60:.0f} min "
           f"of pipeline evaluation (per pipeline in the coverage table)"
           + (f", {report['seconds'] / 60:.0f} min from start to end" if report.get("seconds") and report.get("jobs", 1) > 1 else "")
           + f" on {report['machine']['processor']}, "
           f"{report['machine']['threads']} torch thread per process"
           + (f", {report['jobs']} pipelines at a time in worker processes" if report.get("jobs", 1) > 1 else "")
           + ".",
           "",
           f"Command: `{report['command']}`" if report.get("command") else "",
           "",
           *([f"These numbers come from {len(report['runs'])} runs, split by `--pipelines` so that they could run "
              f"side by side on a shared CPU before a deadline, merged with "
              f"`python -m service.evaluation.report DIR DOC --merge ...`. Their flags differ from the command above "
              f"where listed (fewer digits, sections or attacks for the costly pipelines); the coverage table "
              f"below gives what each pipeline actually got. {report.get('note', '')}", ""]
             + [f"- `{r['command']}` ({(r.get('seconds') or 0) / 60:.0f} min): {', '.join(r['pipelines'])}"
                for r in report["runs"]] + [""] if len(report.get("runs", [])) > 1 else []),
           "Robust accuracy: the clean digit is accepted with the right label AND its adversarial version is "
           "rejected, abstained on, or labelled right (a refused adversarial is a defended one; a refused clean "
           "digit is an error). Attack success: the adversarial digit is accepted with a wrong label. "
           "Each robust accuracy in report.json has its 95% Clopper-Pearson interval over its own digits "
           "(`robust_accuracy_ci95`); the headline's worst of all attacks takes the lowest over rows measured "
           "on different numbers of digits, so it gives that row's n and interval.",
           "",
           "## Headline",
           "",
           _table(headline_header(report["budget"]["linf_eps"]), headline(report)),
           "",
           threat_models(report),
           "Coverage (costly pipelines use fewer digits for some sections; every number below says on how many; "
           "a pipeline marked partial was stopped before all its sections ran: its missing rows were not measured):",
           "",
           _table(["pipeline", "clean + oblivious digits", "gray-box + adaptive digits", "black-box digits",
                   "queries per digit per attack", "PREDICT samples", "certified digits", "seconds"], coverage(report)),
           "",
           "Budgets: " + ", ".join(f"{k} {v}" for k, v in report["budget"].items()) + ".",
           "",
           *[line for b in autoattack_budgets(report) for line in (b, "")],
           "## Findings (computed from the tables below)",
           "",
           *findings(report),
           ""]
    if report.get("oblivious_attacks"):
        out += ["## Attacks on the base classifier (the oblivious adversarials)", "",
                _table(["attack", "digits", "fools the base classifier", "mean L2", "mean L-inf", "s/img"],
                       [[k, v["n"], v["success_on_base"], v["mean_l2"], v["mean_linf"], v["seconds_per_image"]]
                        for k, v in report["oblivious_attacks"].items()]), ""]
    if report.get("transfer_attacks"):
        sur = report.get("transfer_surrogates", {})
        out += ["## Transfer attacks on the surrogate ensemble", "",
                f"Surrogates trained on {sur.get('train_split', 'the training split')}:", "",
                _table(["architecture", "width", "hidden", "seed", "epochs", "test acc", "train s", "cached"],
                       [[v["architecture"], v.get("width"), v.get("hidden"), v["seed"], v["epochs"], v["test_accuracy"],
                         v["train_seconds"], "yes" if v["cached"] else "no"] for v in sur.get("surrogates", [])]), "",
                _table(["attack", "digits", "fools the surrogate ensemble", "fools the base classifier", "mean L2",
                        "mean L-inf", "s/img"],
                       [[k, v["n"], v["success_on_surrogates"], v["success_on_base"], v["mean_l2"], v["mean_linf"],
                         v["seconds_per_image"]] for k, v in report["transfer_attacks"].items()]), ""]
    for section in SECTIONS:
        rows = []
        for name, rep in report["pipelines"].items():
            for key, r in rep.get("attacks", {}).items():
                if r["section"] != section:
                    continue
                extra = ""
                if section == "blackbox":
                    extra = (f"{r['mode']}, budget {r['query_budget']}, used mean {r['queries_used_mean']} "
                             f"/ max {r['queries_used_max']}, found any {_f(r['found_any_adversarial'])}, "
                             f"median {r['norm']} {_f(r['median_distance_found'])}")
                elif "autoattack" in r:
                    extra = "robust after " + ", ".join(f"{k} {_f(v)}" for k, v in r["autoattack"]["after"].items())
                elif "gmsa" in r:
                    extra = ", ".join(f"{k} {v}" for k, v in r["gmsa"].items())
                rows.append([name, key.split("/", 1)[1], r["n"], r["robust_accuracy"], r["attack_success"],
                             r["rejected"], r["abstained"], r.get("detection_auc"), r["mean_l2"], r["mean_linf"],
                             r["attack_seconds_per_image"], extra])
        if not rows:
            continue
        out += [f"## {TITLES[section]}", ""]
        if section == "graybox":
            notes = [f"- `{n}`: {rep['graybox_note']}" for n, rep in report["pipelines"].items() if rep.get("graybox_note")]
            out += notes + ([""] if notes else [])
        if section == "autoattack":
            notes = autoattack_notes(report)
            notes += [f"- `{n}`: {rep['autoattack_note']}" for n, rep in report["pipelines"].items() if rep.get("autoattack_note")]
            out += notes + ([""] if notes else [])
        if section == "adaptive":
            notes = [f"- `{n}`: {rep['adaptive_model']}" for n, rep in report["pipelines"].items() if rep.get("adaptive_model")]
            out += notes + ([""] if notes else [])
        out += [_table(["pipeline", "attack", "digits", "robust acc", "attack success", "rejected", "abstained",
                        "detection AUC", "mean L2", "mean L-inf", "attack s/img", "notes"], rows), ""]
    cert_rows, inv_rows = [], []
    for name, rep in report["pipelines"].items():
        c = rep.get("certified")
        if c:
            cert_rows.append([name, c["digits"], c["sigma"], c["n"], *c["accuracy"].values(),
                              "yes" if c["covers_detector"] else "no (detector not covered)"])
            radii = list(c["accuracy"])
        inv = rep.get("invariant")
        if inv:
            order = "; ".join(f"r={o['radius']:g}: {o['empirical_upper_bound']:.3f} >= {o['certified']:.3f}"
                              + ("" if o["holds"] else " FAILS") for o in inv["empirical_vs_certified"])
            inv_rows.append([name, "holds" if inv["holds"] else "VIOLATED", len(inv["violations"]),
                             len(inv["unconfirmed_candidates"]), order])
    if cert_rows:
        out += ["## Certified accuracy (randomized smoothing, CERTIFY)", "",
                _table(["pipeline", "digits", "sigma", "n", *[f"r={r}" for r in radii], "certificate covers the whole pipeline"],
                       cert_rows), ""]
    if inv_rows:
        out += ["## Invariant: no adversarial example inside a certificate", "",
                "A violation is a digit certified with its true label at radius R and an adversarial digit at "
                "L2 distance < R that the pipeline labelled otherwise, confirmed by PREDICT with 10x the samples "
                "and another seed. Also: the empirical robust accuracy at r (no attack fooled it within L2 <= r; "
                "abstentions are not errors) must be >= the certified accuracy at r.", "",
                _table(["pipeline", "invariant", "confirmed violations", "unconfirmed candidates",
                        "empirical >= certified at each r"], inv_rows), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    out += [limits(report)]
    return "\n".join(line for line in out) + "\n"


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a file beside `path`, then rename it over `path` (os.replace): a reader, or a
    run killed mid-write, sees the old file or the new one, never half of one (report.json was
    rewritten in place after every pipeline: a kill during the write could leave it truncated)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path` replaced by `text` (replace_file), its bytes on disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    replace_file(path, write)


def _save(fig: Any, path: Path) -> str:
    """Lay out, write and close a figure; its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)
    return path.name


def plot(report: dict[str, Any], out: Path, prefix: str = "") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}

    # certified accuracy vs radius (+ empirical upper bound)
    certs = {n: r for n, r in report["pipelines"].items() if r.get("certified")}
    if certs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (name, rep) in enumerate(certs.items()):
            acc = rep["certified"]["accuracy"]
            radii = [float(r) for r in acc]
            line, = ax.plot(radii, list(acc.values()), marker="o", label=f"{name}: certified ({rep['certified']['digits']} digits)")
            inv = rep.get("invariant")
            if inv:
                ax.plot([o["radius"] for o in inv["empirical_vs_certified"]],
                        [o["empirical_upper_bound"] for o in inv["empirical_vs_certified"]], linestyle="--",
                        color=line.get_color(), label=f"{name}: empirical (attacks)")
        ax.set_xlabel("L2 radius r")
        ax.set_ylabel("accuracy")
        ax.set_title("Certified accuracy vs radius (dashed: best attacks found)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        made["certified accuracy vs radius"] = _save(fig, out / f"{prefix}certified_accuracy.png")

    # ROC curves of the detectors
    dets = {n: r for n, r in report["pipelines"].items() if r.get("has_detector")}
    if dets:
        fig, axes = plt.subplots(1, len(dets), figsize=(4.2 * len(dets), 4), squeeze=False)
        for ax, (name, rep) in zip(axes[0], dets.items()):
            for key, r in rep["attacks"].items():
                if r.get("roc") and r["roc"]["fpr"] and ("0.1" not in key and "0.2" not in key):
                    ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{key} (AUC {_f(r.get('detection_auc'))})")
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
            ax.set_title(f"{name}: detection ROC")
            ax.set_xlabel("false-rejection rate (clean)")
            ax.set_ylabel("detection rate (adversarial)")
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
        made["detection ROC curves"] = _save(fig, out / f"{prefix}roc.png")

    # robust accuracy vs eps (L-inf), oblivious and adaptive
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, section in zip(axes, ("oblivious", "adaptive")):
        for name, rep in report["pipelines"].items():
            pts = {}
            for key, r in rep.get("attacks", {}).items():
                if r["section"] != section or "linf" not in key or "apgd" in key or "square" in key:
                    continue
                try:
                    e = float(key.rsplit("_", 1)[1])
                except ValueError:
                    continue
                pts[e] = min(pts.get(e, 1.0), r["robust_accuracy"])
            if pts and "clean" in rep:
                es = [0.0] + sorted(pts)
                ax.plot(es, [rep["clean"]["accuracy"]] + [pts[e] for e in sorted(pts)], marker="o", label=name)
        ax.set_title(f"{section}: PGD L-inf")
        ax.set_xlabel("eps (L-inf)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("robust accuracy")
    made["robust accuracy vs eps"] = _save(fig, out / f"{prefix}accuracy_vs_eps.png")
    return made


def write(report: dict[str, Any], out: Path, doc: Path | None = None, preface: str = "") -> None:
    """report.md and the plots into `out`; with `doc`, the same report there too, its plot
    links made relative to the doc's folder (the published docs/security-report.md). Each
    file is replaced whole (replace_file)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(report, out)
    write_text(out / "report.md", markdown(report, plots))
    if doc is not None:
        rel = os.path.relpath(out, doc.parent)
        text = markdown(report, {k: f"{rel}/{v}" for k, v in plots.items()})
        doc.parent.mkdir(parents=True, exist_ok=True)
        write_text(doc, text)


def merge(report: dict[str, Any], others: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, Any]:
    """Pipelines evaluated by other runs of the same command (same flags, other --pipelines)
    join this report; a pipeline a later run finished replaces a partial one. Their runs are
    listed under `runs`."""
    runs = report.setdefault("runs", [{"command": report.get("command"), "seconds": report.get("seconds"),
                                       "pipelines": list(report["pipelines"])}])
    for other in others:
        for name, rep in other["pipelines"].items():
            have = report["pipelines"].get(name)
            if have is None or ("seconds" in rep and "seconds" not in have) or (
                    "seconds" not in have and len(rep.get("attacks", {})) > len(have.get("attacks", {}))):
                report["pipelines"][name] = rep
        runs.append({"command": other.get("command"), "seconds": other.get("seconds"),
                     "pipelines": list(other["pipelines"])})
    if order:
        report["pipelines"] = {n: report["pipelines"][n] for n in order if n in report["pipelines"]}
    return report


def main(argv: list[str] | None = None) -> int:
    """Re-render report.md (and a doc) and the plots from a report.json, optionally merging
    the pipelines of other runs' report.json into it first:
    python -m service.evaluation.report DIR [DOC] [--merge OTHER/report.json ...] [--order a,b,c]"""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("doc", nargs="?")
    ap.add_argument("--merge", nargs="+", default=[])
    ap.add_argument("--order")
    ap.add_argument("--command", help="the one command that regenerates the merged report (the runs' union)")
    ap.add_argument("--note", help="a sentence about the runs, printed under their list")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    report = json.loads((d / "report.json").read_text())
    if args.merge:
        report = merge(report, [json.loads(Path(m).read_text()) for m in args.merge],
                       args.order.split(",") if args.order else None)
    if args.command:
        report["command"] = args.command
    if args.note:
        report["note"] = args.note
    if args.merge or args.command:
        write_text(d / "report.json", json.dumps(report, indent=2) + "\n")
    write(report, d, doc=Path(args.doc) if args.doc else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
