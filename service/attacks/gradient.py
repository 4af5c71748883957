"""FGSM and PGD (L-inf and L2, random start) on a model that maps [0, 1] pixels to logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def _loss_grad(model: Model, x: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    if targeted:
        loss = -loss
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    norms = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norms.view(-1, *([1] * (g.dim() - 1)))


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *,
         targeted: bool = False, clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one L-inf step of size eps."""
    grad = _loss_grad(model, x, y, targeted)
    return (x + eps * grad.sign()).clamp(*clip).detach()


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 40,
        step_size: float | None = None, norm: str = "linf", random_start: bool = True,
        targeted: bool = False, generator: torch.Generator | None = None,
        clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in an L-inf or L2 ball of radius eps.

    The default step size is 2.5 * eps / steps, Madry's rule of thumb; with a random start
    the first iterate is uniform in the L-inf ball or uniform in the L2 ball.
    """
    if norm not in ("linf", "l2"):
        raise ValueError("norm must be 'linf' or 'l2'")
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
        else:
            d = torch.randn(x.shape, generator=generator, device=x.device)
            radius = torch.rand(x.shape[0], generator=generator, device=x.device) ** (1.0 / d[0].numel())
            delta = _l2_normalize(d) * (eps * radius).view(-1, *([1] * (x.dim() - 1)))
        delta = (x + delta).clamp(*clip) - x
    for _ in range(steps):
        grad = _loss_grad(model, x + delta, y, targeted)
        if norm == "linf":
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        else:
            delta = _project_l2(delta + alpha * _l2_normalize(grad), eps)
        delta = (x + delta).clamp(*clip) - x
    return (x + delta).detach()
