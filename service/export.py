"""`shieldserve export`: a pipeline's deterministic, differentiable part as a TorchScript file.

The exported module takes pixels in [0, 1], shape (B, C, H, W), and returns logits (B, K):
the pipeline's purifiers with exact gradients (MagNet's reformer, clamped to [0, 1] as served),
then the network whose logits decide (the base classifier, or the one an adapter hands over:
`robust`, `neuralfp`). Users attack it with their own tools (AutoAttack,
RobustBench-style scripts) without reimplementing our code.

What is left out is said, never hidden: detectors and the query monitor (their rejections are
not in the logits) and smoothing's noise and vote (the export is the base function f the service smooths, not the
smoothed classifier g). A pipeline whose answer depends on a step without exact gradients
(Defense-GAN's projection: an optimisation over z; RMC: per-image fine-tuning) is refused:
exporting its classifier alone would not compute the pipeline's labels even on clean digits.
So is a pipeline the service does not serve on the bundle (a defense the quality gate marked
unusable there, or one the bundle lacks): an export is only ever of what the service serves.

The file is written atomically (a temporary file beside it, then a rename), and an existing
file is replaced only when it is an earlier export (load_info reads it) or with `force`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.pipeline import Pipeline

INFO_FILE = "shieldserve.json"  # the description stored inside the TorchScript file (extra files)


class ExportRefused(ValueError):
    """The pipeline has no deterministic, differentiable part that answers like it."""


class _Clamp01(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


@dataclass
class ExportPlan:
    pipeline: str
    model: nn.Module
    parts: list[str]
    left_out: list[str] = field(default_factory=list)
    # whether what is left out only rejects (detectors, the query monitor), never relabels
    # (smoothing's vote: g's label is not f's)
    only_rejections_left_out: bool = True

    @property
    def exact(self) -> bool:
        """True when the exported logits' argmax is the pipeline's label on every image the
        pipeline accepts (what it rejects is in `left_out`)."""
        return self.only_rejections_left_out


def plan(pipe: Pipeline) -> ExportPlan:
    """Which components go into the export, which are left out, or why none can be."""
    stages: list[nn.Module] = []
    parts: list[str] = []
    left_out: list[str] = []
    relabels = False
    labeler: Any = pipe.classifier
    labeler_name = "classifier"
    roles = [c.role for c in pipe.components]
    decider_at = roles.index("decider") if "decider" in roles else len(roles)
    if pipe.monitor is not None:
        left_out.append("query monitor: its rejections of near copies of recent queries are not part of the logits")
    for c in pipe.components[:decider_at]:
        if c.role == "detector":
            left_out.append(f"{c.defense} detector: its rejections are not part of the logits")
        elif c.role == "purifier":
            _add_purifier(pipe, c, stages, parts)
        elif c.role == "adapter" and isinstance(getattr(c, "network", None), nn.Module):
            labeler = c.network  # type: ignore[attr-defined]
            labeler_name = getattr(c, "artifact", None) or f"{c.defense} classifier"
        elif c.role == "adapter":
            raise ExportRefused(f"pipeline {pipe.name!r}: the {c.defense} adapter changes the classifier per "
                                f"request (e.g. RMC's fine-tuning), so there is no fixed network to export")
    decider = pipe.components[decider_at] if decider_at < len(roles) else None
    if decider is not None and decider.defense == "smoothing":
        s: Any = decider
        if s.use_denoiser:
            denoiser = s.eager_denoisers[s.sigma]
            if not isinstance(denoiser, nn.Module):
                raise ExportRefused(f"pipeline {pipe.name!r}: its denoiser is not a torch module")
            stages.append(denoiser)
            parts.append(f"smoothing denoiser (sigma {s.sigma:g})")
            # the purifiers after it run inside f, between the denoiser and the classifier
            # (service.pipeline._compose): the export computes that f, or is refused
            for c in pipe.components[decider_at + 1:]:
                _add_purifier(pipe, c, stages, parts)
        else:
            labeler = s.eager_classifiers[s.sigma]
            labeler_name = f"smoothing base classifier (sigma {s.sigma:g})"
        left_out.append(f"smoothing noise and vote (sigma {s.sigma:g}): this is the base classifier f the service "
                        f"smooths, not the smoothed classifier g; its labels are f's, and the certificate is g's")
        relabels = True
    elif decider is not None:
        raise ExportRefused(f"pipeline {pipe.name!r}: its {decider.defense} decision is not an argmax of logits")
    if not isinstance(labeler, nn.Module):
        raise ExportRefused(f"pipeline {pipe.name!r}: its classifier is not a torch module")
    parts.append(labeler_name)
    return ExportPlan(pipe.name, nn.Sequential(*stages, labeler).eval(), parts, left_out, not relabels)


def _add_purifier(pipe: Pipeline, c: Any, stages: list[nn.Module], parts: list[str]) -> None:
    """A purifier into the export (MagNet's reformer: its autoencoder, clamped as served), or
    the refusal: the others are optimisations, not networks."""
    if c.defense != "magnet":
        raise ExportRefused(f"pipeline {pipe.name!r}: the {c.defense} purifier has no exact gradient (an "
                            f"optimisation, not a network), so no TorchScript module computes this pipeline's "
                            f"labels; attack it with `shieldserve evaluate` (BPDA) instead")
    stages += [c.autoencoder, _Clamp01()]
    parts.append(f"magnet reformer ({getattr(c, 'name', 'autoencoder')})")


def export(bundle: str | Path, pipeline: str, out: str | Path, config: str | None = None, *,
           force: bool = False) -> ExportPlan:
    """Write `pipeline`'s deterministic, differentiable part to `out` as TorchScript (traced on
    a [0, 1] batch, then checked against the eager modules on random digits).

    Refused (ExportRefused) for a pipeline the service would not serve on this bundle (a
    defense it names is unusable there: models.bundle.Bundle.unusable, as the runtime checks),
    and for an existing `out` that is not a shieldserve export unless `force`: a re-export
    replaces an earlier export, never another file by mistake. The file is written next to
    `out` under a temporary name and renamed over it (os.replace), so `out` is either the old
    file or the complete new one, never a partial write."""
    from models.bundle import Bundle, defense_key
    from service.evaluation.targets import load_pipelines
    from service.settings import load_settings

    out = Path(out)
    _check_target(out, force)
    settings = load_settings(config, bundle=bundle)
    b = Bundle.load(settings.bundle, verify=False, trusted_imports=settings.trusted_imports)
    b.require_finished()
    if pipeline in settings.pipelines:
        for entry in settings.pipelines[pipeline].model_dump().get("defenses", []) or []:
            key = defense_key(entry)
            reason = b.unusable(key)
            if reason is not None:  # the service leaves it out (404): no export claims to be it
                raise ExportRefused(f"pipeline {pipeline!r} is not served on this bundle ({key}: {reason}), "
                                    f"so there is no served pipeline to export")
    base, pipes = load_pipelines(bundle, [pipeline], config)
    if pipeline in settings.pipelines:  # as the service: a composition, or a defense with other settings
        from service.runtime import gated_digests

        reason = b.composition_refusal(settings.pipelines[pipeline].model_dump().get("defenses", []) or [],
                                       pipes[pipeline].settings_digest, gated_digests(b, base, torch.device("cpu")))
        if reason is not None:
            raise ExportRefused(f"pipeline {pipeline!r} is not served on this bundle ({reason}), so there is no "
                                f"served pipeline to export")
    p = plan(pipes[pipeline])
    spec = b.input_spec
    g = torch.Generator().manual_seed(0)
    probe = torch.rand((8, *spec.shape), generator=g)
    with torch.no_grad():
        traced = torch.jit.trace(p.model, probe, check_trace=False)
        check = torch.rand((5, *spec.shape), generator=g)
        if not torch.allclose(traced(check), p.model(check), atol=1e-4, rtol=1e-4):
            raise ExportRefused(f"pipeline {pipeline!r}: the traced module differs from the eager one")
    info = {"pipeline": pipeline, "bundle_version": b.version,
            "input": {"shape": ["B", *spec.shape], "range": [0.0, 1.0], "dtype": "float32"},
            "output": "logits", "class_names": list(spec.class_names), "parts": p.parts,
            "left_out": p.left_out, "exact": p.exact}
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(traced, out, {INFO_FILE: json.dumps(info, indent=1)}, force)
    return p


def _check_target(out: Path, force: bool) -> None:
    """Refuse to write over anything at `out` but an earlier shieldserve export (any file with
    `force`; never a directory), and a folder for it that cannot be one."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportRefused(f"--out {out}: {parent} is not a directory")
            break
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        raise ExportRefused(f"--out {out} is a directory; name the file to write")
    if force:
        return
    try:
        load_info(out)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not ours to replace
        raise ExportRefused(f"--out {out} exists and is not a shieldserve export ({exc}); "
                            f"not replacing it (force it with --force, or choose another --out)") from None


