"""The quality gate speaks for what is served (team rule: never silently wrong): a smoothing
pipeline at a noise level the gate did not measure gets no other sigma's verdict, and a
pipeline composing two trained defenses is judged as a whole: measured by the gate, else
bounded from its parts' verdicts where that is sound, else not served where the gate is
enforced (models.bundle.Bundle.composition, models.recipes.quality.measure_pipelines)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import Bundle, defense_key, defense_name

MAGNET = {"defense": "magnet", "reform": False}
SMOOTH = {"defense": "smoothing", "sigma": 0.5, "target_radius": 0.5}


def _verdict(drop: float, base: float = 1.0, rejected: float | None = None) -> dict:
    return {"usable": True, "passes": drop <= 0.02, "val_accuracy": round(base - drop, 4), "base_val_accuracy": base,
            "accuracy_drop": drop, "rejection_rate": drop if rejected is None else rejected, "images": 300,
            "reason": "measured"}


def _bundle(quick_bundle: Path, tmp_path: Path, defenses: dict, enforce: bool = True,
            pipelines: dict | None = None) -> Path:
    """The quick bundle with a quality section of these verdicts (every other gated key passes).
    The section is not part of the bundle's hashed version, so the copy still verifies."""
    from models.recipes.quality import GATED

    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    verdicts = {key: _verdict(0.0) for key in GATED}
    verdicts.update(defenses)
    m["quality"] = {"enforce": enforce, "max_accuracy_drop": 0.02, "images": 300, "defenses": verdicts}
    if pipelines is not None:
        m["quality"]["pipelines"] = pipelines
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _serve(bundle: Path, tmp_path: Path, pipelines: dict, caplog) -> tuple[dict, list[str]]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"default_pipeline": "baseline", "pipelines": pipelines}))  # JSON is YAML
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        with TestClient(create_app(load_settings(str(config), bundle=str(bundle), warmup=False))) as client:
            body = client.get("/pipelines").json()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "shieldserve"]
    return body, warnings


def test_each_smoothing_sigma_is_a_key_of_its_own() -> None:
    # the packaged configuration's: their verdicts keep their keys
    assert defense_key(SMOOTH) == "smoothing"
    assert defense_key({"defense": "smoothing", "sigma": 0.25, "denoiser": True}) == "smoothing:denoised"
    # any other sigma, the build's default (0.25) included, is not measured by those
    assert defense_key({"defense": "smoothing"}) == "smoothing@0.25"
    assert defense_key({"defense": "smoothing", "sigma": 1}) == "smoothing@1"
    assert defense_key({"defense": "smoothing", "sigma": 0.5, "denoiser": True}) == "smoothing:denoised@0.5"
    assert defense_key({"defense": "smoothing", "sigma": "0.5"}) == "smoothing"
    assert defense_key({"defense": "smoothing", "sigma": 0.1234567}) == "smoothing@0.1234567"  # not rounded
    assert defense_name("smoothing:denoised@0.5") == defense_name("smoothing@1") == "smoothing"
    assert defense_key("magnet") == "magnet:reformer" and defense_key(MAGNET) == "magnet"


def test_the_gate_measures_every_sigma_the_bundle_has() -> None:
    from models.recipes.quality import gated, step_keys

    manifest = {"defenses": {"smoothing": {"classifiers": {"0.25": {}, "0.5": {}}, "denoisers": {"0.25": {}, "0.5": {}}}}}
    keys = step_keys("smoothing", manifest)
    assert sorted(keys) == ["smoothing", "smoothing:denoised", "smoothing:denoised@0.5", "smoothing@0.25"]
    for key in keys:  # each measured as the pipeline its key stands for
        [entry] = gated(key)
        assert defense_key(entry) == key
    assert step_keys("magnet", manifest) == ["magnet", "magnet:reformer"]


def test_a_sigma_the_gate_did_not_measure_is_not_served(quick_bundle, tmp_path, caplog) -> None:
    """Before, `{defense: smoothing}` (sigma 0.25) was served on the verdict measured at 0.5."""
    bundle = _bundle(quick_bundle, tmp_path, {})
    body, _ = _serve(bundle, tmp_path, {"baseline": {"defenses": []}, "low": {"defenses": [{"defense": "smoothing"}]},
                                        "served": {"defenses": [SMOOTH]}}, caplog)
    assert "smoothing@0.25" in body["unavailable"]["low"] and "--steps quality" in body["unavailable"]["low"]
    assert "served" not in body["unavailable"]


