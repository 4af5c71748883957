"""`shieldserve export` exports only what the service serves, and never destroys a file by
mistake; the admin RMC reset leaves a trace and says which process it reset."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import png

# --------------------------------------------------------------------------- export


def _bundle_copy(quick_bundle: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    out = tmp_path / "bundle"
    shutil.copytree(quick_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_export_refuses_a_pipeline_the_service_does_not_serve_on_the_bundle(quick_bundle: Path, tmp_path: Path,
                                                                             capsys) -> None:
    """The quality gate marked `robust` unusable: the service leaves the pipeline out (404), and
    export refuses it too (rc 2, one line), writing nothing; the other pipelines still export."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.cli import main
    from service.export import ExportRefused, export, load_info
    from service.settings import load_settings

    reason = "clean validation accuracy 0.5000 is 0.4800 below the base classifier's"

    def mark(manifest: dict) -> None:  # the quality section is not part of the hashed version
        manifest.setdefault("quality", {}).setdefault("defenses", {})["robust"] = {"usable": False, "reason": reason}

    bundle = _bundle_copy(quick_bundle, tmp_path, mark)
    with TestClient(create_app(load_settings(None, bundle=str(bundle), warmup=False))) as client:
        image = [("file", ("0.png", png(torch.rand(1, 28, 28)), "image/png"))]
        r = client.post("/predict?pipeline=robust", files=image)
        assert r.status_code == 404, r.text
        assert "robust" in client.get("/pipelines").json()["unavailable"]

    out = tmp_path / "robust.pt"
    with pytest.raises(ExportRefused, match="not served on this bundle") as refused:
        export(bundle, "robust", out)
    assert reason in str(refused.value) and "robust" in str(refused.value)
    assert not out.exists()
    capsys.readouterr()
    assert main(["export", "--bundle", str(bundle), "--pipeline", "robust", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shieldserve: error: export refused: ") and err.count("\n") == 1 and reason in err
    assert not out.exists() and os.listdir(tmp_path) == ["bundle"]  # no temporary file either

    export(bundle, "baseline", tmp_path / "baseline.pt")  # a served pipeline of the same bundle still exports
    assert load_info(tmp_path / "baseline.pt")["pipeline"] == "baseline"


def test_export_refuses_a_pipeline_whose_section_the_bundle_lacks(quick_bundle: Path, tmp_path: Path) -> None:
    from models.bundle import content_version
    from service.export import ExportRefused, export

    def drop(manifest: dict) -> None:
        manifest["defenses"].pop("robust", None)
        manifest["version"] = content_version(manifest)  # a bundle saved without it, not an edited one

    bundle = _bundle_copy(quick_bundle, tmp_path, drop)
    with pytest.raises(ExportRefused, match="--steps robust"):
        export(bundle, "robust", tmp_path / "robust.pt")
    assert not (tmp_path / "robust.pt").exists()


def test_export_never_replaces_a_file_that_is_not_an_export_unless_forced(quick_bundle: Path, tmp_path: Path,
                                                                          capsys) -> None:
    from service.cli import main
    from service.export import ExportRefused, export, load_info

    precious = tmp_path / "precious.txt"
    precious.write_text("three weeks of notes\n")
    with pytest.raises(ExportRefused, match="exists and is not a shieldserve export"):
        export(quick_bundle, "baseline", precious)
    assert precious.read_text() == "three weeks of notes\n"
    assert main(["export", "--bundle", str(quick_bundle), "--pipeline", "baseline", "--out", str(precious)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shieldserve: error: export refused: ") and err.count("\n") == 1 and "--force" in err
    assert precious.read_text() == "three weeks of notes\n"

    plain = tmp_path / "plain.pt"  # TorchScript, but not one of ours: refused too
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
    before = plain.read_bytes()
    with pytest.raises(ExportRefused, match="not a shieldserve export"):
        export(quick_bundle, "baseline", plain)
    assert plain.read_bytes() == before

    (tmp_path / "adir").mkdir()
    with pytest.raises(ExportRefused, match="is a directory"):
        export(quick_bundle, "baseline", tmp_path / "adir", force=True)

    export(quick_bundle, "baseline", precious, force=True)  # the caller said so
    assert load_info(precious)["pipeline"] == "baseline"
    assert sorted(os.listdir(tmp_path)) == ["adir", "plain.pt", "precious.txt"]  # no temporary file left


def test_a_re_export_replaces_an_earlier_export_atomically(quick_bundle: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """Writing over an earlier export is allowed; a write that fails half-way leaves the old
    file whole and no temporary file behind; the new file appears by a rename, complete."""
    from service.export import export, load_info

    out = tmp_path / "model.pt"
    export(quick_bundle, "baseline", out)
    assert load_info(out)["pipeline"] == "baseline"
    old = out.read_bytes()
    inode = out.stat().st_ino

    real_save = torch.jit.save

    def dies_half_way(module, f, _extra_files=None):  # noqa: ANN001, ANN202
        real_save(module, f, _extra_files=_extra_files)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        export(quick_bundle, "robust", out)
    assert out.read_bytes() == old and os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.setattr(torch.jit, "save", real_save)

    export(quick_bundle, "robust", out)  # a re-export: the earlier file is one of ours
    info = load_info(out)
    assert info["pipeline"] == "robust" and info["exact"] is True
    assert out.stat().st_ino != inode  # renamed over it, not rewritten in place
    assert os.listdir(tmp_path) == ["model.pt"]
    model = torch.jit.load(str(out))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# --------------------------------------------------------------------------- admin RMC reset

KEY = "test-admin-key-9c1e"
ONLINE = {"rmc-online": {"defenses": [{"defense": "rmc", "mode": "online", "snapshot_every": 1}]}}


def _resets(caplog) -> list[logging.LogRecord]:  # noqa: ANN001
    return [r for r in caplog.records if r.name == "shieldserve" and r.getMessage().startswith("admin: rmc reset")]


def test_an_rmc_reset_is_logged_with_who_and_what_and_never_the_key(make_client, mnist, caplog) -> None:
    pytest.importorskip("faiss")
    from service.logs import JsonFormatter

    client_key = "alice-client-key-123"
    client = make_client(pipelines=ONLINE, admin_api_key=KEY, warmup=False,
                         api_keys={"alice": hashlib.sha256(client_key.encode()).hexdigest()})
    x = mnist.test.x[:2]
    r = client.post("/predict?pipeline=rmc-online", headers={"Authorization": f"Bearer {client_key}"},
                    files=[("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(len(x))])
    assert r.status_code == 200, r.text

    url = "/admin/rmc/reset?pipeline=rmc-online"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert client.post(url).status_code == 401
        assert client.post(url, headers={"X-API-Key": KEY + "x"}).status_code == 403
        assert client.post("/admin/rmc/reset?pipeline=baseline", headers={"X-API-Key": KEY}).status_code == 422
        assert not _resets(caplog)  # nothing was reset: nothing to log
        snap = client.post(url + "&to=snapshot", headers={"X-API-Key": KEY, "X-Forwarded-For": "203.0.113.9"})
        full = client.post(url, headers={"X-API-Key": KEY})
    assert snap.status_code == 200 and full.status_code == 200, (snap.text, full.text)
    records = _resets(caplog)
    assert len(records) == 2 and all(rec.levelno == logging.WARNING for rec in records)
    s, f = snap.json(), full.json()
    assert s["restored"] == "snapshot@2" and f["restored"] == "bundle"
    lines = [rec.getMessage() for rec in records]
    assert lines[0] == (f"admin: rmc reset pipeline=rmc-online to=snapshot restored=snapshot@2 "
                        f"discarded={s['discarded_images']} mode=online process={os.getpid()} client=ip:testclient")
    # X-Forwarded-For from a peer that is not a trusted proxy names no one
    assert lines[1] == (f"admin: rmc reset pipeline=rmc-online to=bundle restored=bundle discarded=2 "
                        f"mode=online process={os.getpid()} client=ip:testclient")
    fmt = JsonFormatter()
    for text in [fmt.format(rec) for rec in caplog.records] + lines:
        assert KEY not in text and client_key not in text


def test_the_reset_says_it_reached_this_process_only(make_client, caplog) -> None:
    """The stream lives in one process: the response names it (its pid), says the scope, and
    how many worker processes this instance runs, keeping the fields it had."""
    pytest.importorskip("faiss")
    client = make_client(pipelines=ONLINE, admin_api_key=KEY, warmup=False, workers=3)
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        r = client.post("/admin/rmc/reset?pipeline=rmc-online", headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"pipeline": "rmc-online", "mode": "online", "restored": "bundle", "discarded_images": 0,
                    "scope": "process", "process": os.getpid(), "workers": 3}
    schema = client.get("/openapi.json").json()["components"]["schemas"]["RmcResetResponse"]
    fields = {"pipeline", "mode", "restored", "discarded_images", "scope", "process", "workers"}
    assert fields <= set(schema["properties"])
    [line] = [rec.getMessage() for rec in _resets(caplog)]
    assert f"process={os.getpid()}" in line and "discarded=0" in line
