"""An async micro-batcher: concurrent requests for one pipeline are merged into one batch.

The first request to arrive waits at most `max_delay_ms` for company; a batch closes at
`max_batch_size` images. A request is never split, and only requests with the same options
share a batch. While a batch runs in the inference thread pool, the next one fills up.
A full queue refuses new work at once (`Overloaded`, answered 503 with Retry-After) rather
than letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.defenses.base import DeadlineExceeded, RunContext
from service.pipeline import ImageResult

RunBatch = Callable[[torch.Tensor, RunContext], list[ImageResult]]


class Overloaded(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    x: torch.Tensor | None  # None until `decode` has run (in the batch's worker thread)
    options_key: str
    options: dict[str, Any]
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    decode: Callable[[], torch.Tensor] | None = None
    images: int = 0

    @property
    def size(self) -> int:
        return int(self.x.shape[0]) if self.x is not None else self.images


@dataclass
class BatchReport:
    """What one batch run looked like; the runtime turns it into metrics."""

    size: int
    queue_waits: list[float]
    results: list[ImageResult]
    seed: int


class Batcher:
    def __init__(self, name: str, run: RunBatch, executor: Executor, *, device: torch.device,
                 enabled: bool = True, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, retry_after_s: int = 1,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 on_queue_change: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._run = run
        self._executor = executor
        self._device = device
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def submit(self, x: torch.Tensor, *, deadline: float | None = None,
                     options: dict[str, Any] | None = None) -> list[ImageResult]:
        return await self._submit(x, None, int(x.shape[0]), deadline, options)

    async def submit_encoded(self, decode: Callable[[], torch.Tensor], images: int, *,
                             deadline: float | None = None, options: dict[str, Any] | None = None,
                             ) -> tuple[torch.Tensor, list[ImageResult]]:
        """Like submit, for `images` images not decoded yet: `decode()` runs in the batch's
        worker thread, with the other jobs' decodes and the pipeline (one thread hop per batch,
        none per request). Its exception (an ImageError, say) fails this job alone.
        Returns the decoded batch with the results."""
        return await self._submit(None, decode, images, deadline, options)

    async def _submit(self, x: torch.Tensor | None, decode: Callable[[], torch.Tensor] | None, images: int,
                      deadline: float | None, options: dict[str, Any] | None) -> Any:
        if self._closed:
            raise Overloaded("the service is shutting down", self.retry_after_s)
        if self._queued_images + images > self.max_queue:
            raise Overloaded(f"pipeline {self.name!r} has {self._queued_images} images queued "
                             f"(limit {self.max_queue})", self.retry_after_s)
        self._ensure_worker()
        options = options or {}
        key = json.dumps(options, sort_keys=True, default=str) if options else "{}"  # jobs batch by options
        job = _Job(x, key, options, deadline,
                   asyncio.get_running_loop().create_future(), decode=decode, images=images)
        self._queue.append(job)
        self._queued_images += job.size
        self._queue_changed()
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.future.cancel()  # the worker skips it, or stops the batch if no one else waits
            raise

    def _queue_changed(self) -> None:
        if self._on_queue_change:
            self._on_queue_change(self._queued_images)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._work(), name=f"batcher-{self.name}")

    async def _work(self) -> None:
        assert self._wakeup is not None
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.enabled and self.max_delay > 0:
                first = self._queue[0]
                wait = first.enqueued + self.max_delay - time.monotonic()
                while wait > 0 and self._fill(first.options_key) < self.max_batch_size:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        break
                    wait = first.enqueued + self.max_delay - time.monotonic()
            jobs = self._take()
            if jobs:
                await self._run_jobs(jobs)

    def _fill(self, key: str) -> int:
        return sum(j.size for j in self._queue if j.options_key == key and not j.future.done())

    def _take(self) -> list[_Job]:
        """Pop the next batch: the first live job and those after it with the same options."""
        while self._queue and self._queue[0].future.done():  # cancelled while queued
            self._queued_images -= self._queue.popleft().size
        if not self._queue:
            self._queue_changed()
            return []
        first = self._queue[0]
        jobs, keep, total = [], deque(), 0
        for job in self._queue:
            fits = total + job.size <= self.max_batch_size or not jobs
            if (job.options_key == first.options_key and fits and not job.future.done()
                    and (self.enabled or not jobs)):
                jobs.append(job)
                total += job.size
            elif job.future.done():
                continue
            else:
                keep.append(job)
        self._queue = keep
        self._queued_images = sum(j.size for j in keep)
        self._queue_changed()
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.deadline is not None and now > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(job)
        return live

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        deadlines = [j.deadline for j in jobs]
        seed = secrets.randbits(63)
        ctx = RunContext(device=self._device, seed=seed,
                         deadline=None if any(d is None for d in deadlines) else max(deadlines),  # type: ignore[type-var]
                         cancelled=lambda: all(j.future.done() for j in jobs),
                         options=dict(jobs[0].options))
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            failed, results = await loop.run_in_executor(self._executor, self._decode_and_run, jobs, ctx)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        offset, live = 0, []
        for i, j in enumerate(jobs):
            if i in failed:
                if not j.future.done():
                    j.future.set_exception(failed[i])
                continue
            live.append(j)
            part = results[offset:offset + j.size]
            offset += j.size
            if not j.future.done():
                j.future.set_result((j.x, part) if j.decode is not None else part)
        if self._on_batch and live:
            self._on_batch(BatchReport(size=offset, results=results, seed=seed,
                                       queue_waits=[started - j.enqueued for j in live for _ in range(j.size)]))

    def _decode_and_run(self, jobs: list[_Job], ctx: RunContext) -> tuple[dict[int, Exception], list[ImageResult]]:
        """In the worker thread: decode the jobs that are not decoded yet, then run the batch."""
        failed: dict[int, Exception] = {}
        for i, j in enumerate(jobs):
            if j.decode is not None and j.x is None:
                try:
                    j.x = j.decode()
                except Exception as exc:  # noqa: BLE001 - this job's answer (an ImageError: 4xx)
                    failed[i] = exc
        live = [j for i, j in enumerate(jobs) if i not in failed]
        if not live:
            return failed, []
        x = torch.cat([j.x for j in live]).to(self._device)  # type: ignore[misc]
        return failed, self._run(x, ctx)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Overloaded("the service is shutting down", self.retry_after_s))
        self._queue.clear()
