"""A defense's verdict speaks for the settings it was measured with (team rule: never silently
wrong). The gate measures each defense as GATED builds it, with the packaged settings, and
records that pipeline's `settings_digest` in the verdict; a user's pipeline of that one defense
with other settings (an auditor's Defense-GAN projecting 2 steps from a random start answered 7
of 40 digits over HTTP and was served as "passed") is judged by its own measurement
(`shieldserve train --steps quality --config`), else not served where the gate enforces, and
served with a WARNING where it does not (models.bundle.Bundle.composition,
models.recipes.quality.measure_pipelines)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import Bundle

FAST = {"defense": "defensegan", "projection": "default", "overrides": {"init": "random", "steps": 2, "restarts": 1}}
FIX = "--steps quality --config"


def _verdict(drop: float = 0.0, digest: str | None = None) -> dict:
    v = {"usable": True, "passes": drop <= 0.02, "val_accuracy": round(1.0 - drop, 4), "base_val_accuracy": 1.0,
         "accuracy_drop": drop, "rejection_rate": 0.0, "images": 300, "reason": "measured"}
    if digest is not None:
        v["settings_digest"] = digest
    return v


@pytest.fixture(scope="module")
def gated(quick_bundle: Path) -> dict[str, dict]:
    """Each GATED key -> its verdict as the gate records it now on the quick bundle (passed, with
    the digest of its pipeline built here with the packaged settings)."""
    from models.recipes.quality import GATED
    from service.runtime import gated_digests

    b = Bundle.load(quick_bundle)
    here = gated_digests(b, b.classifier("cpu"), torch.device("cpu"))
    return {key: {**_verdict(digest=here(entries)), "pipeline": entries} for key, entries in GATED.items()}


def _bundle(quick_bundle: Path, tmp_path: Path, verdicts: dict, enforce: bool = True,
            pipelines: dict | None = None) -> Path:
    """The quick bundle with this quality section (its hashed version is unchanged: it verifies)."""
    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    m["quality"] = {"enforce": enforce, "max_accuracy_drop": 0.02, "images": 300, "defenses": verdicts}
    if pipelines is not None:
        m["quality"]["pipelines"] = pipelines
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _serve(bundle: Path, tmp_path: Path, pipelines: dict | None, caplog) -> tuple[dict, list[str], dict]:
    """/pipelines with the packaged config, `pipelines` merged over it (None: the packaged one alone)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    config = None
    if pipelines is not None:
        config = tmp_path / "serve.yaml"
        config.write_text(json.dumps({"pipelines": pipelines}))  # JSON is YAML
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        settings = load_settings(str(config) if config else None, bundle=str(bundle), warmup=False)
        with TestClient(create_app(settings)) as client:
            body = client.get("/pipelines").json()
            digests = {n: p.settings_digest for n, p in client.app.state.runtime.pipelines.items()}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "shieldserve"]
    return body, warnings, digests


def _served(body: dict) -> dict[str, dict]:
    return {p["name"]: p for p in body["pipelines"]}


