"""A defense the quality gate did not pass is never served silently (team rule: never silently
wrong). Served below the gate because the bundle does not enforce it (the quick preset), or
served with no verdict at all (the gate was off): start-up logs one WARNING per such defense,
with its figures and how to enforce the gate, and /pipelines says it for every pipeline."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path



def _bundle_with(quick_bundle: Path, tmp_path: Path, quality: dict | None) -> Path:
    """The quick bundle with the quality section given (None: none, the gate never ran). The
    section is not part of the bundle's hashed version, so the copy still verifies."""
    out = tmp_path / "b"
    shutil.copytree(quick_bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    m.pop("quality", None)
    if quality is not None:
        m["quality"] = quality
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _start(bundle: Path, caplog) -> tuple[dict, list[str]]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        with TestClient(create_app(load_settings(None, bundle=str(bundle), warmup=False))) as client:
            body = client.get("/pipelines").json()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "shieldserve"]
    return body, warnings


PASS = {"usable": True, "passes": True, "reason": "within the bound", "val_accuracy": 1.0,
        "base_val_accuracy": 1.0, "accuracy_drop": 0.0, "images": 100}


def test_a_defense_below_the_gate_not_enforced_is_served_with_a_warning(quick_bundle, tmp_path, caplog) -> None:
    from models.recipes.quality import GATED

    verdicts = {key: dict(PASS) for key in GATED}
    verdicts["neuralfp"] = {"usable": True, "passes": False, "val_accuracy": 0.97, "base_val_accuracy": 1.0,
                            "accuracy_drop": 0.03, "images": 100,
                            "reason": "clean validation accuracy 0.9700 is 0.0300 below; not enforced"}
    bundle = _bundle_with(quick_bundle, tmp_path, {"enforce": False, "max_accuracy_drop": 0.02, "images": 100,
                                                   "defenses": verdicts})
    body, warnings = _start(bundle, caplog)
    below = [w for w in warnings if "below the quality gate" in w]
    assert len(below) == 1, warnings  # one line for the defense, however many pipelines run it
    [line] = below
    assert "\n" not in line and line.startswith("defense neuralfp ")
    for says in ("0.97", "1.0", "100 images", "0.03", "allowed 0.02", "quality.enforce", "--steps quality",
                 f"--out {bundle}"):
        assert says in line, says
    assert not [w for w in warnings if "unmeasured" in w], warnings
    pipes = {p["name"]: p for p in body["pipelines"]}
    assert pipes["neuralfp"]["quality"] == "below_gate_not_enforced"
    assert "defense neuralfp" in pipes["neuralfp"]["quality_warning"]
    # /pipelines answers anyone: the log's command names the bundle's path, the response does not
    assert "--out BUNDLE --dataset DATASET" in pipes["neuralfp"]["quality_warning"]
    assert str(bundle) not in json.dumps(body) and str(tmp_path) not in json.dumps(body)
    assert pipes["magnet"]["quality"] == "passed" and pipes["magnet"]["quality_warning"] is None
    assert pipes["baseline"]["quality"] is None  # no defense for the gate to measure
    # the existing fields are still there
    assert {"default", "model_version", "unavailable", "query_monitor_off", "suspect_linf_off"} <= set(body)
    assert {"name", "description", "certifies", "defenses", "query_monitor"} <= set(pipes["neuralfp"])


def test_every_defense_served_unmeasured_is_named(quick_bundle, tmp_path, caplog) -> None:
    """The gate off ({"quality": {"images": 0}}: no quality section at all): one warning per
    served defense, and every defended pipeline is `unmeasured` on /pipelines."""
    bundle = _bundle_with(quick_bundle, tmp_path, None)
    body, warnings = _start(bundle, caplog)
    unmeasured = [w for w in warnings if "served unmeasured" in w]
    named = {w.split()[1] for w in unmeasured}
    assert len(named) == len(unmeasured)  # one line per defense
    assert {"magnet:reformer", "neuralfp", "rmc", "smoothing", "robust"} <= named
    assert all("without the quality gate" in w and "--steps quality" in w for w in unmeasured)
    for p in body["pipelines"]:
        assert p["quality"] == (None if not p["defenses"] else "unmeasured"), p["name"]


def test_a_bundle_that_passed_the_gate_warns_of_nothing(quick_bundle, tmp_path, caplog) -> None:
    from models.recipes.quality import GATED

    bundle = _bundle_with(quick_bundle, tmp_path, {"enforce": True, "max_accuracy_drop": 0.02, "images": 100,
                                                   "defenses": {key: dict(PASS) for key in GATED}})
    body, warnings = _start(bundle, caplog)
    assert not [w for w in warnings if "quality gate" in w or "unmeasured" in w], warnings
    assert {p["quality"] for p in body["pipelines"] if p["defenses"]} == {"passed"}