def test_a_composition_within_its_parts_bound_is_served(quick_bundle, tmp_path, caplog) -> None:
    # MagNet rejects 0.7% alone; smoothing alone drops 0.7%: together at most 1.4%
    bundle = _bundle(quick_bundle, tmp_path, {"magnet": _verdict(0.007), "smoothing": _verdict(0.007, rejected=0.0)})
    verdict = Bundle.load(bundle).composition([MAGNET, SMOOTH])
    assert verdict["how"] == "bound" and verdict["passes"] is True and verdict["accuracy_drop_bound"] == 0.014
    body, warnings = _serve(bundle, tmp_path, {"baseline": {"defenses": []}, "both": {"defenses": [MAGNET, SMOOTH]}},
                            caplog)
    pipes = {p["name"]: p for p in body["pipelines"]}
    assert pipes["both"]["quality"] == "passed" and not warnings
    # the bound counts what a detector rejects, not the base classifier's errors its verdict includes:
    # a base classifier 90% right does not make every composition fail
    weak = _bundle(quick_bundle, tmp_path / "weak", {"magnet": _verdict(0.005, base=0.9, rejected=0.005),
                                                     "squeeze": _verdict(0.004, base=0.9, rejected=0.004),
                                                     "smoothing": _verdict(0.01, base=0.9, rejected=0.0)})
    verdict = Bundle.load(weak).composition(["squeeze", MAGNET, SMOOTH])
    assert verdict["passes"] is True and verdict["accuracy_drop_bound"] == pytest.approx(0.019)


def test_two_parts_that_pass_alone_but_not_together_are_refused(quick_bundle, tmp_path, caplog) -> None:
    # each within 0.02; together at most 0.015 rejected + 0.015 dropped: not shown to be within
    bundle = _bundle(quick_bundle, tmp_path, {"magnet": _verdict(0.015), "smoothing": _verdict(0.015, rejected=0.0)})
    verdict = Bundle.load(bundle).composition([MAGNET, SMOOTH])
    assert verdict["passes"] is False and verdict["usable"] is False
    assert verdict["accuracy_drop_bound"] == pytest.approx(0.03)
    body, _ = _serve(bundle, tmp_path, {"baseline": {"defenses": []}, "both": {"defenses": [MAGNET, SMOOTH]},
                                        "alone": {"defenses": [SMOOTH]}}, caplog)
    why = body["unavailable"]["both"]
    assert "magnet + smoothing" in why and "0.0300" in why and "--config" in why
    assert "alone" not in body["unavailable"]
    # measured whole by the gate, the measurement decides: a record written before digests is
    # matched by its defense list
    measured = {"both": {**_verdict(0.01), "defenses": [MAGNET, SMOOTH], "keys": ["magnet", "smoothing"]}}
    parts = {"magnet": _verdict(0.015), "smoothing": _verdict(0.015, rejected=0.0)}
    bundle2 = _bundle(quick_bundle, tmp_path / "2", parts, pipelines=measured)
    body, _ = _serve(bundle2, tmp_path, {"baseline": {"defenses": []}, "mine": {"defenses": [MAGNET, SMOOTH]}}, caplog)
    assert "mine" not in body["unavailable"]
    assert {p["name"]: p for p in body["pipelines"]}["mine"]["quality"] == "passed"