def test_a_defense_with_other_settings_is_not_served_where_the_gate_enforces(quick_bundle, tmp_path, gated,
                                                                             caplog) -> None:
    bundle = _bundle(quick_bundle, tmp_path, gated)
    body, warnings, _ = _serve(bundle, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    why = body["unavailable"]["defensegan-fast"]
    assert "defensegan" in why and "other settings" in why and FIX in why and "YOUR_CONFIG.yaml" in why
    assert any(w.startswith("pipeline defensegan-fast is not served") for w in warnings)
    served = _served(body)
    assert served["defensegan"]["quality"] == "passed"  # the packaged one is what the gate measured
    # evaluate and export ask the same (models.bundle.Bundle.composition_refusal)
    from service.runtime import gated_digests

    b = Bundle.load(bundle)
    here = gated_digests(b, b.classifier("cpu"), torch.device("cpu"))
    digest = gated["defensegan"]["settings_digest"]
    assert b.composition_refusal([{"defense": "defensegan", "projection": "default"}], digest, here) is None
    other = "0123456789abcdef"
    assert FIX in b.composition_refusal([FAST], other, here)
    from service.export import ExportRefused, export

    with pytest.raises(ExportRefused, match="not served on this bundle") as refused:
        export(bundle, "defensegan-fast", tmp_path / "fast.pt", config=str(tmp_path / "serve.yaml"))
    assert FIX in str(refused.value) and not (tmp_path / "fast.pt").exists()
    from service.evaluation.harness import EvalConfig, Evaluation

    evaluation = Evaluation(EvalConfig(bundle=str(bundle), config=str(tmp_path / "serve.yaml"), limit=2))
    assert "defensegan" in evaluation.pipes and "defensegan-fast" not in evaluation.pipes


def test_a_measurement_of_those_settings_decides(quick_bundle, tmp_path, gated, caplog) -> None:
    probe = _bundle(quick_bundle, tmp_path / "probe", gated, enforce=False)
    _, _, digests = _serve(probe, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    fast = digests["defensegan-fast"]
    assert fast != gated["defensegan"]["settings_digest"]

    def record(drop: float) -> dict:
        rec = {**_verdict(drop), "defenses": [FAST], "keys": ["defensegan"], "settings_digest": fast}
        if drop > 0.02:
            rec.update(usable=False, reason="clean validation accuracy 0.1500 is 0.8500 below the base classifier's")
        return rec

    passed = _bundle(quick_bundle, tmp_path / "passed", gated, pipelines={"mine": record(0.0)})
    body, warnings, _ = _serve(passed, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    assert "defensegan-fast" not in body["unavailable"]
    assert _served(body)["defensegan-fast"]["quality"] == "passed"
    assert not [w for w in warnings if "defensegan-fast" in w], warnings
    # the record is matched by the built pipeline's digest, not by its name or how the config writes it
    written = {**FAST, "overrides": {"restarts": 1, "steps": 2, "init": "random"}}
    body, _, _ = _serve(passed, tmp_path, {"other-name": {"defenses": [written]}}, caplog)
    assert _served(body)["other-name"]["quality"] == "passed"

    failed = _bundle(quick_bundle, tmp_path / "failed", gated, pipelines={"defensegan-fast": record(0.85)})
    body, _, _ = _serve(failed, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    assert "0.8500 below" in body["unavailable"]["defensegan-fast"]
    # a stale record (its defense rebuilt since) speaks for nothing
    stale = _bundle(quick_bundle, tmp_path / "stale", gated, pipelines={"mine": {**record(0.0), "stale": True}})
    body, _, _ = _serve(stale, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    assert FIX in body["unavailable"]["defensegan-fast"]


def test_a_bundle_that_does_not_enforce_serves_it_saying_so(quick_bundle, tmp_path, gated, caplog) -> None:
    bundle = _bundle(quick_bundle, tmp_path, gated, enforce=False)
    body, warnings, _ = _serve(bundle, tmp_path, {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    assert "defensegan-fast" not in body["unavailable"]
    served = _served(body)
    assert served["defensegan-fast"]["quality"] == "unmeasured"
    assert FIX in served["defensegan-fast"]["quality_warning"]
    [line] = [w for w in warnings if w.startswith("pipeline defensegan-fast ")]
    assert "served unmeasured with its own settings" in line and FIX in line and "\n" not in line
    assert served["defensegan"]["quality"] == "passed" and served["defensegan"]["quality_warning"] is None


def test_the_packaged_pipelines_are_served_as_before(quick_bundle, tmp_path, gated, caplog) -> None:
    """Verdicts without digests (models/default, every bundle gated before them) speak for their
    defense's pipelines as before; digests recorded on another machine (a GPU: RMC's parallel
    images, smoothing's precision) do not refuse the packaged pipelines the same settings build
    here. The packaged `denoised` (n 1000, smaller batches) is not GATED's `smoothing:denoised`
    (certify.predict_n): a fresh gate measures it whole (`quality.pipelines`)."""
    everything = set(_served(_serve(_bundle(quick_bundle, tmp_path / "p", gated, enforce=False), tmp_path, None,
                                     caplog)[0]))
    old = {key: {k: v for k, v in verdict.items() if k != "settings_digest"} for key, verdict in gated.items()}
    body, warnings, digests = _serve(_bundle(quick_bundle, tmp_path / "old", old), tmp_path, None, caplog)
    assert not body["unavailable"] and set(_served(body)) == everything
    assert not [w for w in warnings if "quality gate" in w or "unmeasured" in w], warnings

    packaged = [{"defense": "smoothing", "sigma": 0.25, "denoiser": True, "target_radius": 0.5, "n": 1000,
                 "batch_size": 1000, "forward_batch": 250}]
    denoised = {"denoised": {**_verdict(), "defenses": packaged, "keys": ["smoothing:denoised"],
                             "settings_digest": digests["denoised"]}}
    without = _serve(_bundle(quick_bundle, tmp_path / "new0", gated), tmp_path, None, caplog)[0]
    assert set(without["unavailable"]) == {"denoised"} and FIX in without["unavailable"]["denoised"]
    body, warnings, _ = _serve(_bundle(quick_bundle, tmp_path / "new", gated, pipelines=denoised), tmp_path, None,
                               caplog)
    assert not body["unavailable"] and set(_served(body)) == everything
    assert {p["quality"] for p in body["pipelines"] if p["defenses"]} == {"passed"}
    assert not [w for w in warnings if "quality gate" in w or "unmeasured" in w], warnings

    elsewhere = {key: {**verdict, "settings_digest": "ffff" + verdict["settings_digest"][4:]}
                 for key, verdict in gated.items()}
    body, warnings, _ = _serve(_bundle(quick_bundle, tmp_path / "gpu", elsewhere, pipelines=denoised), tmp_path, None,
                               caplog)
    assert not body["unavailable"] and {p["quality"] for p in body["pipelines"] if p["defenses"]} == {"passed"}
    # ... but other settings on another machine are still other settings
    body, _, _ = _serve(_bundle(quick_bundle, tmp_path / "gpu2", elsewhere), tmp_path,
                        {"defensegan-fast": {"defenses": [FAST]}}, caplog)
    assert FIX in body["unavailable"]["defensegan-fast"]


def test_the_gate_measures_a_config_pipeline_of_one_defense_with_other_settings(quick_bundle, mnist,
                                                                                tmp_path) -> None:
    """`shieldserve train --steps quality --config`: measure records each verdict's digest, and
    measure_pipelines runs the config's Defense-GAN with its own settings whole; the packaged
    `defensegan`, measured as GATED builds it, is not measured again."""
    from models.recipes import quality

    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    options = {"images": 10, "max_accuracy_drop": 0.2}  # the quick preset: recorded, not enforced
    quality.measure(out, manifest, "defensegan", mnist, "quick", options, torch.device("cpu"))
    verdict = manifest["quality"]["defenses"]["defensegan"]
    assert len(verdict["settings_digest"]) == 16 and verdict["pipeline"] == quality.GATED["defensegan"]
    # the packaged `default` (MagNet + smoothing) left out: test_gate_compositions measures it
    manifest["quality"]["defenses"]["magnet"] = {"usable": False, "reason": "left out of this test"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "mine.yaml"
    config.write_text(json.dumps({"pipelines": {"defensegan-fast": {"defenses": [FAST]}}}))
    quality.measure_pipelines(out, manifest, mnist, "quick", options, torch.device("cpu"), config=str(config))
    done = manifest["quality"]["pipelines"]
    assert "defensegan-fast" in done and "defensegan" not in done, sorted(done)
    rec = done["defensegan-fast"]
    assert rec["keys"] == ["defensegan"] and rec["defenses"] == [FAST] and rec["images"] == 10
    assert rec["settings_digest"] != verdict["settings_digest"] and isinstance(rec["passes"], bool)
    (out / "manifest.json").write_text(json.dumps(manifest))
    b = Bundle.load(out)
    assert b.composition([FAST], rec["settings_digest"])["how"] == "measured"
    assert "pipeline defensegan-fast" in quality.table(manifest)
    # the defense rebuilt (its verdict dropped, or measured again): its records are stale until
    # measure_pipelines runs them again
    quality.forget(manifest, "defensegan")
    assert done["defensegan-fast"]["stale"] is True


def test_the_gate_measures_with_the_packaged_settings_alone(monkeypatch, tmp_path) -> None:
    """A SHIELDSERVE_* variable or config set while training is not what the verdict's digest says."""
    from service.runtime import packaged_settings

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"certify": {"predict_n": 7}}))
    monkeypatch.setenv("SHIELDSERVE_CONFIG", str(config))
    monkeypatch.setenv("SHIELDSERVE_CERTIFY__ALPHA", "0.01")
    s = packaged_settings(tmp_path)
    assert s.certify.predict_n == 4000 and s.certify.alpha == 0.001 and s.bundle == tmp_path
    assert "defensegan" in s.pipelines
