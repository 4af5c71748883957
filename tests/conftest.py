"""Shared fixtures: the real mnist5k digits, a quick bundle trained in seconds, app clients."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SHIELDSERVE_PROGRESS", "0")
# The same thread count on every machine, whatever its cores: what the tests train (the quick
# bundle, per-test networks) then runs the same reductions on a 2-core laptop and a 64-core
# server. Apps built here leave it alone (only the server's entry point sets threads); the
# servers tests start as subprocesses take the same count (tests/test_server.py checks auto).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("SHIELDSERVE_TORCH_THREADS", str(torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _session_torch_threads() -> Iterator[None]:
    """Every test starts at the session's thread count: one that changes it (an in-process
    evaluation's `threads`, a recipe's one-thread section) must not change what a later test
    trains (test_bundle's rebuild compares metrics with the session's quick bundle)."""
    torch.set_num_threads(SESSION_THREADS)
    yield

DEFAULT_BUNDLE = REPO / "models" / "default"


@pytest.fixture(scope="session")
def mnist():
    from models.datasets import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete bundle (every step) built with the `quick` preset, once per test session.
    SHIELDSERVE_TEST_QUICK_BUNDLE names one built earlier (`shieldserve train --preset quick`),
    to iterate on a few tests without rebuilding it each run."""
    from models.train import build_bundle

    prebuilt = os.environ.get("SHIELDSERVE_TEST_QUICK_BUNDLE")
    if prebuilt:
        return Path(prebuilt)

    out = tmp_path_factory.mktemp("bundle") / "quick"
    # session fixtures are set up before the autouse thread reset of the test that first asks for
    # it: trained at the session's thread count, whichever test that is
    torch.set_num_threads(SESSION_THREADS)
    build_bundle(out, preset="quick", seed=0, argv=["--out", str(out), "--preset", "quick"])
    return out


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    if not (DEFAULT_BUNDLE / "manifest.json").exists():
        pytest.skip("models/default is not built")
    return DEFAULT_BUNDLE


@pytest.fixture
def make_client(quick_bundle: Path) -> Iterator[Callable[..., object]]:
    """make_client(**settings_overrides) -> a started TestClient; closed after the test."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        overrides.setdefault("bundle", quick_bundle)
        client = TestClient(create_app(load_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct free ports on 127.0.0.1 for servers a test starts, from below the kernel's
    ephemeral range where it leaves room (20,000 up to it), so that no socket the kernel
    numbers itself (Ray starts a dozen before its HTTP proxy binds) can take one between the
    choice and the bind; each is checked free, and all are held until all are chosen (ports
    picked one at a time with bind(0) and released could repeat)."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    held: list[socket.socket] = []
    try:
        candidates = random.sample(range(20_000, low), min(low - 20_000, 200)) if low > 20_100 else []
        for port in candidates:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                break
        while len(held) < n:  # no room below the ephemeral range: the kernel's choice, held
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def defense_env(path: str | Path):
    """A DefenseEnv on a bundle directory (CPU), as the runtime builds one, for tests that
    construct defense components directly."""
    from models.bundle import Bundle
    from service.defenses.base import DefenseEnv

    bundle = Bundle.load(path)
    return DefenseEnv(bundle=bundle, classifier=bundle.classifier(), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def env(quick_bundle: Path):
    """The quick bundle's DefenseEnv, once per test module (a module that needs another kind
    defines its own `env`)."""
    return defense_env(quick_bundle)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module's tests, as before after them: Defense-GAN's generator
    is tiny, per-op thread synchronisation costs more than it saves, and on a busy 2-core
    machine two threads make the projection many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(x: torch.Tensor) -> bytes:
    from service.imaging import encode_png

    return encode_png(x)


class MovedClock:
    """The `time` module as service.defenses.query_monitor sees it, with a monotonic clock the
    test moves (monkeypatch it in as the module's `time`): retry_redis_s is tested without
    sleeping through it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI's `train` and `evaluate` configure logging (basicConfig, httpx at WARNING): the
    root handlers and both levels are put back after the test."""
    import logging

    root, httpx = logging.getLogger(), logging.getLogger("httpx")
    handlers, levels = list(root.handlers), (root.level, httpx.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    httpx.setLevel(levels[1])


@pytest.fixture
def access_records() -> Iterator[list]:
    """The `shieldserve.access` log records written during the test (at INFO; the logger's
    handlers and level put back after)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    access = logging.getLogger("shieldserve.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield records
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


@pytest.fixture
def logging_restored_all():
    """Put back what service.logs.configure_logging changes in the process: the root logger's
    handlers and level, uvicorn's loggers' handlers and propagation, uvicorn.access disabled,
    python-multipart's level."""
    import logging

    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "python_multipart")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate,
                 logging.getLogger(n).disabled) for n in names}
    yield
    for n, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
        lg.setLevel(level)


def tampered_copy(bundle: Path, dest: Path, artifact: str) -> Path:
    """A copy of `bundle` at `dest` with one bit of `artifact`'s file flipped (its sha256 no
    longer the manifest's)."""
    import shutil

    shutil.copytree(bundle, dest)
    path = dest / artifact
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return dest


def blobs_and_mlp(root: Path) -> tuple[Path, Path]:
    """(an .npz of 8x8 three-class blobs in `root`, a traced TorchScript MLP for them): data and
    a brought classifier for tests of the build's mechanics, in milliseconds."""
    import numpy as np
    from torch import nn

    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        x = rng.uniform(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
        for i, c in enumerate(y):
            x[i, 0, 2 * c:2 * c + 3, :] += 0.6  # a bright band per class: learnable at a glance
        return x.clip(0, 1), y.astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = split(60), split(30), split(30)
    np.savez(root / "blobs.npz", x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    torch.jit.trace(mlp, torch.zeros(1, 1, 8, 8)).save(str(root / "mlp.pt"))
    return root / "blobs.npz", root / "mlp.pt"
