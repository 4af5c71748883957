"""The project's own attacks work on real digits against the committed classifier."""

from __future__ import annotations

import torch

from models.bundle import Bundle
from models.recipes.common import accuracy
from service.attacks import fgsm, pgd


def test_default_classifier_accuracy_and_pgd_drives_it_below_10_percent(default_bundle, mnist):
    clf = Bundle.load(default_bundle).classifier()
    test = mnist.test
    clean = accuracy(clf, test.x, test.y)
    assert clean >= 0.975, f"clean accuracy {clean:.4f} on the 1,000 test digits"
    sub = test.per_class(20)  # 200 digits keep the test quick
    g = torch.Generator().manual_seed(0)
    adv = pgd(clf, sub.x, sub.y, eps=0.3, steps=40, step_size=0.01, generator=g)
    assert float((adv - sub.x).abs().max()) <= 0.3 + 1e-6
    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0
    assert accuracy(clf, adv, sub.y) < 0.10


def test_fgsm_and_l2_pgd_lower_accuracy_within_their_budgets(default_bundle, mnist):
    clf = Bundle.load(default_bundle).classifier()
    sub = mnist.test.per_class(10)
    base = accuracy(clf, sub.x, sub.y)
    adv = fgsm(clf, sub.x, sub.y, eps=0.3)
    assert float((adv - sub.x).abs().max()) <= 0.3 + 1e-6
    assert accuracy(clf, adv, sub.y) < base - 0.3
    adv2 = pgd(clf, sub.x, sub.y, eps=3.0, steps=40, norm="l2", generator=torch.Generator().manual_seed(1))
    assert float((adv2 - sub.x).flatten(1).norm(dim=1).max()) <= 3.0 + 1e-4
    assert accuracy(clf, adv2, sub.y) < 0.3
