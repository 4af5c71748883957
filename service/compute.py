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
`defensegan` and `rmc` run whole (seconds at most, bounded by the batch size).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "shieldserve-torch", threads: int | None = None) -> None:
        # the intra-op threads a task gets unless it asks for fewer: the process's count
        self.threads = threads or torch.get_num_threads()
        self._current = self.threads  # what the thread has set now
        self._queue: deque[tuple[Future, Callable[[], Any], int | None]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._depth = 0  # on the thread: 1 while a task runs, 2 while a task runs inside another
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, threads: int | None = None, **kwargs: Any) -> "Future[T]":
        """Queue `fn(*args, **kwargs)`; `threads`: at most this many intra-op threads for it
        (None: all of `self.threads`)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the compute thread is closed")
            self._queue.append((future, lambda: fn(*args, **kwargs), threads))
            self._cond.notify()
        return future

    def call(self, fn: Callable[..., T], *args: Any, threads: int | None = None, **kwargs: Any) -> T:
        """Run `fn` on the compute thread and wait for it (inline when already on it)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, threads=threads, **kwargs).result()

    def between(self) -> None:
        """Called on the compute thread between two steps of a long task (GET /certify's noise
        batches): run the tasks queued meanwhile, then return to it. One level deep: a task
        run here does not let others in in turn. Each runs in torch's default grad mode, as
        it would on its own (the long task may be inside inference_mode)."""
        if threading.current_thread() is not self._thread or self._depth != 1:
            return
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        outer = self._current
        for future, task, threads in waiting:
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
                future, task, threads = self._queue.popleft()
            self._run(future, task, threads)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
