"""Query attacks over HTTP against a running service, with the query monitor off and on.

`shieldserve evaluate --sections query --url URL` runs ART's Square (L-inf, two eps),
HopSkipJump (L2) and the boundary attack (L2) against three pipelines of the service: one
without the monitor (`--query-off`), one in `reject` mode (`--query-reject`), one in `block`
mode (`--query-block`); docs/query_monitor.md's config serves all three. Each digit gets its
own query budget. Per run it reports:

  * attack success: the service answered at least one of the attack's queries `accepted`
    with a wrong label (what the attacker wants, whatever ART itself returns), for an image
    within the attack's ball around the clean digit, measured on the image the service
    received (8-bit pixels; disguised, in `transform` mode): L-inf eps for Square (plus half
    an 8-bit step, the PNG's rounding), L2 `l2_eps` (2.0) for HopSkipJump and the boundary
    attack (their first queries are a digit of another class),
  * queries until the first flag (the first query the monitor answered as a rejection by
    `query_monitor`), counted from the attack's first query,
  * queries until blocked (the first 429 `attack_suspected`; the attack stops there).

Then the adaptive attacker who knows the monitor (against the reject and block pipelines):
  * `transform`: each query randomly translated by up to 2 pixels and rescaled in brightness
    (OARS-style: the attack uses the answer as if for the untransformed query; its success
    is judged on the transformed image the service saw, which a shift usually takes out of
    the ball),
  * `sybil`: every query from a different client (X-Forwarded-For through a trusted proxy, the
    same as one API key per query),
and, before the attacks, a benign workload (`--query-benign N`): N distinct mnist5k digits
(5,000: every one) from 8 clients, 10% retried, 20 public digits sent by every client; the
false-positive rate is the share of these queries the monitor rejects.

Spacing queries out in time is not run: it helps only past the monitor's memory (at least
half of `memory_window_s`, 1 hour by default, never all of it) between near-identical queries;
the README says what that costs an attacker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.evaluation.blackbox import Blocked, BudgetedOracle, BudgetExhausted, ServiceError, quantize, scrub

log = logging.getLogger("shieldserve.evaluate")

ATTACKS = ("square_0.3", "square_0.15", "hsj", "boundary")


@dataclass
class QueryLog:
    """What one attack run's queries got: counted per image, from the attack's first query."""

    sent: int = 0
    first_flag: int | None = None
    blocked_at: int | None = None
    flags: int = 0


@dataclass
class MonitoredOracle:
    """POST /predict?pipeline=NAME with PNG files (8-bit pixels, as a real client sends), at
    most `max_images` per request; answers as blackbox.Oracle does, and logs the monitor's
    verdicts. `transform` and `sybil` are the adaptive attacker's tricks. `sent`: the images of
    the last answered call as the service decoded them (disguised, 8-bit), which
    BudgetedOracle measures and keeps instead of the undisguised queries."""

    client: Any
    pipeline: str
    max_images: int = 16
    transform: bool = False
    sybil: bool = False
    seed: int = 0
    log: QueryLog = field(default_factory=QueryLog)
    identity: str = "203.0.113.7"
    sent: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._g = torch.Generator().manual_seed(self.seed)
        self._n = 0

    def _disguise(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for img in x:
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=self._g))
            scale = float(torch.empty(1).uniform_(0.9, 1.1, generator=self._g))
            out.append((torch.roll(img, (dy, dx), (-2, -1)) * scale).clamp(0, 1))
        return torch.stack(out)

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        from service.imaging import encode_png

        if self.transform:
            x = self._disguise(x)
        self.sent = None
        out: list[tuple[str, int, float]] = []
        for i in range(0, len(x), self.max_images):
            chunk = x[i:i + self.max_images]
            self._n += 1
            ident = f"198.18.{(self._n >> 8) & 255}.{self._n & 255}" if self.sybil else self.identity
            files = [("file", (f"{j}.png", encode_png(img), "image/png")) for j, img in enumerate(chunk)]
            r = self.client.post("/predict", params={"pipeline": self.pipeline}, files=files,
                                 headers={"X-Forwarded-For": ident})
            if r.status_code == 429 and r.json()["error"]["code"] == "attack_suspected":
                if self.log.blocked_at is None:
                    self.log.blocked_at = self.log.sent + 1
                raise Blocked("blocked")  # not counted in `sent` (nor in the budget): as before
            r.raise_for_status()
            for res in r.json()["results"]:
                self.log.sent += 1
                if any(j["defense"] == "query_monitor" for j in res["rejected_by"]):
                    self.log.flags += 1
                    if self.log.first_flag is None:
                        self.log.first_flag = self.log.sent
                label = res["label"] if res["label"] is not None else -1
                out.append((res["status"], int(label), float(res["confidence"] or 0.0)))
        self.sent = quantize(x)  # what the PNGs carried (encode_png rounds the same way)
        return out


def run_attack(kind: str, oracle: MonitoredOracle, x0: torch.Tensor, y: int, start: torch.Tensor, *,
               budget: int, seed: int, l2_eps: float = 2.0) -> dict[str, Any]:
    """One ART attack on one digit within `budget` queries."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    np.random.seed(seed)
    norm = "linf" if kind.startswith("square") else "l2"
    q = BudgetedOracle(oracle, x0, y, budget, norm=norm, num_classes=10, http=True)
    clf = BlackBoxClassifierNeuralNetwork(q, input_shape=tuple(x0.shape), nb_classes=10, clip_values=(0.0, 1.0))
    xa = x0.unsqueeze(0).numpy().astype(np.float32)
    init = start.unsqueeze(0).numpy().astype(np.float32)
    started = time.perf_counter()
    try:
        if kind.startswith("square"):
            eps = float(kind.split("_")[1])
            SquareAttack(clf, norm=np.inf, eps=eps, max_iter=budget, p_init=0.8, nb_restarts=1, batch_size=1,
                         verbose=False).generate(x=xa, y=np.eye(10, dtype=np.float32)[[y]])
        elif kind == "hsj":
            HopSkipJump(clf, batch_size=16, targeted=False, norm=2, max_iter=100, max_eval=40, init_eval=10,
                        init_size=20, verbose=False).generate(x=xa, y=np.array([y]), x_adv_init=init)
        elif kind == "boundary":
            BoundaryAttack(clf, batch_size=16, targeted=False, delta=0.01, epsilon=0.01, step_adapt=0.667,
                           max_iter=budget, num_trial=5, sample_size=10, init_size=20, min_epsilon=0.0,
                           verbose=False).generate(x=xa, y=np.array([y]), x_adv_init=init)
        else:
            raise ValueError(f"unknown attack {kind!r}")
    except BudgetExhausted:
        pass
    best = q.best  # measured on the images the service received (disguised ones in `transform`)
    radius = float(kind.split("_")[1]) + 0.5 / 255 + 1e-6 if norm == "linf" else l2_eps
    success = best.x is not None and best.distance <= radius
    return {"success": success, "queries": oracle.log.sent, "first_flag": oracle.log.first_flag,
            "blocked_at": oracle.log.blocked_at, "flags": oracle.log.flags,
            "distance": round(best.distance, 4) if best.x is not None else None,
            "queries_to_success": best.queries_at if success else None,
            "seconds": round(time.perf_counter() - started, 2)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    flags = [r["first_flag"] for r in rows if r["first_flag"] is not None]
    blocks = [r["blocked_at"] for r in rows if r["blocked_at"] is not None]
    return {"digits": len(rows), "attack_success": sum(r["success"] for r in rows),
            "runs_flagged": len(flags), "first_flag_median": float(np.median(flags)) if flags else None,
            "first_flag_max": max(flags) if flags else None,
            "runs_blocked": len(blocks), "blocked_at_median": float(np.median(blocks)) if blocks else None,
            "blocked_at_max": max(blocks) if blocks else None,
            "queries_median": float(np.median([r["queries"] for r in rows])),
            "distance_median": (float(np.median([r["distance"] for r in rows if r["distance"] is not None]))
                                if any(r["distance"] is not None for r in rows) else None),
            "queries_to_success_median": (float(np.median([r["queries_to_success"] for r in rows if r["success"]]))
                                          if any(r["success"] for r in rows) else None)}


def benign(client: Any, pipeline: str, x: torch.Tensor, *, clients: int = 8, retry: float = 0.1,
           public: int = 20, seed: int = 0) -> dict[str, Any]:
    """Benign traffic: each distinct digit once, from `clients` clients in turn; `retry` of them
    sent again by the same client; `public` digits sent by every client. Counts the monitor's
    rejections."""
    from service.imaging import encode_png

    g = np.random.default_rng(seed)
    plan: list[tuple[int, int]] = [(i, i % clients) for i in range(len(x))]
    plan += [(int(i), int(i) % clients) for i in g.choice(len(x), int(retry * len(x)), replace=False)]
    plan += [(i, c) for i in range(public) for c in range(clients)]
    order = g.permutation(len(plan))
    flagged, sent = 0, 0
    pngs: dict[int, bytes] = {}
    started = time.perf_counter()
    for k in order:
        i, c = plan[k]
        body = pngs.get(i) or pngs.setdefault(i, encode_png(quantize(x[i])))
        r = client.post("/predict", params={"pipeline": pipeline}, content=body,
                        headers={"content-type": "image/png", "X-Forwarded-For": f"192.0.2.{c + 1}"})
        r.raise_for_status()
        sent += 1
        res = r.json()["results"][0]
        flagged += any(j["defense"] == "query_monitor" for j in res["rejected_by"])
    return {"queries": sent, "distinct_images": len(x), "clients": clients, "retries": int(retry * len(x)),
            "public_images": public, "flagged": flagged, "false_positive_rate": round(flagged / max(1, sent), 6),
            "seconds": round(time.perf_counter() - started, 1)}


def run(url: str, out: Path, *, off: str, reject: str, block: str, digits: int = 10, budget: int = 1000,
        attacks: tuple[str, ...] = ATTACKS, adaptive: bool = True, adaptive_digits: int = 5,
        benign_images: int = 0, seed: int = 0, l2_eps: float = 2.0, command: str = "",
        api_key: str | None = None) -> dict[str, Any]:
    """The whole section; writes out/query_attacks.json and out/query_attacks.md. `api_key`
    is sent as `Authorization: Bearer` and written nowhere; the URL's password is not
    written either."""
    import httpx
    from tqdm import tqdm

    from models.datasets import load_dataset

    test = load_dataset("mnist5k").test
    flat = test.x.flatten(1)
    report: dict[str, Any] = {"url": scrub(url, url), "command": scrub(command, url, (api_key,)), "digits": digits,
                              "budget_per_digit": budget, "l2_eps": l2_eps, "adaptive_digits": adaptive_digits,
                              "pipelines": {"off": off, "reject": reject, "block": block}, "runs": {}}
    modes = [("off", off, False, False), ("reject", reject, False, False), ("block", block, False, False)]
    if adaptive:
        modes += [("reject+transform", reject, True, False), ("block+transform", block, True, False),
                  ("reject+sybil", reject, False, True), ("block+sybil", block, False, True)]
    jobs = [(a, m) for a in attacks for m in modes]
    # every run attacks digits of its own (the service remembers earlier runs' queries, which
    # would flag a later run on the same digit sooner than a fresh attack)
    order = np.random.default_rng(seed).permutation(len(test.x))
    if len(jobs) * digits > len(order):
        raise ValueError(f"{len(jobs)} runs of {digits} digits need more than the {len(order)} test digits")
    from service.evaluation.attacks import progress_enabled

    bar = tqdm(total=sum(digits if "+" not in m[0] else min(digits, adaptive_digits) for _, m in jobs),
               desc="query attacks over HTTP", unit="digit", disable=not progress_enabled())
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, timeout=120.0, headers=headers) as client:
            if benign_images:  # first: the attacks' queries would be remembered near these digits
                data = load_dataset("mnist5k")
                every = torch.cat([data.train.x, data.val.x, data.test.x])[:benign_images]
                report["benign"] = {"pipeline": reject, **benign(client, reject, every, seed=seed)}
                _write(report, out)
            for j, (kind, (mode, pipeline, transform, sybil)) in enumerate(jobs):
                k = digits if "+" not in mode else min(digits, adaptive_digits)
                rows = []
                for i, d in enumerate(order[j * digits:j * digits + k].tolist()):
                    x0, y0 = test.x[d], int(test.y[d])
                    other = (test.y != y0).nonzero().flatten()
                    start = test.x[other[(flat[other] - x0.flatten()).norm(dim=1).argmin()]]
                    # a fresh attacker per digit: its own address, so one digit's block does not end the next
                    oracle = MonitoredOracle(client, pipeline, transform=transform, sybil=sybil, seed=seed + 101 * i,
                                             identity=f"203.0.{j % 250}.{i % 250 + 1}")
                    rows.append(run_attack(kind, oracle, x0, y0, start, budget=budget, seed=seed + i, l2_eps=l2_eps))
                    bar.update(1)
                report["runs"][f"{kind}/{mode}"] = {"attack": kind, "mode": mode, "pipeline": pipeline,
                                                    **_summary(rows), "per_digit": rows}
                _write(report, out)
    except httpx.HTTPError as exc:  # its message names the URL: here without the password or the key
        bar.close()  # before the error's line, not on the bar's
        raise ServiceError(scrub(f"{type(exc).__name__} from {url}: {exc}", url, (api_key,))) from None
    bar.close()
    _write(report, out)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    from service.evaluation.report import write_text  # replaced whole, as the report's files are

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "query_attacks.json", json.dumps(report, indent=1))
    lines = ["# Query attacks over HTTP", "", f"`{report['command']}` against {report['url']}; "
             f"{report['digits']} digits per run ({report.get('adaptive_digits', '')} per adaptive run), at most "
             f"{report['budget_per_digit']} queries per digit; success within L-inf eps (Square) or L2 "
             f"{report['l2_eps']} (HopSkipJump, boundary).", "",
             "| attack | monitor | digits | attack success | runs flagged | first flag (median / max) "
             "| runs blocked | blocked at (median / max) | queries (median) | best distance (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"].values():
        lines.append(f"| {r['attack']} | {r['mode']} | {r['digits']} | {r['attack_success']} | {r['runs_flagged']} "
                     f"| {r['first_flag_median']} / {r['first_flag_max']} | {r['runs_blocked']} "
                     f"| {r['blocked_at_median']} / {r['blocked_at_max']} | {r['queries_median']} "
                     f"| {r['distance_median']} |")
    if "benign" in report:
        b = report["benign"]
        lines += ["", f"Benign: {b['queries']} queries ({b['distinct_images']} distinct digits, {b['clients']} clients, "
                      f"{b['retries']} retries, {b['public_images']} public digits sent by every client): "
                      f"{b['flagged']} flagged ({100 * b['false_positive_rate']:.3f}%)."]
    write_text(out / "query_attacks.md", "\n".join(lines) + "\n")
