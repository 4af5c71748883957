"""A micro-batcher: concurrent requests for one pipeline are merged into one batch.

The first request to reach an idle batcher waits at most `max_delay_ms` for company, and at
most `company_wait_ms` for the requests it can expect: those admitted and still being decoded,
and (for at most a tenth of the last batch's run) as many as the last batch had. Requests
that queued while a batch ran go in the next batch at once, except behind a costly batch (one
that ran for at least ten times `company_wait_ms`): then the batch thread waits up to
`company_wait_ms` for that batch's own clients to come back and join them. A batch closes at
`max_batch_size` images. A request is never split, and only requests with the same options
share a batch. A full queue refuses new work at once (`Overloaded`, answered 503 with
Retry-After) rather than letting latency grow without bound.

Each pipeline has one batch thread that forms the batches and hands each to `execute` (the
runtime's compute thread, service/compute.py, which runs every torch call of the process). The event loop only
appends a job to the queue (under a lock) and awaits its future; the batch thread takes the
next batch the moment the previous one is done, with everything that queued up meanwhile,
and hands the results back to the loop in one call per batch. So the model never waits for the
event loop to come round and start the next batch: under load the loop is busy answering the
last batch's requests exactly when the next batch should start (with the batches formed on
the loop, the model stood idle ~20% of the time at 32 clients; docs/operations.md).

A batcher's `screen` (the query monitor's, for a monitored pipeline) sees each batch on the
compute thread before the pipeline does, and settles what it rejects.

A request that goes away (its client disconnected, its deadline passed) while a batch with
other live requests computes its rows leaves that work running until the batch ends; what it
holds for that work (its admission cost, `outlives`) is let go only then. One that goes away
while still queued lets go at once: the batch thread skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from service.defenses.base import DeadlineExceeded, RunContext
from service.pipeline import ImageResult

log = logging.getLogger("shieldserve")

RunBatch = Callable[[torch.Tensor, RunContext], list[ImageResult]]
# A batch's screen before its pipeline (the query monitor, service/runtime.py): given the
# batch and each job's (client, images), the answer per image where it is settled already (a
# rejection; None: the pipeline runs it), the exception per job its request gets instead of
# results (None: none), and what the on_batch report carries for metrics.
Screen = Callable[[torch.Tensor, list[tuple[str | None, int]]],
                  tuple[list[ImageResult | None], list[BaseException | None], list[Any]]]


# Set by whoever holds something for the request served in this context until its work is done
# (Admission.hold: its cost). Called when the request goes away while a batch is computing its
# rows, it returns what lets go of that hold, which the batch thread calls (on the request's
# event loop) once the batch has ended, so the hold covers the work still running for it.
outlives: contextvars.ContextVar[Callable[[], Callable[[], None]] | None] = contextvars.ContextVar(
    "shieldserve_outlives", default=None)


class Overloaded(Exception):
    """Refused for load, answered `overloaded` with Retry-After: 503 when the replica is full,
    429 when the client is over its own share (Admission's `max_client_cost`)."""

    def __init__(self, message: str, retry_after: int, status: int = 503) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


@dataclass
class _Job:
    x: torch.Tensor
    options_key: str
    options: dict[str, Any]
    deadline: float | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    client: str | None = None  # who sent it, for the batch's screen (None: not screened)
    enqueued: float = field(default_factory=time.monotonic)
    # under the batcher's lock: taken by a batch that has not ended yet, and (once its request
    # went away meanwhile) what lets go of its hold when that batch ends
    running: bool = False
    release: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class BatchReport:
    """What one batch run looked like; the runtime turns it into metrics."""

    size: int
    queue_waits: list[float]
    results: list[ImageResult]
    seed: int
    screened: list[Any] = field(default_factory=list)  # the screen's report per screened job


def _settle(outcomes: list[tuple[asyncio.Future, bool, Any]], then: Callable[[], None] | None = None) -> None:
    """On the event loop: resolve each (future, ok, value) whose request still waits, then run
    `then` (the batch's metrics) before the waiting requests resume."""
    for future, ok, value in outcomes:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
    if then is not None:
        then()


class Batcher:
    def __init__(self, name: str, run: RunBatch, *, device: torch.device,
                 enabled: bool = True, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 company_wait_ms: float = 0.0, max_queue: int = 1024, retry_after_s: int = 1,
                 execute: Callable[[Callable[[], list[ImageResult]]], list[ImageResult]] | None = None,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 on_queue_change: Callable[[int], None] | None = None,
                 screen: Screen | None = None, noise_key: bytes | None = None) -> None:
        self.name = name
        self._noise_key = noise_key  # RunContext.noise_key of every batch
        self._run = run
        self._screen = screen
        self._device = device
        self._execute = execute or (lambda work: work())  # where a batch's torch work runs
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.company_wait = company_wait_ms / 1000.0
        self._arriving = 0  # images of admitted requests still being decoded (`expecting`)
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @contextlib.contextmanager
    def expecting(self, images: int) -> Iterator[list[int]]:
        """Around a request's decode: its images are on their way to `submit`, so an idle
        batcher may wait for them (`company_wait_ms`). `submit(..., expected=token)` with the
        yielded token takes them off under the batcher's lock, in the same step that queues
        the job; if the request fails before that, leaving the block takes them off. A client
        whose uploads are slow to decode can make another's batch wait at most
        `company_wait_ms`, and changes no answer."""
        token = [images]
        with self._cond:
            self._arriving += images
        try:
            yield token
        finally:
            if token[0]:
                with self._cond:
                    self._arriving -= token[0]
                    token[0] = 0
                    self._cond.notify()

    async def submit(self, x: torch.Tensor, *, deadline: float | None = None,
                     options: dict[str, Any] | None = None, client: str | None = None,
                     expected: list[int] | None = None) -> list[ImageResult]:
        """Queue `x` for the next batch; with `client` (and a `screen`), the batch's screen
        sees it before the pipeline does."""
        images = int(x.shape[0])
        loop = asyncio.get_running_loop()
        options = options or {}
        key = json.dumps(options, sort_keys=True, default=str) if options else "{}"  # jobs batch by options
        job = _Job(x, key, options, deadline, loop.create_future(), loop,
                   client if self._screen is not None else None)
        with self._cond:
            if expected is not None and expected[0]:  # no longer on its way: queued, or refused here
                self._arriving -= expected[0]
                expected[0] = 0
            if self._closed:
                raise Overloaded("the service is shutting down", self.retry_after_s)
            if self._queued_images + images > self.max_queue:
                raise Overloaded(f"pipeline {self.name!r} has {self._queued_images} images queued "
                                 f"(limit {self.max_queue})", self.retry_after_s)
            self._queue.append(job)
            self._queued_images += images
            depth = self._queued_images
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"shieldserve-batch-{self.name}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        self._queue_changed(depth)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.future.cancel()  # the batch thread skips it, or stops the batch if no one else waits
            keep = outlives.get()
            if keep is not None:
                with self._cond:  # the batch thread ends a batch under this lock: no release is missed
                    if job.running:  # a batch computes its rows until it ends: hold on until then
                        job.release = keep()
            raise

    def _queue_changed(self, depth: int) -> None:
        if self._on_queue_change:
            self._on_queue_change(depth)

    # ------------------------------------------------------------------ the batch thread
    def _work(self) -> None:
        idle = True  # no batch has run yet; after one: nothing was queued when it finished
        # the last batch: its requests and how long it ran. Clients in a closed loop come back
        # about together, so an idle batcher may wait for as many as it had, at most a tenth of
        # what that batch cost (a cheap pipeline's wait stays a fraction of its latency)
        last, last_s, ended = 1, 0.0, 0.0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    idle = True
                    self._cond.wait()
                if self._closed:
                    return
                # Wait for company after idling: requests that queued while the previous batch
                # ran have waited already, and holding them back for more that cannot come in
                # time only idles the model (at 32 clients with max_delay_ms 2: ~3,420 -> ~3,600
                # req/s; docs/operations.md); the one exception, behind a costly batch, below.
                # Waiting for requests that are admitted and being decoded (`expecting`) costs
                # a lone client nothing: none are on their way then.
                if idle and self.enabled and (self.max_delay > 0 or self.company_wait > 0):
                    first = self._queue[0]

                    def until() -> float:
                        at = first.enqueued + self.max_delay
                        if self._arriving > 0:
                            return max(at, first.enqueued + self.company_wait)
                        if len(self._queue) < last:
                            return max(at, first.enqueued + min(self.company_wait, 0.1 * last_s))
                        return at

                    self._hold(first, until)
                elif self.enabled and self.company_wait > 0 and last_s >= 10 * self.company_wait:
                    # Behind a costly batch (>= 10x company_wait_ms): its clients are on their way
                    # back, and with them left out closed-loop clients settle into cohorts that
                    # alternate (defensegan at 8 clients: batches of 4, each costing nearly what
                    # one of 8 does). Wait for them too, company_wait_ms at most after it ended:
                    # at most a tenth of that batch's run. A cheap batch never waits here.
                    target = len(self._queue) + last
                    self._hold(self._queue[0], lambda: ended + self.company_wait,
                               lambda: len(self._queue) >= target)
                if self._closed:
                    return
                jobs, expired, depth = self._take()
            idle = False
            self._queue_changed(depth)
            if expired:
                self._send([(j, False, DeadlineExceeded("deadline passed while queued")) for j in expired])
            if jobs:
                started = time.monotonic()
                try:
                    self._run_jobs(jobs)
                finally:
                    self._ended(jobs)
                ended = time.monotonic()
                last, last_s = len(jobs), ended - started

    def _ended(self, jobs: list[_Job]) -> None:
        """The batch of `jobs` is over: the holds of those whose requests went away while it ran
        are let go now, on their loops."""
        with self._cond:
            for job in jobs:
                job.running = False
            releases = [(job.loop, job.release) for job in jobs if job.release is not None]
        for loop, release in releases:
            try:
                loop.call_soon_threadsafe(release)
            except RuntimeError:  # that loop is closed: nothing it admitted is left to let go
                pass

    def _hold(self, first: _Job, until: Callable[[], float], enough: Callable[[], bool] = lambda: False) -> None:
        """Under the lock: wait for company until `until()` (read again after every wake-up),
        or until the batch of `first`'s options is full, `enough()` holds or the batcher closes."""
        while not self._closed:
            wait = until() - time.monotonic()
            if wait <= 0 or enough() or self._fill(first.options_key) >= self.max_batch_size:
                return
            self._cond.wait(wait)

    def _fill(self, key: str) -> int:
        return sum(j.size for j in self._queue if j.options_key == key and not j.future.done())

    def _take(self) -> tuple[list[_Job], list[_Job], int]:
        """Under the lock: pop the next batch (the first live job and those after it with the
        same options, up to max_batch_size images) and the jobs whose deadline has passed."""
        first = next((j for j in self._queue if not j.future.done()), None)
        jobs: list[_Job] = []
        keep: deque[_Job] = deque()
        total = 0
        for job in self._queue:
            if job.future.done():  # cancelled while queued
                continue
            fits = total + job.size <= self.max_batch_size or not jobs
            if job.options_key == first.options_key and fits and (self.enabled or not jobs):  # type: ignore[union-attr]
                jobs.append(job)
                total += job.size
            else:
                keep.append(job)
        self._queue = keep
        self._queued_images = sum(j.size for j in keep)
        now = time.monotonic()
        live = [j for j in jobs if j.deadline is None or now <= j.deadline]
        expired = [j for j in jobs if j.deadline is not None and now > j.deadline]
        for job in live:
            job.running = True
        return live, expired, self._queued_images

    def _send(self, outcomes: list[tuple[_Job, bool, Any]], then: Callable[[], None] | None = None) -> None:
        """Hand results to the event loop(s) the requests wait on: one call per loop, which on the
        first loop also runs `then` (the batch's metrics: there, not in this thread, the model's
        and under load the bottleneck); `then` runs here if no loop takes it."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
        for job, ok, value in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, ok, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items, then)
                then = None
            except RuntimeError:  # that loop is closed: no one is waiting any more
                pass
        if then is not None:
            then()

    def _context(self, jobs: list[_Job], seed: int) -> RunContext:
        deadlines = [j.deadline for j in jobs]
        return RunContext(device=self._device, seed=seed,
                          deadline=None if any(d is None for d in deadlines) else max(deadlines),  # type: ignore[type-var]
                          cancelled=lambda: all(j.future.done() for j in jobs),
                          options=dict(jobs[0].options), noise_key=self._noise_key)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        seed = secrets.randbits(63)  # unpredictable: a client cannot pick the noise its image gets
        ctx = self._context(jobs, seed)
        started = time.monotonic()
        screened: list[Any] = []
        failed: dict[int, BaseException] = {}  # job index -> what its request gets instead
        owner = [i for i, j in enumerate(jobs) for _ in range(j.size)]

        def run(x: torch.Tensor, rows: list[int]) -> list[ImageResult | None]:
            """The pipeline on x's `rows`. Where a batch of several requests fails, each request
            runs again alone, so one request's images (an input that trips a defense's bug, an
            out-of-memory the merged size reached) fail that request only, never the others
            that shared its batch: they get the answers they would have had alone. Where the
            rows were one request's, the failure is that request's alone: the jobs the screen
            settled keep their answers (and its report its metrics). A deadline or every client
            gone (DeadlineExceeded) ends the whole batch as before. The cost of a failure: the
            batch's work about twice."""
            try:
                return self._run(x if len(rows) == len(x) else x[rows], ctx)  # type: ignore[return-value]
            except DeadlineExceeded:
                raise
            except Exception as exc:
                members = sorted({owner[r] for r in rows})
                if len(members) < 2:
                    # one request's rows only: the failure is that request's, and the batch's
                    # other jobs (answered or refused by the screen) keep their own answers
                    failed[members[0]] = exc
                    return [None] * len(rows)
                # logged here: where every request then succeeds alone, no one else reports it
                log.warning("a batch of %d requests on %r failed (%s); running each alone",
                            len(members), self.name, type(exc).__name__)
            out: list[ImageResult | None] = []
            for i in members:
                mine = [r for r in rows if owner[r] == i]
                # the seed its images had in the merged batch (a pipeline's per-image seeds count
                # from the batch's where there is no noise key), not the batch's first image's
                alone = (seed + rows.index(mine[0])) % 2**63
                try:
                    got: list[ImageResult | None] = list(self._run(x[mine], self._context([jobs[i]], alone)))
                except Exception as exc:  # noqa: BLE001 - this request's own failure (or deadline)
                    failed[i] = exc
                    got = [None] * len(mine)
                out.extend(got)
            return out

        def work() -> list[ImageResult | None]:
            x = jobs[0].x if len(jobs) == 1 else torch.cat([j.x for j in jobs])
            if x.device != self._device:
                x = x.to(self._device)
            if self._screen is None or all(j.client is None for j in jobs):
                return run(x, list(range(len(x))))
            # the screen runs here, on the compute thread, for the whole batch: in a thread of
            # its own it competed with torch's threads for the cores (docs/query_monitor.md)
            answered, errors, report = self._screen(x, [(j.client, j.size) for j in jobs])
            screened.extend(report)
            failed.update((i, e) for i, e in enumerate(errors) if e is not None)
            rows = [r for r, a in enumerate(answered) if a is None and owner[r] not in failed]
            ran = run(x, rows) if rows else []
            out = list(answered)
            for r, result in zip(rows, ran):
                out[r] = result
            return out  # type: ignore[return-value]

        try:
            results = self._execute(work)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            self._send([(j, False, exc) for j in jobs])
            return
        except BaseException as exc:  # noqa: BLE001 - never kill the batch thread
            self._send([(j, False, RuntimeError(str(exc) or type(exc).__name__)) for j in jobs])
            return
        offset, outcomes, answered = 0, [], []
        for i, j in enumerate(jobs):
            if i in failed:
                outcomes.append((j, False, failed[i]))
            else:
                outcomes.append((j, True, results[offset:offset + j.size]))
                answered.extend(results[offset:offset + j.size])
            offset += j.size
        then = None
        if self._on_batch:
            report = BatchReport(size=offset, results=answered, seed=seed, screened=screened,
                                 queue_waits=[started - j.enqueued for j in jobs for _ in range(j.size)])
            then = functools.partial(self._on_batch, report)
        self._send(outcomes, then)

    async def close(self) -> None:
        """Stop taking work: queued requests get Overloaded; a running batch finishes."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._queued_images = 0
            self._cond.notify_all()
        self._send([(j, False, Overloaded("the service is shutting down", self.retry_after_s)) for j in queued])
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 30.0)
