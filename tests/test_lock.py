"""The lock files agree with pyproject.toml: every dependency (the test extras' too) is pinned
to one exact version that its range admits, and no lock pins torch or a CUDA library (torch
is installed first by `make install`). A dependency added to pyproject.toml without
`make lock` fails here, not on a clean machine later."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # a universal lock: another Python or platform's pin
        (spec,) = req.specifier  # exactly one `==` per package
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _requirements(extras: list[str]) -> list[Requirement]:
    """The project's requirements with `extras`, self-references (shieldserve[a,b]) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, optional[extra]):
            if canonicalize_name(r.name) == canonicalize_name(project["name"]):
                todo.extend(r.extras)
            else:
                out.append(r)
    return out


@pytest.mark.parametrize(("lock", "extras"), [("serve.lock", []), ("test.lock", ["test"])])
def test_lock_pins_every_dependency_within_its_range_and_no_torch(lock: str, extras: list[str]) -> None:
    pins = _pins(REPO / "requirements" / lock)
    for name in pins:
        assert not re.match(r"^(torch|triton|nvidia-.*|cuda-.*)$", name), f"{lock} pins {name}"
    missing, outside = [], []
    for req in _requirements(extras):
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker is not None and not req.marker.evaluate()):
            continue
        if name not in pins:
            missing.append(str(req))
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{req} (locked {pins[name]})")
    assert not missing and not outside, f"run `make lock`: {lock} lacks {missing}, pins outside {outside}"


def test_serve_lock_agrees_with_test_lock() -> None:
    serve, test = _pins(REPO / "requirements" / "serve.lock"), _pins(REPO / "requirements" / "test.lock")
    assert {n: v for n, v in serve.items() if test.get(n) != v} == {}


def test_every_faiss_extra_asks_for_the_read_limits_rmc_needs() -> None:
    """RMC refuses a FAISS without deserialization limits (service.defenses.rmc.SAFE_FAISS): an
    extra that allowed one (`gpu` asked for faiss-gpu>=1.8) installed a FAISS the service then
    refused to load an index with."""
    from packaging.version import Version

    from service.defenses.rmc import SAFE_FAISS

    faiss = [r for r in _requirements(["knn", "gpu"]) if r.name.startswith("faiss")]
    assert {r.name for r in faiss} == {"faiss-cpu", "faiss-gpu"}
    for r in faiss:
        floors = [Version(s.version) for s in r.specifier if s.operator in (">=", "==")]
        assert floors and min(floors) >= Version(SAFE_FAISS), r
