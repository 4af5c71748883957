"""Black-box attacks with a query budget: the attacker sees only what /predict answers.

An oracle answers a batch with (status, label, confidence) per image, exactly the fields of
/predict's JSON: in process (`PipelineOracle`, the real pipeline) or over HTTP
(`HttpOracle`, POST /predict with PNG bodies, so pixels are quantised to 8 bits as a real
client's would be).

`BudgetedOracle` counts every image sent; it refuses (raises `BudgetExhausted`) before a
query would exceed the budget, so the budget is never overrun, and it remembers the best
adversarial seen (accepted with a wrong label; the smallest L2 or L-inf distance), which is
the attack's result when ART stops early or runs out of budget. Distances are measured on
the image the service received: the 8-bit pixels over HTTP, and, for an oracle that alters
its queries on the way (query_attacks' `transform` disguise), the altered image it reports
as `sent`. Over HTTP a digit is scored from these answers (`answered_outcome`): broken when
an accepted wrong answer within the ball exists; the final adversarial is not posted again
(a re-post is one more query, which the query monitor may refuse, turning a success into
"robust").

HTTP answers other than 200 (`HttpOracle`): 429 `attack_suspected` (the query monitor's
block) ends that digit's attack (`Blocked`, a `BudgetExhausted`: the blocked request's
images count against the budget, what the attack found before stands, the answers of the
same call's earlier requests included); another 429
(`overloaded`) or a 503 is a refusal of that request's images (they count against the
budget and break nothing, as a rejection would) and the attack goes on; 401/403 and any other
error stop the run with `ServiceError` (a pipeline that fails). Every answer's
`model_version` must be the evaluated bundle's version: else `ServiceError`, as the report
would describe another model.

ART attacks run on an `art` BlackBoxClassifier whose probabilities are built from the
answer: accepted -> `confidence` on the label, the rest spread evenly; rejected or
abstained -> all mass on the true label (a refusal is a failure for the attacker).
Square (score-only, L-inf) uses these scores; HopSkipJump (label-only, L2) only their argmax.
HopSkipJump's starting point is chosen here (`hsj_start`, random images drawn from the seed),
not by ART, whose random starting images are not seeded: with the same answers, the same run
gives the same result.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from service.evaluation import targets
from service.pipeline import Pipeline


class BudgetExhausted(Exception):
    pass


class Blocked(BudgetExhausted):
    """429 attack_suspected: the service blocked this client; the attack on this digit ends
    (a subclass of BudgetExhausted, so ART's loop stops). `sent`: images of the call that
    reached the service, the blocked request's included (counted against the budget);
    `answers`: those of the call's images answered before the blocked request, in order."""

    def __init__(self, message: str = "blocked", sent: int = 0,
                 answers: list[tuple[str, int, float]] | None = None) -> None:
        super().__init__(message)
        self.sent, self.answers = sent, list(answers or [])


class ServiceError(RuntimeError):
    """An answer the evaluation cannot go on with: 401/403, another model version, an error."""


def scrub(text: str, url: str | None = None, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` (a command line, an error message) without the password of `url` (the same
    redaction as Redis URLs get: service.redis_store.redact) and without `secrets` (an API
    key): for reports, logs and messages."""
    from urllib.parse import urlsplit

    from service.redis_store import redact

    if url:
        text = text.replace(url, redact(url))
        password = urlsplit(url).password
        if password:  # the same URL as an HTTP library prints it (host lower-cased, a path added)
            text = text.replace(f":{password}@", ":***@")
    for secret in secrets:
        if secret:
            # as given, and as a repr or an ASCII-escaping message quotes it (a pasted key with a
            # non-ASCII character makes httpx raise an error whose repr holds '\xa0'-style escapes)
            for form in sorted({secret, repr(secret)[1:-1], ascii(secret)[1:-1],
                                secret.encode("unicode_escape").decode("ascii")}, key=len, reverse=True):
                text = text.replace(form, "***")
    return text


class Oracle(Protocol):
    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]: ...


class PipelineOracle:
    """The real pipeline, in process."""

    def __init__(self, pipe: Pipeline, seed: int = 0) -> None:
        self.pipe, self.seed, self.calls = pipe, seed, 0

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        self.calls += 1
        out = targets.run(self.pipe, x, batch=max(1, len(x)), seed=self.seed + 7919 * self.calls)
        return [(str(s), int(label), float(c) if c == c else 0.0)
                for s, label, c in zip(out.status, out.labels, out.confidence)]


class HttpOracle:
    """POST /predict?pipeline=NAME with multipart PNG files; `client` is an httpx.Client (or a
    FastAPI TestClient) whose base URL is the service (and which sends the API key, if any).
    `expected_version`: the bundle's version every answer's `model_version` must match."""

    def __init__(self, client: Any, pipeline: str, max_images: int = 16, *,
                 expected_version: str | None = None, where: str = "the service") -> None:
        self.client, self.pipeline, self.max_images = client, pipeline, max_images
        self.expected_version, self.where = expected_version, where
        self.requests = 0
        self.refused = 0      # images answered 429 overloaded / 503 (refusals)
        self.blocked = 0      # requests answered 429 attack_suspected

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        from service.imaging import encode_png

        out: list[tuple[str, int, float]] = []
        for i in range(0, len(x), self.max_images):
            chunk = x[i:i + self.max_images]
            files = [("file", (f"{j}.png", encode_png(img), "image/png")) for j, img in enumerate(chunk)]
            r = self.client.post("/predict", params={"pipeline": self.pipeline}, files=files)
            self.requests += 1
            if r.status_code == 200:
                body = r.json()
                version = body.get("model_version")
                if self.expected_version is not None and version != self.expected_version:
                    raise ServiceError(f"{self.where} answers with model_version {version!r}, but the evaluated "
                                       f"bundle is version {self.expected_version!r}: the report would describe "
                                       f"another model (serve this bundle, or evaluate the served one)")
                for res in body["results"]:
                    label = res["label"] if res["label"] is not None else -1
                    out.append((res["status"], int(label), float(res["confidence"] or 0.0)))
                continue
            code = _error_code(r)
            if r.status_code == 429 and code == "attack_suspected":
                self.blocked += 1
                raise Blocked(f"429 attack_suspected from {self.where}", sent=i + len(chunk), answers=out)
            if r.status_code in (429, 503):  # overloaded, unavailable: a refusal, the attack goes on
                self.refused += len(chunk)
                out += [("refused", -1, 0.0)] * len(chunk)
                continue
            if r.status_code in (401, 403):
                raise ServiceError(f"{r.status_code} {code or ''} from {self.where}: it needs an API key this "
                                   f"evaluation does not have (give --api-key, or set SHIELDSERVE_EVAL_API_KEY)")
            raise ServiceError(f"{r.status_code} {code or ''} from {self.where} /predict?pipeline={self.pipeline}")
        return out


def _error_code(r: Any) -> str | None:
    """The service's error code (`{"error": {"code": ...}}`), or None for another body."""
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def answered_outcome(rows: list[dict[str, Any]], eps: float, norm: str) -> "targets.Outcome":
    """The digits as the attack's own answers score them, with no further query: a digit is
    broken (status "accepted", the wrong label the service gave) when the attack received an
    accepted wrong answer for an image within `eps` (`norm`) of the clean digit, measured on
    the 8-bit image sent (L-inf: half an 8-bit step of tolerance, the PNG's rounding of
    x +- eps); else "unbroken" (neither accepted-right, rejected nor abstained: not one answer
    but many)."""
    tol = 0.5 / 255 + 1e-6 if norm == "linf" else 1e-6
    broken = [r["distance"] is not None and r["distance"] <= eps + tol for r in rows]
    return targets.Outcome(np.array(["accepted" if b else "unbroken" for b in broken]),
                           np.array([r["label"] if b else -1 for r, b in zip(rows, broken)], dtype=np.int64),
                           np.array([r["confidence"] if b else np.nan for r, b in zip(rows, broken)], dtype=np.float64),
                           np.full(len(rows), np.nan), 0.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """What a PNG round trip keeps: 8-bit pixels."""
    return (x.clamp(0, 1) * 255).round() / 255


@dataclass
class Best:
    x: torch.Tensor | None = None
    distance: float = float("inf")
    queries_at: int = 0
    label: int = -1               # the wrong label the service answered for x
    confidence: float = 0.0


class BudgetedOracle:
    """Wraps an oracle for ONE digit (true label y): counts queries, never exceeds `budget`."""

    def __init__(self, oracle: Oracle, x0: torch.Tensor, y: int, budget: int, *, norm: str = "l2",
                 num_classes: int = 10, http: bool = False) -> None:
        self.oracle, self.x0, self.y, self.budget = oracle, x0, int(y), int(budget)
        self.norm, self.num_classes, self.http = norm, num_classes, http
        self.used = 0
        self.best = Best()

    def _distance(self, x: torch.Tensor) -> torch.Tensor:
        d = (x - self.x0.unsqueeze(0)).flatten(1)
        return d.norm(dim=1) if self.norm == "l2" else d.abs().max(dim=1).values

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).view(-1, *self.x0.shape)
        if self.http:
            x = quantize(x)
        if self.used + len(x) > self.budget:
            raise BudgetExhausted(f"{self.used} of {self.budget} queries used")
        try:
            answers = self.oracle.answer(x)
        except Blocked as exc:  # the blocked request's images reached the service
            self.used += exc.sent
            # a wrong label the service already gave (an earlier request of this call) is a finding
            self._record(x[:len(exc.answers)], exc.answers)
            raise
        self.used += len(x)
        return self._record(x, answers)

    def _record(self, x: torch.Tensor, answers: list[tuple[str, int, float]]) -> np.ndarray:
        """The answers to `x` as probabilities; the best adversarial among them is kept."""
        # what the service judged: an oracle that alters its queries (a disguise) says what it sent
        sent = getattr(self.oracle, "sent", None)
        if sent is not None:
            x = sent[:len(answers)]
        probs = np.zeros((len(answers), self.num_classes), dtype=np.float32)
        if not answers:
            return probs
        dist = self._distance(x)
        for i, (status, label, conf) in enumerate(answers):
            if status == "accepted" and 0 <= label < self.num_classes:
                if label != self.y and float(dist[i]) < self.best.distance:
                    self.best = Best(x[i].clone(), float(dist[i]), self.used, int(label), float(conf))
                conf = min(max(conf, 1.0 / self.num_classes), 1.0)
                probs[i] = (1.0 - conf) / (self.num_classes - 1)
                probs[i, label] = conf
            else:
                probs[i, self.y] = 1.0
        return probs


def attack_one(kind: str, oracle: Oracle, x0: torch.Tensor, y: int, *, budget: int, eps: float = 0.3,
               num_classes: int = 10, http: bool = False, seed: int = 0,
               start: torch.Tensor | None = None) -> dict[str, Any]:
    """One digit, one black-box attack within `budget` queries. Returns the best adversarial
    found (or None), its distance and the queries used. HopSkipJump starts from `start` (a
    digit of another class, as boundary attacks do) when the model calls it adversarial, else
    from seeded random noise (`hsj_start`); with neither, the attack fails. The same `seed`
    and answers give the same result."""
    from art.attacks.evasion import HopSkipJump, SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    np.random.seed(seed)  # ART's own draws (Square's squares, HopSkipJump's directions)
    norm = "linf" if kind == "square" else "l2"
    q = BudgetedOracle(oracle, x0, y, budget, norm=norm, num_classes=num_classes, http=http)
    ask = _Primed(q)
    clf = BlackBoxClassifierNeuralNetwork(ask, input_shape=tuple(x0.shape), nb_classes=num_classes,
                                          clip_values=(0.0, 1.0))
    xa = x0.unsqueeze(0).numpy().astype(np.float32)
    try:
        if kind == "square":
            atk = SquareAttack(clf, norm=np.inf, eps=eps, max_iter=budget, p_init=0.8, nb_restarts=1,
                               batch_size=1, verbose=False)
            atk.generate(x=xa, y=np.eye(num_classes, dtype=np.float32)[[y]])
        elif kind == "hsj":
            atk = HopSkipJump(clf, batch_size=32, targeted=False, norm=2, max_iter=100, max_eval=40, init_eval=10,
                              init_size=20, verbose=False)
            init = hsj_start(ask, xa[0], None if start is None else start.numpy(),
                             np.random.default_rng(seed), tries=atk.init_size)
            if init is not None:  # else ART would draw its own (unseeded) random images and give up too
                atk.generate(x=xa, y=np.array([y]), x_adv_init=init[None])
        else:
            raise ValueError(f"unknown black-box attack {kind!r}")
    except BudgetExhausted:
        pass
    b = q.best
    return {"x": b.x, "distance": b.distance if b.x is not None else None, "queries": q.used,
            "queries_to_best": b.queries_at if b.x is not None else None,
            "label": b.label if b.x is not None else None, "confidence": b.confidence if b.x is not None else None}


class _Primed:
    """The budgeted oracle as ART's classifier sees it, except that an answer already received
    for an image (`prime`) is handed back, once, when ART asks for that image alone: HopSkipJump
    asks again for the clean digit and its start, and a noisy pipeline (smoothing) could then
    call the start not adversarial, which sends ART to its unseeded random draws. No image is
    sent for a primed answer, so none is counted."""

    def __init__(self, q: BudgetedOracle) -> None:
        self.q = q
        self.known: list[tuple[np.ndarray, np.ndarray]] = []

    def prime(self, img: np.ndarray) -> np.ndarray:
        """Ask the oracle about one image; its answer (a row of probabilities) is kept for ART."""
        probs = self.q(img[None])[0]
        self.known.append((img, probs))
        return probs

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if len(batch) == 1:
            for i, (img, probs) in enumerate(self.known):
                if np.array_equal(img, batch[0]):
                    del self.known[i]
                    return probs[None]
        return self.q(batch)


def hsj_start(ask: _Primed, x0: np.ndarray, start: np.ndarray | None, rng: np.random.Generator,
              tries: int = 20) -> np.ndarray | None:
    """HopSkipJump's starting point for the untargeted attack on `x0`: an image the model
    labels otherwise (argmax of its answer, as ART judges): `start` if so, else the first of
    up to `tries` uniform random images drawn from `rng`; None when none is. Every image is
    asked through `ask` (so counted against the budget, and not asked again by ART)."""
    clean = int(ask.prime(x0).argmax())
    randoms = (rng.uniform(0.0, 1.0, size=x0.shape).astype(np.float32) for _ in range(tries))
    for img in itertools.chain([] if start is None else [start.astype(np.float32)], randoms):
        if int(ask.prime(img).argmax()) != clean:
            return img
        ask.known.pop()  # ART will not ask about it
    return None


def attack_many(kind: str, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, budget: int, eps: float = 0.3,
                http: bool = False, seed: int = 0, bar: Any = None,
                pool: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Attack each digit separately (a fresh budget per digit); the adversarial batch holds the
    best adversarial found per digit, or the clean digit where none was found. HopSkipJump
    starts from the nearest digit of another class in `pool` (the whole test split, as the
    report says; by default the attacked digits themselves, 4 of them in some runs)."""
    advs, rows = [], []
    px, py = pool if pool is not None else (x, y)
    flat, pflat = x.flatten(1), px.flatten(1)
    for i in range(len(x)):
        other = (py != y[i]).nonzero().flatten()
        start = None
        if len(other):  # the nearest digit of another class: HopSkipJump's starting point
            start = px[other[(pflat[other] - flat[i]).norm(dim=1).argmin()]]
        r = attack_one(kind, oracle, x[i], int(y[i]), budget=budget, eps=eps, http=http, seed=seed + i, start=start)
        advs.append(r["x"] if r["x"] is not None else x[i])
        rows.append({k: v for k, v in r.items() if k != "x"})
        if bar is not None:
            bar.update(1)
    return torch.stack(advs), rows
