"""Operations: what the metrics a replica exposes and the directory they live in need for the
alerts and for the operator (docs/operations.md, "Alerts" and "Scaling out")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# prometheus_client picks its value class (in memory, or files in PROMETHEUS_MULTIPROC_DIR) when
# first imported: imported inside the first test, while it sets the variable, it made every
# later Metrics() of this file look for a directory that was gone (this file alone failed)
import prometheus_client  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]


def test_prepare_multiprocess_removes_only_prometheus_clients_files(tmp_path: Path, monkeypatch) -> None:
    """`--workers N` readies PROMETHEUS_MULTIPROC_DIR by removing an earlier run's metric files
    (they would be counted again), and nothing else of the directory: it was deleted whole, an
    operator's other files with it."""
    from service import server

    directory = tmp_path / "metrics"
    (directory / "archive").mkdir(parents=True)
    stale = ["counter_12.db", "gauge_livesum_34.db", "gauge_livemostrecent_34.db", "histogram_12.db"]
    kept = ["notes.txt", "backup.db", "counter.db", "archive/counter_1.db"]
    for name in stale + kept:
        (directory / name).write_bytes(b"x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    assert server._prepare_multiprocess() == sorted(stale)
    left = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert left == sorted(kept)
    # a directory that does not exist yet is made; unset, a new temporary one
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "new"))
    assert server._prepare_multiprocess() == [] and (tmp_path / "new").is_dir()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert server._prepare_multiprocess() == []
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # monkeypatch restores the variable
    assert made.is_dir() and made.name.startswith("shieldserve-metrics-")
    made.rmdir()


def test_monitored_pipelines_counters_are_exposed_at_zero() -> None:
    """The query monitor's per-pipeline counters, declared for the pipelines it screens, are
    exposed at 0 before any flag: QueryAttackSuspected (increase() over two samples) then sees
    the first burst. Undeclared, a pipeline's series appeared only at its first flag, born at
    the burst's count."""
    from service.metrics import Metrics

    m = Metrics()
    lines = m.exposition().decode().splitlines()
    assert not any(line.startswith("shieldserve_query_monitor_flags_total{") for line in lines)
    m.declare_monitored_pipelines(["magnet", "default"])
    lines = m.exposition().decode().splitlines()
    for pipeline in ("magnet", "default"):
        assert f'shieldserve_query_monitor_flags_total{{pipeline="{pipeline}"}} 0.0' in lines
        assert f'shieldserve_query_monitor_blocks_total{{pipeline="{pipeline}"}} 0.0' in lines
    m.monitor_flags.labels("magnet").inc(3)  # the declared child is the one counted
    assert 'shieldserve_query_monitor_flags_total{pipeline="magnet"} 3.0' in m.exposition().decode().splitlines()


def test_monitored_pipelines_counters_are_exposed_at_zero_with_workers(tmp_path: Path) -> None:
    """The same under `--workers` (prometheus-client's multiprocess mode, chosen when it is
    imported: a process of its own): the declared zeros are on disk and in the aggregate."""
    child = """
from service.metrics import Metrics
m = Metrics()
m.declare_monitored_pipelines(["magnet"])
print([l for l in m.exposition().decode().splitlines() if l.startswith("shieldserve_query_monitor_")])
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", child], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert 'shieldserve_query_monitor_flags_total{pipeline="magnet"} 0.0' in out, out
    assert 'shieldserve_query_monitor_blocks_total{pipeline="magnet"} 0.0' in out, out


def test_a_replica_exposes_its_monitored_pipelines_flags_at_zero_from_the_start(make_client) -> None:
    """The runtime declares the counters of the pipelines the monitor screens (not baseline's,
    which it does not): the first scrape already holds them at 0."""
    text = make_client(warmup=False).get("/metrics").text
    assert 'shieldserve_query_monitor_flags_total{pipeline="magnet"} 0.0' in text
    assert 'shieldserve_query_monitor_flags_total{pipeline="default"} 0.0' in text
    assert 'shieldserve_query_monitor_flags_total{pipeline="baseline"}' not in text


def test_requests_for_no_route_are_counted_by_status_only(make_client) -> None:
    """A scanner's paths and wrong methods were in no metric (only the access log had them):
    counted by status, never by the path or method the client chose; a wrong method on a
    classifying route is that endpoint's `error`."""
    import re

    c = make_client(warmup=False)

    def count(text: str, pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    before = c.get("/metrics").text
    paths = [f"/wp-admin/{i}.php" for i in range(20)] + ["/v3/models", "/predict/x"]
    for p in paths:
        assert c.get(p).status_code == 404
    for method in ("PUT", "DELETE", "PATCH"):
        assert c.request(method, "/healthz").status_code == 405
        assert c.request(method, "/predict").status_code == 405
    text = c.get("/metrics").text
    for status, n in (("404", len(paths)), ("405", 3)):
        series = r'^shieldserve_unrouted_requests_total\{status="%s"\} (\S+)' % status
        assert count(text, series) - count(before, series) == n
    predict_errors = r'^shieldserve_requests_total\{endpoint="predict",outcome="error",pipeline="unknown"\} (\S+)'
    assert count(text, predict_errors) - count(before, predict_errors) == 3
    assert "wp-admin" not in text and "PATCH" not in text