def test_a_measured_record_matches_the_built_pipeline_however_the_config_writes_it(quick_bundle, tmp_path,
                                                                                   caplog) -> None:
    """Records carry the built pipeline's settings_digest: a config that leaves a default out
    (target_radius 0.5) or writes 0.5 as "0.5" is the same pipeline; another budget is not."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    probe = _bundle(quick_bundle, tmp_path / "probe", {})
    with TestClient(create_app(load_settings(None, bundle=str(probe), warmup=False))) as client:
        digest = client.app.state.runtime.pipelines["default"].settings_digest
    parts = {"magnet": _verdict(0.015), "smoothing": _verdict(0.015, rejected=0.0)}  # the bound fails
    measured = {"default": {**_verdict(0.01), "defenses": [MAGNET, SMOOTH], "keys": ["magnet", "smoothing"],
                            "settings_digest": digest}}
    bundle = _bundle(quick_bundle, tmp_path, parts, pipelines=measured)
    body, _ = _serve(bundle, tmp_path, {
        "baseline": {"defenses": []},
        "same": {"defenses": [{"reform": False, "defense": "magnet"}, {"defense": "smoothing", "sigma": "0.5"}]},
        "other": {"defenses": [MAGNET, {**SMOOTH, "n": 100}]}}, caplog)
    assert "same" not in body["unavailable"]
    assert "0.0300" in body["unavailable"]["other"]  # not the record: its parts' bound, which fails


def test_a_composition_that_does_not_build_fails_start_up_not_the_gate(quick_bundle, tmp_path) -> None:
    from service.app import create_app
    from service.pipeline import PipelineConfigError
    from service.settings import load_settings

    bundle = _bundle(quick_bundle, tmp_path, {})
    with pytest.raises(PipelineConfigError, match="order"):
        create_app(load_settings(None, bundle=str(bundle), warmup=False,
                                 pipelines={"wrong": {"defenses": ["robust", "squeeze"]}}))


def test_a_composition_measured_below_the_gate_is_refused_however_its_parts_did(quick_bundle, tmp_path, caplog) -> None:
    measured = {"default": {**_verdict(0.05), "passes": False, "usable": False,
                            "reason": "clean validation accuracy 0.9500 is 0.0500 below", "defenses": [MAGNET, SMOOTH],
                            "keys": ["magnet", "smoothing"]}}
    bundle = _bundle(quick_bundle, tmp_path, {}, pipelines=measured)
    body, _ = _serve(bundle, tmp_path, {"baseline": {"defenses": []}, "both": {"defenses": [MAGNET, SMOOTH]}}, caplog)
    assert "0.0500 below" in body["unavailable"]["both"]


def test_a_part_that_changes_the_image_bounds_nothing(quick_bundle, tmp_path, caplog) -> None:
    """MagNet's reformer before RMC: RMC's verdict was on clean images, not reformed ones (a
    reformer before smoothing is refused at start-up: the certificate would be about the
    reformed image). Enforced: not served until measured; not enforced: served, saying so."""
    reformed = [{"defense": "magnet", "reform": True}, {"defense": "rmc"}]
    bundle = _bundle(quick_bundle, tmp_path, {})
    body, _ = _serve(bundle, tmp_path, {"baseline": {"defenses": []}, "reformed": {"defenses": reformed}}, caplog)
    assert "not measured the composition magnet:reformer + rmc" in body["unavailable"]["reformed"]
    loose = _bundle(quick_bundle, tmp_path / "loose", {}, enforce=False)
    body, warnings = _serve(loose, tmp_path, {"baseline": {"defenses": []}, "reformed": {"defenses": reformed}}, caplog)
    pipes = {p["name"]: p for p in body["pipelines"]}
    assert pipes["reformed"]["quality"] == "unmeasured"
    [line] = [w for w in warnings if w.startswith("pipeline reformed ")]
    assert "as a whole" in line and "\n" not in line


def test_the_gate_measures_the_served_compositions(quick_bundle, mnist, tmp_path) -> None:
    """measure_pipelines runs the packaged `default` (MagNet detection + smoothing) as a whole,
    and a config's own composition; measuring a step again drops the records that used it."""
    from models.recipes import quality

    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    config = tmp_path / "mine.yaml"
    config.write_text(json.dumps({"pipelines": {"mine": {"defenses": ["squeeze", MAGNET]}}}))
    options = {"images": 20, "max_accuracy_drop": 0.1}
    quality.measure_pipelines(out, manifest, mnist, "quick", options, torch.device("cpu"), config=str(config))
    done = manifest["quality"]["pipelines"]
    assert set(done) == {"default", "mine"}, done
    assert done["default"]["keys"] == ["magnet", "smoothing"] and done["default"]["images"] == 20
    assert done["mine"]["defenses"] == ["squeeze", MAGNET]
    for rec in done.values():
        assert 0.0 <= rec["val_accuracy"] <= 1.0 and isinstance(rec["passes"], bool) and rec["reason"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert Bundle.load(out).composition(["squeeze", MAGNET])["how"] == "measured"
    assert all(len(rec["settings_digest"]) == 16 for rec in done.values())
    # measuring squeeze again marks the record that measured the old squeeze (`mine`) stale, not
    # `default`'s; a stale record speaks for nothing, and the next run measures it again, with
    # or without the config that gave it
    quality.measure(out, manifest, "squeeze", mnist, "quick", options, torch.device("cpu"))
    assert done["mine"]["stale"] is True and "stale" not in done["default"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert (Bundle.load(out).composition(["squeeze", MAGNET]) or {}).get("how") != "measured"
    quality.measure_pipelines(out, manifest, mnist, "quick", options, torch.device("cpu"))
    assert set(done) == {"default", "mine"} and "stale" not in done["mine"]
    assert "pipeline default" in quality.table(manifest)


def test_a_config_pipeline_that_does_not_build_is_not_recorded(quick_bundle, mnist, tmp_path, caplog) -> None:
    from models.recipes import quality

    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"pipelines": {"bad": {"defenses": [MAGNET, {**SMOOTH, "bogus": 1}]}}}))
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        broken = quality.measure_pipelines(out, manifest, mnist, "quick", {"images": 20, "max_accuracy_drop": 0.1},
                                           torch.device("cpu"), config=str(config))
    assert "bad" not in manifest["quality"]["pipelines"] and "default" in manifest["quality"]["pipelines"]
    assert any("pipeline bad does not build" in r.getMessage() for r in caplog.records)
    [line] = broken
    assert line.startswith("pipeline 'bad' does not build") and "bogus" in line
    # a stale record of a pipeline no config serves now, which no longer builds: dropped, no failure
    manifest["quality"]["pipelines"]["gone"] = {"stale": True, "defenses": [MAGNET, {**SMOOTH, "bogus": 1}],
                                                "keys": ["magnet", "smoothing"]}
    assert quality.measure_pipelines(out, manifest, mnist, "quick", {"images": 20, "max_accuracy_drop": 0.1},
                                     torch.device("cpu")) == []
    assert "gone" not in manifest["quality"]["pipelines"]


