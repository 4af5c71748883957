"""Pieces every recipe shares: seeding, progress bars, augmentation, evaluation."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def seeded(seed: int, step: str) -> torch.Generator:
    """A generator for one build step, derived from the build seed and the step's name."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sum(ord(c) * 131 ** i for i, c in enumerate(step))) % 2**63)
    return g


def require_same_data(dataset: Any, manifest: dict[str, Any], where: str, bundle: Any, remedy: str) -> str:
    """The content hash of all three splits, refused (ValueError) where the bundle's manifest
    records another (`dataset.sha256`; none recorded: bundles built before it, not checked):
    `train --steps` and `evaluate` on a file replaced in place would train, or report, on data
    the manifest does not name. Returns the hash."""
    content = dataset_sha256(dataset, ("train", "val", "test"))
    recorded = (manifest.get("dataset") or {}).get("sha256")
    if isinstance(recorded, str) and recorded != content:
        raise ValueError(f"{where} is not the data the bundle at {bundle} was built on (its content's sha256 is "
                         f"{content[:12]}..., the manifest's {recorded[:12]}...); restore that data, or {remedy}")
    return content


def dataset_sha256(dataset: Any, splits: tuple[str, ...] = ("train", "val")) -> str:
    """sha256 of the named splits' images and labels (shapes and dtypes included), computed once
    per dataset object. A dataset's name and split sizes say nothing of its content: the same
    path re-split, or a file replaced in place, must not resume a checkpoint trained on other
    images, nor extend a bundle built on them."""
    cache = dataset.__dict__.setdefault("_sha256", {})
    if splits not in cache:
        h = hashlib.sha256()
        for name in splits:
            split = getattr(dataset, name)
            for t in (split.x, split.y):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.numpy().tobytes())
        cache[splits] = h.hexdigest()
    return cache[splits]


class CheckpointError(ValueError):
    """A resumable training checkpoint that cannot be used: unreadable (truncated, not ours),
    trained on other data, or further along than the run asked for. Never swallowed by the
    build (models.train): resuming it is impossible, and training from scratch over it, or
    recording the step as failed, would either overwrite a run the user may want or drop a
    defense the bundle already serves. A ValueError, so the CLI says it in one line (exit 2)."""


def checkpoint_error(step: str, path: Any, problem: str, remove: Any = None) -> CheckpointError:
    """The error for `step`'s unusable checkpoint at `path`: what is wrong and the two ways out
    (delete it, or train in another work directory)."""
    return CheckpointError(
        f"{step} checkpoint {path} cannot be resumed: {problem}; delete {remove or path}, or set "
        f"$SHIELDSERVE_WORK_DIR (or --options '{{\"{step}\": {{\"work_dir\": DIR}}}}') to another directory")


def work_root(configured: str | None) -> str:
    """The directory that holds resumable training checkpoints.

    A configured one (options' work_dir, $SHIELDSERVE_WORK_DIR) is the user's choice. The
    default is per user, `<tmp>/shieldserve-work-<uid>`, created 0700: a shared, predictable
    directory in /tmp would let another local user plant a checkpoint that a build resumes and
    writes into the bundle. An existing one owned by someone else, or writable by others, is
    refused rather than trusted."""
    if configured:
        return configured
    uid = os.getuid() if hasattr(os, "getuid") else None
    root = os.path.join(tempfile.gettempdir(), "shieldserve-work" + ("" if uid is None else f"-{uid}"))
    os.makedirs(root, mode=0o700, exist_ok=True)
    check_private_dir(root)
    os.chmod(root, 0o700)  # ours and not writable by others: also not readable by them (the user's data)
    return root


def check_private_dir(path: str) -> None:
    """Refuse (one line) a checkpoint directory another local user could write to."""
    if not hasattr(os, "getuid"):  # no POSIX owners: nothing to check
        return
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"checkpoint directory {path} is not a plain directory; remove it or set "
                         f"$SHIELDSERVE_WORK_DIR to a directory of your own")
    if st.st_uid != os.getuid():
        raise ValueError(f"checkpoint directory {path} is owned by uid {st.st_uid}, not you; remove it "
                         f"or set $SHIELDSERVE_WORK_DIR to a directory of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"checkpoint directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                         f"chmod 700 it or set $SHIELDSERVE_WORK_DIR to a directory of your own")


def progress(total: int, desc: str, unit: str = "batch") -> tqdm:
    disable = os.environ.get("SHIELDSERVE_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable,
                file=sys.stderr, dynamic_ncols=True)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def random_affine(x: torch.Tensor, generator: torch.Generator, max_shift: float = 2.0,
                  max_degrees: float = 10.0, max_scale: float = 0.1) -> torch.Tensor:
    """Small random shifts, rotations and scalings: cheap augmentation for small digit sets."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_degrees)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * max_scale
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0] * 2 / w], 1),
        torch.stack([sin, cos, shift[:, 1] * 2 / h], 1),
    ], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def fit_keep_best(net: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, epochs: int,
                  batch_size: int, lr: float, generator: torch.Generator,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  score: Callable[[], tuple[Any, dict[str, str]]], desc: str, weight_decay: float = 0.0) -> Any:
    """Train `net` with Adam and a one-cycle schedule on mini-batches shuffled by `generator`:
    `loss(xb, yb)` per batch (net in train mode), then after each epoch `score()` (net in eval
    mode) gives a comparable score and the progress bar's fields. The weights of the best epoch
    (the later one on a tie) are loaded back; the net is left in eval mode. Returns that score."""
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    best: Any = None
    best_state: dict[str, torch.Tensor] | None = None
    bar = progress(epochs * steps_per_epoch, desc)
    for epoch in range(epochs):
        net.train()
        for idx in batches(len(x_train), batch_size, generator):
            value = loss(x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            bar.update(1)
        net.eval()
        current, fields = score()
        bar.set_postfix(epoch=epoch + 1, **fields)
        if best is None or current >= best:
            best, best_state = current, copy.deepcopy(net.state_dict())
    bar.close()
    assert best_state is not None, "fit_keep_best needs epochs >= 1"
    net.load_state_dict(best_state)
    net.eval()
    return best
