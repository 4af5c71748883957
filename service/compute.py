"""The one thread that runs a serving process's torch work.

Why one: torch's intra-op parallelism on CPU is OpenMP (libgomp), which keeps a team of worker
threads for each thread that calls into it. Once two threads have done so (the main thread
loading the bundle and a batch thread, or two pipelines' batch threads), libgomp manages more
threads than there are cores and stops spinning between parallel regions, so every region
pays for waking its workers: a one-image forward pass of a small CNN took 0.51 ms instead of
0.22 ms on 2 cores (docs/operations.md, "One compute thread"). So the bundle is loaded, warmed
and run on this thread only; the batch threads form batches and hand each one here, and
GET /certify's sampling runs here too.

Each task says how many of torch's intra-op threads it may use (runtime.Runtime._threads): the
undefended classifier's batches one (`parallel_min_cost`: its sub-millisecond batches gain
little from a second thread while the event loop wants the other core; at 32 clients /v2
served 1.34x KServe's at one thread against 1.15-1.22x at two), every other pipeline all of
them (a pipeline's `threads:` may say otherwise; the packaged configuration has none).
An intra-op thread that the OS deschedules stalls the whole call: where other processes used
the cores, MagNet at two threads fell from ~300 to 47-104 images/s, so a replica that shares
its cores should raise `parallel_min_cost` (100: magnet and neuralfp on one thread too).

One thread means one batch at a time, first come first served. A long `/certify` lets the
batches queued behind it run between its noise batches (`RunContext.between`), so a
100,000-sample certificate does not hold `/predict` up for its whole duration; the batches of
`defensegan` and `rmc` run whole (seconds at most, bounded by the batch size). A long task
queued behind another long one waits for it to end (`submit(..., long=True)`, or a task given
this thread's `between` in a RunContext): run inside the first one's `between`, it would hold
every batch up for its whole duration. One that was not known to be long (it calls `between`
while run inside another's) lets the batches queued meanwhile run in its own `between`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from service.defenses.base import RunContext

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "shieldserve-torch", threads: int | None = None) -> None:
        # the intra-op threads a task gets unless it asks for fewer: the process's count
        self.threads = threads or torch.get_num_threads()
        self._current = self.threads  # what the thread has set now
        # (future, task, threads, long): `between` runs the tasks that are not long
        self._queue: deque[tuple[Future, Callable[[], Any], int | None, bool]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._depth = 0  # on the thread: 1 while a task runs, 2 while a task runs inside another's between
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, threads: int | None = None, long: bool | None = None,
               **kwargs: Any) -> "Future[T]":
        """Queue `fn(*args, **kwargs)`; `threads`: at most this many intra-op threads for it
        (None: all of `self.threads`). `long`: a task that lets others in (`between`) and so
        never runs inside another's `between`, only after it; None: long where an argument is
        a RunContext whose `between` is this thread's (GET/POST /certify's run)."""
        if long is None:
            long = any(isinstance(a, RunContext) and a.between == self.between
                       for a in (*args, *kwargs.values()))
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the compute thread is closed")
            self._queue.append((future, lambda: fn(*args, **kwargs), threads, long))
            self._cond.notify()
        return future

    def call(self, fn: Callable[..., T], *args: Any, threads: int | None = None, long: bool | None = None,
             **kwargs: Any) -> T:
        """Run `fn` on the compute thread and wait for it (inline when already on it)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, threads=threads, long=long, **kwargs).result()

    def between(self) -> None:
        """Called on the compute thread between two steps of a long task (GET /certify's noise
        batches): run the tasks queued meanwhile that are not long ones, in order, then return
        to it; long ones stay queued, in order, for after it (run in here, one would hold up
        every batch until it ended). At most as many as were queued when it was called, so a
        steady stream of batches cannot stall the long task. Each runs one at a time, in
        torch's default grad mode, as it would on its own (the long task may be inside
        inference_mode). A task run here that calls between() in turn was a long one after
        all (not marked so): the tasks still queued then run in its between(), so no batch
        waits for the whole of it."""
        if threading.current_thread() is not self._thread or self._depth < 1:
            return
        with self._cond:
            budget = sum(1 for *_, long in self._queue if not long)
        outer = self._current
        for _ in range(budget):
            with self._cond:  # the first short one queued now: a nested between() may have run some
                at = next((k for k, (*_, long) in enumerate(self._queue) if not long), None)
                if at is None:
                    break
                future, task, threads, _ = self._queue[at]
                del self._queue[at]
            with torch.inference_mode(False), torch.enable_grad():
                self._run(future, task, threads)
        self._use(outer)

    def _use(self, threads: int) -> None:
        if threads != self._current:
            torch.set_num_threads(threads)  # only this thread runs torch: in effect for its calls
            self._current = threads

    def _run(self, future: Future, task: Callable[[], Any], threads: int | None) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self._use(max(1, min(threads or self.threads, self.threads)))
        self._depth += 1
        try:
            result = task()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            self._depth -= 1

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                future, task, threads, _ = self._queue.popleft()
            self._run(future, task, threads)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
