"""A real uvicorn server in a thread on a free 127.0.0.1 port, for tests that need real
sockets (chunked uploads, client disconnects, schemathesis over HTTP)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml


def config_file(tmp: Path, keep: set[str], **extra: Any) -> Path:
    """A config that keeps only the pipelines named in `keep` (the others set to null)."""
    from service.settings import PACKAGED_CONFIG

    packaged = yaml.safe_load(PACKAGED_CONFIG.read_text())
    data = {"pipelines": {name: None for name in packaged["pipelines"] if name not in keep}, **extra}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def live_server(settings: Any) -> Iterator[tuple[str, Any]]:
    """Yields (base URL, app) while a uvicorn server answers on it."""
    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_options

    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # uvicorn as `shieldserve serve` configures it (proxy headers off among others), on this port
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": port, "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the uvicorn server did not become ready")
        time.sleep(0.05)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
