"""Running the app under uvicorn: one process with a draining shutdown, or N workers.

SIGTERM (or Ctrl-C) first turns readiness false (`/readyz` answers 503 `draining`) while
the server keeps answering for `drain_seconds`, so a gateway or orchestrator stops sending
new work; then uvicorn stops accepting connections, lets in-flight requests finish (up to
`graceful_timeout_s`), and the app shuts down. A second signal exits at once.

With `workers > 1` uvicorn's supervisor sends each worker SIGTERM and waits for it; each
worker drains as the single process does (`drain_in_worker`). Every worker is a separate
process that loads the bundle itself; the
Prometheus metrics of all of them are aggregated through prometheus-client's multiprocess
mode (a directory named by PROMETHEUS_MULTIPROC_DIR; prometheus-client's files in it are
removed at start, nothing else).

Process-wide state (torch's thread count) is set here, once per process, from settings: by
`serve` for one process and by `worker_app` in each worker; never by the app or the runtime,
which tests and benchmarks build many times in one process.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import threading
from typing import Any, Callable

import torch
import uvicorn

from service.settings import Settings, load_settings

log = logging.getLogger("shieldserve")


class Drain:
    """The drain, in front of uvicorn's exit handler `exit`: the first SIGTERM or SIGINT turns
    readiness false and calls `exit` (with SIGTERM: a graceful stop) after `seconds`; a second
    signal (or `seconds` <= 0) calls it at once. `supervised` (a `--workers` process): a SIGTERM
    during the drain is uvicorn's supervisor forwarding the signal the process group already had
    (systemd's KillMode=control-group, `kill -TERM -PGID`, Ctrl-C's SIGINT then the forward), so
    it does not cut the drain short."""

    def __init__(self, app: Any, seconds: float, exit: Callable[[int, Any], None], supervised: bool = False) -> None:
        self.app, self.seconds, self.exit, self.supervised = app, seconds, exit, supervised
        self.draining = self.exited = False
        self.timer: threading.Timer | None = None

    def __call__(self, sig: int, frame: Any) -> None:
        if self.seconds <= 0 or self.exited:
            return self.exit(sig, frame)  # uvicorn's own: a repeated Ctrl-C forces the exit
        if self.draining:
            if self.supervised and sig == signal.SIGTERM:
                return
            self._exit(sig, frame)
            return
        self.draining = True
        self.app.state.draining = True
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is not None:
            runtime.ready = False
        log.info("signal %s: draining for %.1fs before shutting down", sig, self.seconds)
        self.timer = threading.Timer(self.seconds, self._exit, (signal.SIGTERM, frame))
        self.timer.daemon = True
        self.timer.start()

    def _exit(self, sig: int, frame: Any) -> None:
        """Once: the timer after a second signal does nothing (it called uvicorn's handler with
        the first signal again, and a SIGINT there forced the exit, dropping in-flight requests)."""
        if self.exited:
            return
        self.exited = True
        if self.timer is not None:
            self.timer.cancel()
        self.exit(sig, frame)


class DrainingServer(uvicorn.Server):
    """One process: uvicorn's server with the drain in front of its exit handler."""

    def __init__(self, config: uvicorn.Config, app: Any, drain_seconds: float) -> None:
        super().__init__(config)
        self._drain = Drain(app, drain_seconds, super().handle_exit)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._drain(sig, frame)


def drain_in_worker(app: Any, drain_seconds: float) -> bool:
    """Put the drain in front of uvicorn's exit handler in a `--workers` process. uvicorn's
    supervisor answers SIGTERM by sending SIGTERM to each worker and waiting for it; the worker's
    server installs its exit handler (one method, for SIGTERM and SIGINT) before it loads the
    app, that is before this factory runs, so the drain wraps the handler found. Returns whether
    it did (not where no uvicorn server's handler is installed, e.g. outside the main thread)."""
    if drain_seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return False
    exit = signal.getsignal(signal.SIGTERM)
    server = getattr(exit, "__self__", None)
    if not isinstance(server, uvicorn.Server) or signal.getsignal(signal.SIGINT) != exit:
        log.warning("no uvicorn exit handler found in this worker: a signal stops it without the drain")
        return False
    drain = Drain(app, drain_seconds, exit, supervised=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, drain)
    return True


def torch_threads(settings: Settings, default: int) -> int | None:
    """The intra-op thread count a serving process sets, or None to leave torch's `default`.
    `torch_threads` > 0 is taken as it is. 0 (auto): torch's default (every core it found) for
    one process, so the compute-heavy pipelines (smoothing, RMC, Defense-GAN) use the whole
    machine; with `workers` processes each takes its share, at least 1. Where OMP_NUM_THREADS
    is set, the operator chose: torch's default (which follows it) stands."""
    if settings.torch_threads:
        return settings.torch_threads
    if os.environ.get("OMP_NUM_THREADS", "").strip() or settings.workers <= 1:
        return None
    return max(1, default // settings.workers)


def apply_process_settings(settings: Settings) -> None:
    """Set the process-wide state that settings choose: torch's intra-op threads. Call it once,
    first thing in a serving process, before any thread runs torch."""
    default = torch.get_num_threads()
    threads = torch_threads(settings, default)
    if threads is not None and threads != default:
        torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d%s", torch.get_num_threads(),
             "" if settings.torch_threads else " (auto; set torch_threads to choose)")


