"""A broken or hostile neuralfp section is refused when the pipeline is built, with an error
naming the artifact or the manifest key: fingerprints that do not fit the input or the
classes (a bare torch broadcasting error at the warm-up before, a 500 on every request with
the warm-up off), and calibration numbers that are not finite (a NaN threshold is never
exceeded: the detector accepted everything). No message carries a fingerprint value.
Seconds in all: a copy of the quick bundle and one build per case, nothing trained."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from models.bundle import BundleError, content_version
from service.defenses.base import RunContext
from service.pipeline import Pipeline, PipelineConfigError
from tests.conftest import defense_env

ARTIFACT = "neuralfp_fingerprints"


@pytest.fixture(scope="module")
def fingerprints(quick_bundle) -> dict[str, torch.Tensor]:
    return load_file(str(quick_bundle / f"{ARTIFACT}.safetensors"))


def _env_with(quick_bundle: Path, root: Path, tensors: dict[str, torch.Tensor]):
    """A copy of the quick bundle whose fingerprints artifact holds `tensors` (hash, size and
    version updated: only the contents are wrong)."""
    shutil.copytree(quick_bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    record = m["artifacts"][ARTIFACT]
    data = save_tensors({k: v.contiguous() for k, v in tensors.items()})
    (root / record["file"]).write_bytes(data)
    record.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m["version"] = content_version(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return defense_env(root)


def _leaked(message: str, fp: dict[str, torch.Tensor]) -> list[str]:
    out = []
    for v in fp["dx"].flatten()[:2000].tolist():
        if abs(v) >= 1e-3:
            out += [s for s in (repr(v), f"{v:.8g}", f"{v:.6f}") if s in message]
    return out


def _cases(fp):
    dx, dy = fp["dx"], fp["dy"]
    nan_dx, inf_dy = dx.clone(), dy.clone()
    nan_dx[3, 0, 5, 5] = float("nan")
    inf_dy[0, 1, 2] = float("inf")
    return {
        "dx 14x14": ({"dx": dx[..., :14, :14], "dy": dy}, r"dx must have shape \(10, 1, 28, 28\).*got \(10, 1, 14, 14\)"),
        "dx flat": ({"dx": dx.flatten(1), "dy": dy}, r"dx must have shape \(10, 1, 28, 28\).*got \(10, 784\)"),
        "dy fewer": ({"dx": dx, "dy": dy[:5]}, r"dy must have shape \(10, 10, 10\).*got \(5, 10, 10\)"),
        "dy classes": ({"dx": dx, "dy": dy[:, :9]}, r"dy must have shape \(10, 10, 10\).*got \(10, 9, 10\)"),
        "no dy": ({"dx": dx}, r"has no dy"),
        "none": ({"dx": dx[:0], "dy": dy[:0]}, r"0 fingerprints; expected 1 to"),
        "int dx": ({"dx": (dx * 100).to(torch.int32), "dy": dy}, r"dx must be floating point, got torch.int32"),
        "nan dx": ({"dx": nan_dx, "dy": dy}, r"dx holds non-finite values"),
        "inf dy": ({"dx": dx, "dy": inf_dy}, r"dy holds non-finite values"),
    }


@pytest.mark.parametrize("case", ["dx 14x14", "dx flat", "dy fewer", "dy classes", "no dy", "none", "int dx",
                                  "nan dx", "inf dy"])
def test_misfit_fingerprints_are_refused_naming_the_artifact(quick_bundle, tmp_path, fingerprints, case):
    from service.defenses.neuralfp import build

    tensors, problem = _cases(fingerprints)[case]
    env = _env_with(quick_bundle, tmp_path / "b", tensors)
    with pytest.raises(BundleError, match=problem) as info:
        build({}, env)
    message = str(info.value)
    assert repr(ARTIFACT) in message and str(env.bundle.path) in message
    assert not _leaked(message, fingerprints)  # shapes and dtypes only: the values are secret


def test_start_up_refuses_them_as_a_configuration_error(quick_bundle, tmp_path, fingerprints):
    # what the runtime calls for each pipeline at start-up, before any warm-up
    env = _env_with(quick_bundle, tmp_path / "b", {"dx": fingerprints["dx"][..., :14, :14], "dy": fingerprints["dy"]})
    with pytest.raises(PipelineConfigError, match=f"pipeline 'neuralfp'.*{ARTIFACT}.*dx must have shape") as info:
        Pipeline.build("neuralfp", {"defenses": ["neuralfp"]}, env)
    assert not _leaked(str(info.value), fingerprints)


def test_the_fingerprint_count_is_bounded(quick_bundle, tmp_path, fingerprints, monkeypatch):
    import service.defenses.neuralfp as nfp

    env = _env_with(quick_bundle, tmp_path / "b", fingerprints)
    monkeypatch.setattr(nfp, "MAX_FINGERPRINTS", 9)  # the quick bundle's 10, one over
    with pytest.raises(BundleError, match="10 fingerprints; expected 1 to 9"):
        nfp.build({}, env)


def test_float64_fingerprints_serve_as_float32(quick_bundle, tmp_path, fingerprints):
    from service.defenses.neuralfp import build

    env = _env_with(quick_bundle, tmp_path / "b", {k: v.double() for k, v in fingerprints.items()})
    detector, _ = build({}, env)
    assert detector._dx.dtype == detector._dy.dtype == torch.float32
    (d,) = detector.detect(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)), None, RunContext())
    assert d.scores.shape == (3,) and bool(torch.isfinite(d.scores).all())


def _edit_section(env, edit):
    env.bundle.manifest = copy.deepcopy(env.bundle.manifest)
    edit(env.bundle.manifest["defenses"]["neuralfp"])
    return env


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s["calibration"]["thresholds"].__setitem__("fingerprint", NAN), r"thresholds.fingerprint must be a finite"),
    (lambda s: s["calibration"]["thresholds"].__setitem__("fingerprint", INF), r"thresholds.fingerprint must be a finite"),
    (lambda s: s["calibration"]["thresholds"].__setitem__("fingerprint", -0.5), r"thresholds.fingerprint must be a finite"),
    (lambda s: s["calibration"]["thresholds"].__setitem__("fingerprint", "0.8"), r"thresholds.fingerprint must be a number"),
    (lambda s: s["calibration"]["thresholds"].pop("fingerprint"), r"thresholds.fingerprint must be a number, got None"),
    (lambda s: s["calibration"].__setitem__("target_fpr", NAN), r"target_fpr must be a finite"),
    (lambda s: s["calibration"].__setitem__("target_fpr", 2.0), r"target_fpr must be a rate in \[0, 1\]"),
    (lambda s: s.__setitem__("match", "closest"), r"match must be one of"),
    (lambda s: (s.__setitem__("match", "either"), s["calibration"]["thresholds"].update(min=NAN, predicted=1.0)),
     r"thresholds.min must be a finite number > 0"),
    (lambda s: (s.__setitem__("match", "either"), s["calibration"]["thresholds"].update(min=0.5, predicted=0.0)),
     r"thresholds.predicted must be a finite number > 0"),
], ids=["nan", "inf", "negative", "string", "missing", "fpr nan", "fpr 2", "match", "either nan", "either zero"])
def test_non_finite_calibration_numbers_are_refused(quick_bundle, edit, problem):
    from service.defenses.neuralfp import build

    env = _edit_section(defense_env(quick_bundle), edit)
    with pytest.raises(BundleError, match=problem) as info:
        build({}, env)
    assert "defenses.neuralfp" in str(info.value)


def test_the_shipped_sections_still_build(quick_bundle, default_bundle):
    from service.defenses.neuralfp import build

    for path in (quick_bundle, default_bundle):
        env = defense_env(path)
        detector, _ = build({}, env)
        th = env.bundle.defense("neuralfp")["calibration"]["thresholds"]
        assert detector.threshold == th["fingerprint"]
        assert detector.taus in (None, {"min": th.get("min"), "predicted": th.get("predicted")})
    either = _edit_section(defense_env(quick_bundle),  # `either` with taus written as integers
                           lambda s: (s.__setitem__("match", "either"),
                                      s["calibration"]["thresholds"].update(min=1, predicted=2, fingerprint=1)))
    assert build({"classify_with": "base"}, either)[0].taus == {"min": 1.0, "predicted": 2.0}
