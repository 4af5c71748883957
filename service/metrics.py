"""Prometheus metrics (prefix `shieldserve_`), one registry per app.

Labels are low-cardinality by construction: pipeline and defense names come from the
configuration, endpoint from the route table, outcome from a fixed set. Never an image hash,
a request id or a secret.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

log = logging.getLogger("shieldserve")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RADIUS_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
MATCH_BUCKETS = (0.0, 0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.76, 0.8, 0.9, 0.98, 1.0)
SCORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

OUTCOMES = ("accepted", "rejected", "abstained", "mixed", "error", "overloaded", "deadline_exceeded",
            "client_closed", "attack_suspected", "unauthorized", "over_share", "client_deadline")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


_LIVE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")
# prometheus-client's own files in the multiprocess directory: `<type>[_<mode>]_<pid>.db`
_METRICS_FILE = re.compile(r"[a-z]+(_[a-z]+)?_\d+\.db")


def remove_metric_files(directory: str) -> list[str]:
    """Remove prometheus-client's files from `directory`, and only them (the directory is the
    operator's); the names removed, sorted."""
    removed = []
    for entry in os.scandir(directory):
        if _METRICS_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.remove(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def reap_dead_workers(directory: str) -> list[int]:
    """Drop the live gauges of worker processes that no longer run. A worker that exits cleanly
    does it itself (the app's lifespan), but one killed (out of memory, a crash) left its values,
    and uvicorn's supervisor starts another without a word: the killed worker's 1 in
    `shieldserve_query_monitor_degraded` ("livemax") was read until the server restarted.
    Returns the process ids dropped."""
    dead = []
    for name in os.listdir(directory):
        m = _LIVE_FILE.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.append(pid)
        except PermissionError:  # runs, as another user
            pass
    for pid in set(dead):
        multiprocess.mark_process_dead(pid, directory)
    return sorted(set(dead))


def _cache_children(metric: Any) -> None:
    """Memoise `metric.labels(*values)`: prometheus-client builds and validates the label
    tuple and takes a lock on every call, ~10 us, and a request makes several. The label
    sets are few by construction (see above), so the cache stays small."""
    children: dict[tuple[str, ...], Any] = {}
    build = metric.labels

    def labels(*values: str) -> Any:
        child = children.get(values)
        if child is None:
            child = children[values] = build(*values)
        return child

    metric.labels = labels


class Metrics:
    def __init__(self, shared_monitor: bool = False) -> None:
        """`shared_monitor`: the query monitor keeps its blocks in Redis, shared by every process
        (else each process blocks on its own), which decides how `--workers` aggregate."""
        self.registry = CollectorRegistry(auto_describe=True)
        # run before each exposition, off the event loop: gauges read from state at scrape time
        self._before_scrape: list[Callable[[], None]] = []
        r = self.registry
        self.requests = Counter("shieldserve_requests", "Requests answered, by outcome.",
                                ["pipeline", "endpoint", "outcome"], registry=r)
        self.request_duration = Histogram("shieldserve_request_duration_seconds",
                                          "Time from a request's arrival (its body's upload included) to its "
                                          "response.", ["pipeline", "endpoint"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("shieldserve_stage_duration_seconds",
                                        "Time spent in one defense stage, per batch.",
                                        ["pipeline", "defense"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("shieldserve_rejections", "Images rejected as adversarial.",
                                  ["pipeline", "defense"], registry=r)
        self.detector_score = Histogram("shieldserve_detector_score", "Detector scores of served images.",
                                        ["pipeline", "defense"], buckets=SCORE_BUCKETS, registry=r)
        self.certified_radius = Histogram("shieldserve_certified_radius", "Certified L2 radii of answers.",
                                          ["pipeline"], buckets=RADIUS_BUCKETS, registry=r)
        self.abstentions = Counter("shieldserve_abstentions", "Images the pipeline abstained on.",
                                   ["pipeline"], registry=r)
        self.images = Counter("shieldserve_images", "Images classified, by final status.",
                              ["pipeline", "status"], registry=r)
        self.batch_size = Histogram("shieldserve_batch_size", "Images per batch run through a pipeline.",
                                    ["pipeline"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("shieldserve_queue_depth", "Images waiting in the batcher.", ["pipeline"],
                                 registry=r, multiprocess_mode="livesum")
        self.inflight = Gauge("shieldserve_inflight_requests", "Requests being served now.",
                              registry=r, multiprocess_mode="livesum")
        self.cost_in_flight = Gauge("shieldserve_admitted_cost", "Sample units of the requests in flight "
                                    "(admission by cost).", registry=r, multiprocess_mode="livesum")
        self.queue_wait = Histogram("shieldserve_queue_wait_seconds", "Time an image waited for its batch.",
                                    ["pipeline"], buckets=LATENCY_BUCKETS, registry=r)

        # the query monitor (service/defenses/query_monitor.py); never a client id or a hash
        self.monitor_flags = Counter("shieldserve_query_monitor_flags", "Images the query monitor flagged as "
                                     "part of a query-based attack.", ["pipeline"], registry=r)
        self.monitor_distance = Histogram("shieldserve_query_monitor_match_distance",
                                          "1 - the fraction of a query's fingerprint hashes already remembered "
                                          "(0: a near copy of earlier queries; 1: nothing like them).",
                                          ["pipeline"], buckets=MATCH_BUCKETS, registry=r)
        self.monitor_seconds = Histogram("shieldserve_query_monitor_seconds", "Time the monitor took per request.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        # set from the monitor's count (at each scrape and each block; service/runtime.py): with
        # --workers, on the shared store every process counts the same clients, so the latest
        # count is the value; on per-process stores each counts its own, so they add up
        self.blocked_clients = Gauge("shieldserve_blocked_clients", "Clients blocked by the query monitor now.",
                                     registry=r,
                                     multiprocess_mode="livemostrecent" if shared_monitor else "livesum")
        self.monitor_blocks = Counter("shieldserve_query_monitor_blocks", "Clients the query monitor blocked.",
                                      ["pipeline"], registry=r)
        self.monitor_degraded = Gauge("shieldserve_query_monitor_degraded", "1 while the shared monitor store "
                                      "(Redis) is unreachable and this replica uses its own.", registry=r,
                                      # live: a worker that exited while degraded left its 1 on disk,
                                      # and "max" read it until the whole server restarted (a killed
                                      # one's is dropped at the next scrape: reap_dead_workers)
                                      multiprocess_mode="livemax")
        self.monitor_store_errors = Counter("shieldserve_query_monitor_store_errors", "Shared monitor store "
                                            "(Redis) outages seen by this replica.", registry=r)
        self.certify_store_down = Gauge("shieldserve_certify_store_down", "1 while the shared image and certificate "
                                        "store (Redis, certify.store: redis) cannot be reached: GET /certify "
                                        "answers 503.", registry=r, multiprocess_mode="livemax")
        self.certify_store_outages = Counter("shieldserve_certify_store_outages", "Outages of the shared image and "
                                             "certificate store (Redis) seen by this replica.", registry=r)
        # requests no route answers (a scanner's paths, a wrong method): by status only, never
        # the path or method, which the client chooses (one series per path it tried)
        self.unrouted = Counter("shieldserve_unrouted_requests", "Requests for no route (404) or a route's "
                                "wrong method (405), by status.", ["status"], registry=r)
        for status in ("404", "405"):
            self.unrouted.labels(status)

        for metric in (self.monitor_flags, self.monitor_distance, self.monitor_blocks, self.requests, self.request_duration, self.stage_duration, self.rejections,
                       self.detector_score, self.certified_radius, self.abstentions, self.images,
                       self.batch_size, self.queue_depth, self.queue_wait):
            _cache_children(metric)

    def declare_monitored_pipelines(self, names: Iterable[str]) -> None:
        """Create the query monitor's per-pipeline counters at 0 for the pipelines it screens, so
        that they are exposed from the first scrape on. A labelled series otherwise appears at
        its first increment, and Prometheus' increase() needs two samples of a series: a first
        burst of flags between two scrapes (the series born at 29) was never seen by
        QueryAttackSuspected (docker/alerts.yml)."""
        for name in names:
            self.monitor_flags.labels(name)
            self.monitor_blocks.labels(name)

    def before_scrape(self, refresh: Callable[[], None]) -> None:
        """Run `refresh` before each exposition. A callback gauge (set_function) would do in one
        process, but the multiprocess collector reads only the values processes have set."""
        self._before_scrape.append(refresh)

    def exposition(self) -> bytes:
        """The text format for GET /metrics; aggregates all workers in multiprocess mode. Runs
        the `before_scrape` refreshes first: call it off the event loop (they may ask Redis)."""
        for refresh in self._before_scrape:
            try:
                refresh()
            except Exception as exc:  # one stale gauge, not a failed scrape
                log.warning("metrics: a refresh before the scrape failed (%s)", type(exc).__name__)
        directory = multiprocess_dir()
        if directory:
            reap_dead_workers(directory)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