def worker_app() -> Any:
    """The app of one `--workers N` process (uvicorn's factory): settings from the environment
    `serve` set, logging and process settings as `serve` sets them, then the app."""
    from service.app import create_app
    from service.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, settings.json_logs)
    apply_process_settings(settings)
    app = create_app(settings)
    drain_in_worker(app, settings.drain_seconds)
    return app


def check_address(host: str, port: int) -> None:
    """A ValueError naming host:port where `serve` could not listen (taken, not this machine's,
    a name that does not resolve), found before the bundle loads: uvicorn found it after the
    load and the warm-up (~12 s on models/default), and exited 3 with an error that named no
    host. Bound as uvicorn binds (SO_REUSEADDR), then let go."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def check_worker_app() -> None:
    """Build the app a `--workers` process builds, once, in a child process, before uvicorn
    starts the workers: only they load the bundle, and a bundle or config it refuses (a
    tampered artifact, an unknown default_pipeline or defense, a device torch cannot use) made
    each worker die with a traceback and uvicorn's supervisor start another, for ever, the
    service never answering. The child says why in the one line `serve` says it in, and its
    exit status is the command's (SystemExit)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["SHIELDSERVE_LOG_LEVEL"] = "error"  # the workers log the start-up's warnings, once each
    code = "import service.server as s; s._build_worker_app_or_exit()"
    status = subprocess.run([sys.executable, "-c", code], env=env).returncode
    if status != 0:
        raise SystemExit(status)


def _build_worker_app_or_exit() -> None:
    """check_worker_app's child: the app from the environment's settings (without warm-up),
    then exit 0; exit 2 with `shieldserve: error: ...` where `serve` would have said that."""
    import sys

    from service.app import create_app
    from service.cli import _one_line, _user_error
    from service.logs import configure_logging

    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.json_logs)
        create_app(settings)  # the Runtime: the bundle loaded and verified, every pipeline built
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"shieldserve: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        os._exit(2)
    sys.stdout.flush()
    os._exit(0)  # not waiting for the runtime's threads


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings for serving `settings` (one process or `--workers N`; the live-server
    tests run with them too)."""
    return dict(host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                # the app writes its own access log (RequestIdMiddleware); uvicorn's, even disabled,
                # formatted each request's client address and quoted path before dropping it
                access_log=False,
                # the client id is the service's to decide (trusted_proxies, service/api/clients.py):
                # uvicorn's own X-Forwarded-For handling, on by default and trusting 127.0.0.1 and ::1
                # (or $FORWARDED_ALLOW_IPS), would rewrite the peer first, so any local client could
                # name itself per request and slip out of the query monitor's flags and blocks
                proxy_headers=False,
                # uvicorn takes whole seconds; rounded down, 0.5 s would cancel in-flight requests at once
                timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s))


def serve(settings: Settings, config_file: str | None = None) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.json_logs)
    common = uvicorn_options(settings)
    if settings.workers > 1:
        # each worker builds its own app from the same settings, passed through the environment
        if config_file:
            os.environ["SHIELDSERVE_CONFIG"] = str(config_file)
        os.environ["SHIELDSERVE_BUNDLE"] = str(settings.bundle)
        os.environ["SHIELDSERVE_WORKERS"] = str(settings.workers)  # auto torch_threads shares the CPUs
        check_address(settings.host, settings.port)
        check_worker_app()
        _prepare_multiprocess()
        uvicorn.run("service.server:worker_app", factory=True, workers=settings.workers, **common)
        return
    from service.app import create_app

    check_address(settings.host, settings.port)
    apply_process_settings(settings)
    app = create_app(settings)
    DrainingServer(uvicorn.Config(app, **common), app, settings.drain_seconds).run()


def _prepare_multiprocess() -> list[str]:
    """Make PROMETHEUS_MULTIPROC_DIR (a new temporary directory where unset) ready for the
    workers: prometheus-client's files from an earlier run would be counted again, so they are
    removed, and only they: the directory is the operator's, and was wiped whole with whatever
    else it held. Returns the files removed."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="shieldserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.makedirs(directory, exist_ok=True)
    # imported here, after the variable is set: prometheus-client picks its multiprocess
    # values when it is first imported
    from service.metrics import remove_metric_files

    return remove_metric_files(directory)