def _save_atomically(traced: torch.jit.ScriptModule, out: Path, extra: dict[str, str], force: bool) -> None:
    """torch.jit.save into a fresh directory beside `out` (same file system; the file keeps
    `out`'s name, which torch takes as the archive's name), flushed to disk, then renamed over
    `out` in one step."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp = tmp_dir / out.name
    try:
        torch.jit.save(traced, str(tmp), _extra_files=extra)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _check_target(out, force)  # again: something may have appeared there while we traced
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_dir.rmdir()


MAX_INFO_BYTES = 1 << 20  # the description is a few hundred bytes; a larger entry is not ours


def load_info(path: str | Path) -> dict[str, Any]:
    """The description an exported file carries (pipeline, parts, what was left out).

    Read from the archive as a zip entry (`<archive>/extra/shieldserve.json`, where
    torch.jit.save puts extra files), never by torch.jit.load: loading a file unpickles its
    constants, and the file may come from anyone."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a TorchScript archive (a zip file)") from None
    with archive:
        names = archive.namelist()
        # torch's reader takes the archive's name from its first entry's directory
        root = names[0].split("/", 1)[0] if names else ""
        entry = f"{root}/extra/{INFO_FILE}"
        if entry not in names:
            raise ValueError(f"{path} is not a shieldserve export: no {INFO_FILE} in it")
        if archive.getinfo(entry).file_size > MAX_INFO_BYTES:
            raise ValueError(f"{path}: {INFO_FILE} is larger than {MAX_INFO_BYTES} bytes")
        with archive.open(entry) as f:
            return json.loads(f.read(MAX_INFO_BYTES + 1))
