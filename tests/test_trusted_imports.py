"""A bundle whose network is built by Python code (an `import` architecture) runs that code when
it is loaded: it is refused unless the operator trusts the module (`trusted_imports`, `train
--trust-import`), and refused before the code is imported at all.

Each test writes its own module under tmp_path, with a name no other test uses, which leaves a
marker file when it is imported and another when its factory runs: the refusal is shown by
the markers' absence, not by the error alone.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from models.architectures import import_trusted
from models.bundle import Bundle, BundleError, BundleWriter, InputSpec, UntrustedImport


@pytest.mark.parametrize("factory,trusted,ok", [
    ("mynet:build", [], False),
    ("mynet:build", ["mynet"], True),
    ("mynet.sub.deep:build", ["mynet"], True),          # a package covers its modules
    ("mynetwork:build", ["mynet"], False),              # a prefix of the name is not the package
    ("mynet:build", ["mynet.sub"], False),
    ("mynet:build", ["mynet:build"], True),             # one factory
    ("mynet:other", ["mynet:build"], False),
    ("mynet:build.inner", ["mynet:build"], False),
    ("subprocess:run", ["mynet", " ", ""], False),
    ("os:system", ["o"], False),
    ("mynet:build", [" mynet "], True),
])
def test_what_an_entry_trusts(factory: str, trusted: list[str], ok: bool) -> None:
    assert import_trusted(factory, trusted) is ok


@pytest.fixture
def code_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, Path]:
    """(bundle dir, module name, marker dir): a bundle whose classifier is `module:net`."""
    module = f"shieldserve_test_net_{uuid.uuid4().hex[:12]}"
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / f"{module}.py").write_text(
        "from pathlib import Path\n"
        "import torch\n"
        f"Path({str(markers)!r}, 'imported').touch()\n"
        "def net():\n"
        f"    Path({str(markers)!r}, 'called').touch()\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "bundle"
    w = BundleWriter(out)
    w.set_input(InputSpec(shape=(1, 2, 2), class_names=("a", "b")))
    torch.manual_seed(0)
    w.add_module("classifier", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
                 {"kind": "import", "factory": f"{module}:net", "kwargs": {}})
    w.save()
    yield out, module, markers
    sys.modules.pop(module, None)


def test_an_untrusted_import_is_refused_before_its_code_runs(code_bundle) -> None:
    out, module, markers = code_bundle
    for trusted in ([], ["shieldserve_test_net"], [module + "x"], [f"{module}:other"]):
        with pytest.raises(UntrustedImport) as e:
            Bundle.load(out, trusted_imports=trusted)
        assert isinstance(e.value, BundleError)  # the CLI's one-line error for a bundle's fault
        message = str(e.value)
        assert f"'classifier' by '{module}:net'" in message
        assert f"trusted_imports: [{module}]" in message and f"--trust-import {module}" in message
    assert not (markers / "imported").exists() and module not in sys.modules  # never imported
    assert not (markers / "called").exists()


@pytest.mark.parametrize("entry", ["module", "factory"])
def test_a_trusted_import_loads_and_answers(code_bundle, entry: str) -> None:
    out, module, markers = code_bundle
    b = Bundle.load(out, trusted_imports=[module if entry == "module" else f"{module}:net"])
    assert b.trusted_imports
    logits = b.classifier()(torch.rand(3, 1, 2, 2))
    assert logits.shape == (3, 2)
    assert (markers / "imported").exists() and (markers / "called").exists()


def test_the_service_refuses_to_start_on_it_and_starts_where_trusted(code_bundle, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    out, module, markers = code_bundle
    with pytest.raises(UntrustedImport), TestClient(create_app(load_settings(None, bundle=str(out), warmup=False))):
        pass
    assert not (markers / "imported").exists()
    # the setting from the environment, as an operator sets it for `serve` (and Ray's replicas)
    monkeypatch.setenv("SHIELDSERVE_TRUSTED_IMPORTS", json.dumps([module]))
    settings = load_settings(None, bundle=str(out), warmup=False)
    assert settings.trusted_imports == [module]
    with TestClient(create_app(settings)) as client:
        from service.imaging import encode_png

        png = encode_png(torch.rand(1, 2, 2))
        r = client.post("/predict?pipeline=baseline", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["class_name"] in ("a", "b")


def test_the_cli_names_the_setting_in_one_line(code_bundle, tmp_path: Path, capsys) -> None:
    from service.cli import main

    out, module, markers = code_bundle
    code = main(["export", "--bundle", str(out), "--pipeline", "baseline", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("shieldserve: error:") and err.count("\n") == 1
    assert f"trusted_imports: [{module}]" in err
    assert not (markers / "imported").exists() and not (tmp_path / "m.pt").exists()


def test_train_extending_it_needs_trust_import_and_says_so_before_loading_data(code_bundle, capsys,
                                                                              monkeypatch) -> None:
    import models.train
    from service.cli import main

    out, module, markers = code_bundle
    monkeypatch.setattr(models.train, "load_dataset", lambda spec: pytest.fail("data loaded before the refusal"))
    before = (out / "manifest.json").read_bytes()
    code = main(["train", "--out", str(out), "--steps", "squeeze"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--trust-import {module}" in err
    assert (out / "manifest.json").read_bytes() == before
    assert not (markers / "imported").exists()


def test_train_reads_trusted_imports_from_its_config(code_bundle, capsys, monkeypatch, tmp_path: Path) -> None:
    """`train --config FILE` (the service YAML the bundle will be served with) trusts what that
    file's `trusted_imports` names, as `serve --config FILE` does: it was read only from
    SHIELDSERVE_CONFIG, and the refusal told the user to put it where it already was."""
    import models.train
    from service.cli import main

    out, module, markers = code_bundle
    monkeypatch.delenv("SHIELDSERVE_CONFIG", raising=False)
    config = tmp_path / "serve.yaml"
    config.write_text(f"trusted_imports: [{module}]\n")

    class Loaded(Exception):
        pass

    def load_dataset(spec: str) -> None:
        raise Loaded(spec)  # past the trust check: the build goes on to its data

    monkeypatch.setattr(models.train, "load_dataset", load_dataset)
    with pytest.raises(Loaded):
        main(["train", "--out", str(out), "--steps", "squeeze", "--config", str(config)])
    assert "--trust-import" not in capsys.readouterr().err


@pytest.mark.parametrize("attr,why", [
    ("torch.os.system", "one public name"),       # an attribute path out of the module
    ("_private", "one public name"),
    ("Path", "defined in 'pathlib'"),             # imported into the trusted module, not its own
    ("system", "defined in 'posix'"),
])
def test_a_trusted_module_lends_only_its_own_public_names(tmp_path: Path, monkeypatch, attr: str,
                                                          why: str) -> None:
    """Trusting a module for its networks is not trusting everything it imports: a bundle
    naming `mod:torch.os.system` (a getattr path) or `mod:system` (os' own, imported into mod)
    is refused, before the call, whatever the kwargs."""
    module = f"shieldserve_test_lend_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(
        "import torch\nfrom os import system\nfrom pathlib import Path\n_private = print\n"
        "def net():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "ran"
    out = tmp_path / "bundle"
    w = BundleWriter(out)
    w.set_input(InputSpec(shape=(1, 2, 2), class_names=("a", "b")))
    w.add_tensors("classifier", {"w": torch.zeros(1)},
                  architecture={"kind": "import", "factory": f"{module}:{attr}",
                                "kwargs": {"command": f"touch {marker}"} if attr.endswith("system") else {}})
    w.save()
    try:
        b = Bundle.load(out, trusted_imports=[module])  # the module is trusted, its imports are not
        with pytest.raises(BundleError, match=why):
            b.classifier()
        assert not marker.exists()
        # named exactly, the operator's word covers it (and the call then fails on its own terms)
        if attr == "Path":
            with pytest.raises(BundleError):
                Bundle.load(out, trusted_imports=[f"{module}:{attr}"]).classifier()
    finally:
        sys.modules.pop(module, None)