def test_train_with_a_config_serve_would_refuse_fails_after_saving_the_bundle(quick_bundle, tmp_path) -> None:
    """`train --config` exited 0 on a config whose pipeline does not build (a typo'd option), and
    `serve --config` then refused to start: the build now fails, naming it, the bundle saved."""
    from models.train import build_bundle

    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    config = tmp_path / "typo.yaml"
    config.write_text(json.dumps({"pipelines": {"guarded": {"defenses": ["squeeze", {**SMOOTH, "sigmaa": 0.25}]}}}))
    with pytest.raises(ValueError, match=r"pipeline 'guarded' does not build.*sigmaa.*--steps quality --config"):
        build_bundle(out, steps=["squeeze"], config=str(config),
                     options={"quality": {"images": 20, "max_accuracy_drop": 0.1}})
    assert "squeeze" in Bundle.load(out).manifest["quality"]["defenses"]  # saved, with its verdicts


def test_train_refuses_a_config_that_does_not_load_before_training(tmp_path) -> None:
    from models.train import build_bundle

    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines: [1, 2")
    with pytest.raises(Exception) as info:
        build_bundle(tmp_path / "never", preset="quick", config=str(bad))
    assert not (tmp_path / "never" / "manifest.json").exists(), info.value


def test_certify_refuses_a_sigma_the_gate_found_unusable(quick_bundle, mnist, tmp_path, caplog) -> None:
    """/certify's sigma= picks a network of the pipeline's: one the gate refused is not served there."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings
    from tests.conftest import png

    bad = {**_verdict(0.0233), "passes": False, "usable": False,
           "reason": "clean validation accuracy 0.9767 is 0.0233 below the base classifier's 1.0000"}
    bundle = _bundle(quick_bundle, tmp_path, {"smoothing:denoised@0.5": bad, "smoothing@0.25": _verdict(0.0)})
    body = png(mnist.test.x[0])
    with TestClient(create_app(load_settings(None, bundle=str(bundle), warmup=False))) as client:
        r = client.post("/certify?pipeline=denoised&sigma=0.5&n=20&n0=5", content=body,
                        headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", r.text
        assert "sigma=0.5 is not served on pipeline 'denoised'" in r.json()["error"]["message"]
        assert "0.0233 below" in r.json()["error"]["message"]
        r = client.post("/certify?pipeline=denoised&sigma=0.3&n=20&n0=5", content=body,
                        headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["message"].endswith("choose from [0.25]"), r.text
        for pipeline, sigma in (("denoised", 0.25), ("smoothing", 0.25), ("smoothing", 0.5)):
            r = client.post(f"/certify?pipeline={pipeline}&sigma={sigma}&n=20&n0=5", content=body,
                            headers={"Content-Type": "image/png"})
            assert r.status_code == 200, (pipeline, sigma, r.text)


def test_certify_judges_the_whole_pipeline_at_the_sigma_asked(quick_bundle, mnist, tmp_path) -> None:
    """/certify?sigma= on a composition runs all of it at that sigma: MagNet's 1.5% rejected with
    smoothing@0.25's 1% dropped is past the 2 points allowed, though each passes alone."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings
    from tests.conftest import png

    bundle = _bundle(quick_bundle, tmp_path, {"magnet": _verdict(0.015), "smoothing": _verdict(0.0),
                                              "smoothing@0.25": _verdict(0.01, rejected=0.0)})
    body = png(mnist.test.x[0])
    with TestClient(create_app(load_settings(None, bundle=str(bundle), warmup=False))) as client:
        assert "default" not in client.get("/pipelines").json()["unavailable"]
        r = client.post("/certify?pipeline=default&sigma=0.25&n=20&n0=5", content=body,
                        headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and "magnet + smoothing@0.25" in r.json()["error"]["message"], r.text
        for pipeline, sigma in (("default", 0.5), ("smoothing", 0.25)):
            r = client.post(f"/certify?pipeline={pipeline}&sigma={sigma}&n=20&n0=5", content=body,
                            headers={"Content-Type": "image/png"})
            assert r.status_code == 200, (pipeline, sigma, r.text)


def test_evaluate_and_export_leave_out_a_composition_the_service_does_not_serve(quick_bundle, tmp_path) -> None:
    """`shieldserve evaluate` (its default list) and `shieldserve export` follow the service's
    decision on a composition, not only on its parts (they evaluated and exported one the gate
    measured unusable whole)."""
    from service.evaluation.harness import EvalConfig, Evaluation
    from service.export import ExportRefused, export

    both = [MAGNET, {"defense": "robust"}]
    measured = {"guarded": {**_verdict(0.05), "passes": False, "usable": False,
                            "reason": "clean validation accuracy 0.9500 is 0.0500 below", "defenses": both,
                            "keys": ["magnet", "robust"]}}
    bundle = _bundle(quick_bundle, tmp_path, {}, pipelines=measured)
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"pipelines": {"guarded": {"defenses": both}}}))
    ev = Evaluation(EvalConfig(bundle=str(bundle), config=str(config), limit=2))
    assert "guarded" not in ev.pipes and "robust" in ev.pipes
    with pytest.raises(ExportRefused, match="0.0500 below"):
        export(str(bundle), "guarded", tmp_path / "guarded.pt", str(config))
    export(str(bundle), "robust", tmp_path / "robust.pt", str(config))
    assert (tmp_path / "robust.pt").stat().st_size > 0


