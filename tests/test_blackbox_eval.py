"""The black-box evaluation's own machinery, on tiny fake oracles (no bundle, no training):
HopSkipJump's reproducibility with a seed, and the answers received before a 429 block."""

from __future__ import annotations

import pytest
import torch

from service.evaluation import blackbox

Y = 3  # the clean digit's label
WRONG = 5  # the label the fake model gives bright images


def digit() -> torch.Tensor:
    x0 = torch.zeros(1, 28, 28)
    x0[0, 8:20, 12:16] = 0.8  # a dark "1": mean about 0.05
    return x0


class BrightIsFive:
    """A deterministic stand-in for a pipeline: accepted `WRONG` for images brighter than 0.3 on
    average, else accepted `Y`; rejects the images in `reject` (the given starting point), each
    from its `after`-th ask on (0: always). Records how many images it answered."""

    def __init__(self, reject: list[torch.Tensor] = (), after: int = 0) -> None:
        self.reject, self.after, self.asked, self.images = list(reject), after, {}, 0

    def answer(self, x: torch.Tensor) -> list[tuple[str, int, float]]:
        out = []
        for img in x:
            self.images += 1
            hit = next((i for i, r in enumerate(self.reject) if torch.allclose(img, r, atol=1e-6)), None)
            if hit is not None:
                self.asked[hit] = self.asked.get(hit, 0) + 1
                if self.asked[hit] > self.after:
                    out.append(("rejected", -1, 0.0))
                    continue
            out.append(("accepted", WRONG, 0.9) if float(img.mean()) > 0.3 else ("accepted", Y, 0.9))
        return out


def hsj(oracle, x0, start, seed=7, budget=60):
    return blackbox.attack_one("hsj", oracle, x0, Y, budget=budget, seed=seed, start=start)


def same(a: dict, b: dict) -> bool:
    if (a["x"] is None) != (b["x"] is None) or (a["x"] is not None and not torch.equal(a["x"], b["x"])):
        return False
    return all(a[k] == b[k] for k in a if k != "x")


def test_hsj_is_reproducible_when_the_start_is_rejected():
    """The given start (another class's digit) is rejected, so a random starting point is
    drawn: from the seed, so two runs with the same seed give the same result."""
    x0 = digit()
    start = torch.full_like(x0, 0.6)  # "another class" for the model, but the service rejects it
    runs = []
    for _ in range(2):
        oracle = BrightIsFive(reject=[start])
        r = hsj(oracle, x0, start)
        assert r["queries"] == oracle.images <= 60  # every image sent is counted, within the budget
        runs.append(r)
    assert runs[0]["x"] is not None and runs[0]["label"] == WRONG  # a random start was found and walked
    assert same(runs[0], runs[1]), (runs[0]["distance"], runs[1]["distance"])


def test_hsj_starts_from_the_start_it_checked():
    """A start the model called adversarial when checked stays the attack's start even if the
    same image is refused when asked again (a noisy pipeline): no unseeded random draw."""
    x0 = digit()
    start = torch.full_like(x0, 0.6)
    runs = []
    for _ in range(2):
        oracle = BrightIsFive(reject=[start], after=1)  # accepted (WRONG) the first time, then rejected
        runs.append(hsj(oracle, x0, start))
        assert oracle.asked[0] == 1  # checked once, not asked again
    assert same(runs[0], runs[1])


def test_hsj_gives_up_when_no_start_is_adversarial():
    """Neither the start nor the 20 random images are adversarial: the digit stands, after
    1 (the clean digit) + 1 (the start) + 20 queries."""
    x0 = digit()

    class AlwaysRight(BrightIsFive):
        def answer(self, x):
            self.images += len(x)
            return [("accepted", Y, 0.9)] * len(x)

    oracle = AlwaysRight()
    r = hsj(oracle, x0, torch.full_like(x0, 0.6))
    assert r["x"] is None and r["distance"] is None
    assert r["queries"] == oracle.images == 22


class BlockSecond:
    """A fake /predict client: the first request is answered (image 0 accepted with a wrong
    label, the others with the true one), every later one gets 429 attack_suspected."""

    def __init__(self) -> None:
        self.requests = 0

    def post(self, url, params=None, files=None, **kw):
        import httpx

        self.requests += 1
        request = httpx.Request("POST", "http://fake" + url)
        if self.requests > 1:
            return httpx.Response(429, request=request,
                                  json={"error": {"code": "attack_suspected", "message": "blocked"}})
        results = [{"status": "accepted", "label": WRONG if j == 0 else Y, "confidence": 0.8, "rejected_by": []}
                   for j in range(len(files))]
        return httpx.Response(200, request=request, json={"request_id": "r", "pipeline": params["pipeline"],
                                                          "model_version": "v1", "results": results})


def test_answers_before_a_block_are_recorded():
    """HopSkipJump asks for more images than one request carries: an accepted wrong label in a
    request answered before the block counts as the attack's finding."""
    x0 = digit()
    near = x0.clone()
    near[0, :10, :10] += 0.05  # L2 about 0.5 from x0
    batch = torch.stack([near, x0, x0, x0]).numpy()
    oracle = blackbox.HttpOracle(BlockSecond(), "baseline", max_images=2, expected_version="v1")
    q = blackbox.BudgetedOracle(oracle, x0, Y, 10, http=True)
    with pytest.raises(blackbox.Blocked):
        q(batch)
    assert q.used == 4 and oracle.blocked == 1  # both requests' images reached the service
    assert q.best.x is not None and q.best.label == WRONG and q.best.confidence == pytest.approx(0.8)
    expected = float((blackbox.quantize(near.unsqueeze(0))[0] - x0).norm())
    assert q.best.distance == pytest.approx(expected) and q.best.queries_at == 4
    outcome = blackbox.answered_outcome([{"distance": q.best.distance, "label": q.best.label,
                                          "confidence": q.best.confidence}], eps=2.0, norm="l2")
    assert outcome.status[0] == "accepted" and outcome.labels[0] == WRONG


def test_report_md_prints_the_interval_rounded_outwards() -> None:
    """report.json's interval is rounded outwards (it stays >= 95%); report.md printed it to
    the nearest, narrower: 1 of 10 digits, 0.00253-0.44502, as 0.003-0.445."""
    from service.evaluation.metrics import clopper_pearson
    from service.evaluation.report import _with_ci

    for k, n, shown in ((1, 10, "0.002-0.446"), (0, 10, "0.000-0.309"), (9, 10, "0.554-0.998")):
        lo, hi = clopper_pearson(k, n)
        row = {"n": n, "robust_accuracy": k / n, "robust_accuracy_ci95": [lo, hi]}
        assert f"95% CI {shown}" in _with_ci(k / n, "x", row), (k, n)
