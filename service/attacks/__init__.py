"""Small, batched torch attacks used inside the project (RMC's augmentation, tests, evaluation).

The standard attack suite for evaluation comes from ART; these are the few the service and
its training recipes need at build time, written to run on any device without extra packages.
"""

from service.attacks.cw import cw_l2
from service.attacks.gradient import fgsm, pgd

__all__ = ["cw_l2", "fgsm", "pgd"]