def test_dataset_paths_are_recorded_absolute(tmp_path, monkeypatch) -> None:
    from models.train import absolute_dataset

    monkeypatch.chdir(tmp_path)
    assert absolute_dataset("npz:digits.npz") == f"npz:{tmp_path / 'digits.npz'}"
    assert absolute_dataset("idx:data/mnist") == f"idx:{tmp_path / 'data' / 'mnist'}"
    assert absolute_dataset("npz:/abs/d.npz") == "npz:/abs/d.npz" and absolute_dataset("mnist5k") == "mnist5k"


def test_a_failed_base_check_is_a_warning_at_start_up_in_pipelines_and_in_the_table(quick_bundle, tmp_path, caplog) -> None:
    """The quick preset records the base classifier's check without enforcing it: it was only
    in the manifest, and every pipeline read `passed`."""
    from models.recipes.quality import table

    bundle = _bundle(quick_bundle, tmp_path, {}, enforce=False)
    m = json.loads((bundle / "manifest.json").read_text())
    m["quality"]["base"] = {"val_accuracy": 0.0, "images": 100,
                            "reason": "the base classifier's clean validation accuracy is 0.0000 on 100 images"}
    (bundle / "manifest.json").write_text(json.dumps(m))
    body, warnings = _serve(bundle, tmp_path, {"baseline": {"defenses": []}}, caplog)
    assert any(w.startswith("the quality gate's check of the base classifier failed") for w in warnings)
    # /pipelines says so too: the pipeline serves that classifier (it read `passed` or null before)
    [p] = [p for p in body["pipelines"] if p["name"] == "baseline"]
    assert p["quality"] == "below_gate_not_enforced"
    assert "check of the base classifier failed" in p["quality_warning"] and "0.0000 on 100 images" in p["quality_warning"]
    assert "BASE CLASSIFIER: the base classifier's clean validation accuracy is 0.0000" in table(m)
    assert "marked (not enforced: served anyway)" in table(m)
