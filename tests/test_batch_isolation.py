"""One request's failure or one long task never costs another request its answer or its turn:
a failing request in a screened batch (service/batcher.py), the seeds a failed batch's requests
get when run again alone, and long tasks queued on the compute thread (service/compute.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.batcher import Batcher, BatchReport
from service.compute import ComputeThread
from service.defenses.base import RunContext
from service.pipeline import ImageResult
from tests.test_batcher import _until


def _img(v: int, n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), float(v))


def _values(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0, 0, 0].tolist()]


class Blocked(Exception):
    pass


# ---------------------------------------------------------------- A: a lone request's failure

def test_a_failing_request_does_not_fail_the_jobs_the_screen_answered() -> None:
    """Only B's rows reach the pipeline (A's image is rejected by the screen, C is blocked):
    B's failure is B's; A gets its rejection, C its own error, and the screen's report is
    recorded."""
    hold = threading.Event()
    ran: list[list[int]] = []

    entered: list[int] = []  # batches the thread has taken

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        entered.append(1)
        hold.wait(5)
        ran.append(_values(x))
        if 13 in _values(x):
            raise RuntimeError("a defense tripped on B's image")
        return [ImageResult(status="accepted", label=v) for v in _values(x)]

    def screen(x: torch.Tensor, parts: list[tuple[str | None, int]]):
        answered: list[ImageResult | None] = []
        for client, n in parts:
            answered += [ImageResult(status="rejected") if client == "A" else None] * n
        errors = [Blocked(f"{c} is blocked") if c == "C" else None for c, _ in parts]
        return answered, errors, [f"verdict {c}" for c, _ in parts]

    reports: list[BatchReport] = []

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0,
                    screen=screen, on_batch=reports.append)
        first = asyncio.ensure_future(b.submit(_img(1), client="D"))  # runs alone, held in run()
        await _until(lambda: entered)
        a = asyncio.ensure_future(b.submit(_img(0), client="A"))
        bb = asyncio.ensure_future(b.submit(_img(13, 2), client="B"))
        c = asyncio.ensure_future(b.submit(_img(0), client="C"))
        await asyncio.sleep(0.1)
        hold.set()
        assert [r.label for r in await first] == [1]
        assert [r.status for r in await a] == ["rejected"]
        with pytest.raises(RuntimeError, match="B's image"):
            await bb
        with pytest.raises(Blocked, match="C is blocked"):
            await c
        assert [r.label for r in await b.submit(_img(5), client="D")] == [5]  # the batcher goes on
        await b.close()

    asyncio.run(main())
    assert ran == [[1], [13, 13], [5]]  # B's rows once: no one else's to run again
    assert len(reports) == 3
    report = reports[1]  # the failed batch's metrics are recorded: the screen's verdicts included
    assert report.screened == ["verdict A", "verdict B", "verdict C"]
    assert [r.status for r in report.results] == ["rejected"]  # what was answered: A's rejection
    assert report.size == 4


# ---------------------------------------------------------------- C: seeds when run again alone

def _seed_recorder(hold: threading.Event, fail_on: int):
    runs: list[tuple[list[int], int]] = []
    entered: list[int] = []  # batches the thread has taken

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        entered.append(1)
        hold.wait(5)
        runs.append((_values(x), ctx.seed))
        if fail_on in _values(x):
            raise ValueError("tripped")
        return [ImageResult(status="accepted", label=v) for v in _values(x)]

    return runs, run, entered


def test_requests_run_again_alone_keep_the_seeds_they_had_in_the_batch() -> None:
    hold = threading.Event()
    runs, run, entered = _seed_recorder(hold, fail_on=13)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_img(1)))  # runs alone, held in run()
        await _until(lambda: entered)
        queued = [asyncio.ensure_future(b.submit(_img(2, 2))),
                  asyncio.ensure_future(b.submit(_img(13))),
                  asyncio.ensure_future(b.submit(_img(4, 3)))]
        await asyncio.sleep(0.1)
        hold.set()
        await first
        assert [r.label for r in await queued[0]] == [2, 2]
        with pytest.raises(ValueError):
            await queued[1]
        assert [r.label for r in await queued[2]] == [4, 4, 4]
        await b.close()

    asyncio.run(main())
    assert [v for v, _ in runs] == [[1], [2, 2, 13, 4, 4, 4], [2, 2], [13], [4, 4, 4]]
    seed = runs[1][1]
    # each request alone: the batch's seed offset by its first image's place in the batch
    assert [s for _, s in runs[2:]] == [seed, (seed + 2) % 2**63, (seed + 3) % 2**63]
    assert len({s for _, s in runs[2:]}) == 3  # never one noise stream for two requests


def test_the_seed_offset_counts_only_the_images_that_reached_the_pipeline() -> None:
    """Rows the screen answered are not in the pipeline's batch: the offset is the request's
    first image's place among those that were."""
    hold = threading.Event()
    runs, run, entered = _seed_recorder(hold, fail_on=13)

    def screen(x: torch.Tensor, parts: list[tuple[str | None, int]]):
        answered = [ImageResult(status="rejected") if v == 7 else None for v in _values(x)]
        return answered, [None] * len(parts), []

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0, screen=screen)
        first = asyncio.ensure_future(b.submit(_img(1), client="x"))
        await _until(lambda: entered)
        queued = [asyncio.ensure_future(b.submit(torch.cat([_img(7), _img(2)]), client="a")),
                  asyncio.ensure_future(b.submit(_img(13), client="b")),
                  asyncio.ensure_future(b.submit(torch.cat([_img(7), _img(4)]), client="c"))]
        await asyncio.sleep(0.1)
        hold.set()
        await first
        assert [r.status for r in await queued[0]] == ["rejected", "accepted"]
        with pytest.raises(ValueError):
            await queued[1]
        assert [r.status for r in await queued[2]] == ["rejected", "accepted"]
        await b.close()

    asyncio.run(main())
    assert [v for v, _ in runs] == [[1], [2, 13, 4], [2], [13], [4]]
    seed = runs[1][1]
    assert [s for _, s in runs[2:]] == [seed, (seed + 1) % 2**63, (seed + 2) % 2**63]


# ---------------------------------------------------------------- B: long tasks on the compute thread

def _long(c: ComputeThread, order: list, tag: str, stop: threading.Event,
          step=None) -> None:
    order.append(("start", tag))
    while not stop.is_set():
        (step or c.between)()
        time.sleep(0.002)
    order.append(("end", tag))


@pytest.mark.parametrize("how", ["run_context", "flag"])
def test_a_long_task_queued_behind_another_waits_for_it_and_batches_run_meanwhile(how: str) -> None:
    """The second long task (a second /certify: its RunContext's between is the thread's, or
    submitted with long=True) is not run inside the first's between(), where it would hold up
    every batch until it ended; a batch queued after it still runs between the first's steps."""
    c = ComputeThread(threads=1)
    order: list = []
    stop1, stop2 = threading.Event(), threading.Event()
    try:
        if how == "run_context":
            ctx1, ctx2 = RunContext(between=c.between), RunContext(between=c.between)
            l1 = c.submit(lambda ctx: _long(c, order, "L1", stop1, ctx.check), ctx1)
            deadline = time.monotonic() + 5
            while not order and time.monotonic() < deadline:
                time.sleep(0.002)
            l2 = c.submit(lambda ctx: _long(c, order, "L2", stop2, ctx.check), ctx2)
        else:
            l1 = c.submit(_long, c, order, "L1", stop1, long=True)
            deadline = time.monotonic() + 5
            while not order and time.monotonic() < deadline:
                time.sleep(0.002)
            l2 = c.submit(_long, c, order, "L2", stop2, long=True)
        s1 = c.submit(lambda: order.append(("short", c._depth)))
        s1.result(5)  # while L1 runs: in its between, one level down
        time.sleep(0.05)
        assert order == [("start", "L1"), ("short", 2)]  # L2 still queued
        stop1.set()
        l1.result(5)
        s2 = c.submit(lambda: order.append(("short", c._depth)))
        s2.result(5)  # in L2's between
        stop2.set()
        l2.result(5)
        assert order == [("start", "L1"), ("short", 2), ("end", "L1"),
                         ("start", "L2"), ("short", 2), ("end", "L2")]
    finally:
        stop1.set()
        stop2.set()
        c.close()


def test_long_tasks_keep_their_order_and_short_ones_pass_them() -> None:
    c = ComputeThread(threads=1)
    order: list = []
    stops = {t: threading.Event() for t in ("L1", "L2", "L3")}
    try:
        l1 = c.submit(_long, c, order, "L1", stops["L1"], long=True)
        deadline = time.monotonic() + 5
        while not order and time.monotonic() < deadline:
            time.sleep(0.002)
        l2 = c.submit(_long, c, order, "L2", stops["L2"], long=True)
        a = c.submit(order.append, ("short", "a"))
        l3 = c.submit(_long, c, order, "L3", stops["L3"], long=True)
        b = c.submit(order.append, ("short", "b"))
        a.result(5), b.result(5)
        for tag, fut in (("L1", l1), ("L2", l2), ("L3", l3)):
            stops[tag].set()
            fut.result(5)
        assert order == [("start", "L1"), ("short", "a"), ("short", "b"), ("end", "L1"),
                         ("start", "L2"), ("end", "L2"), ("start", "L3"), ("end", "L3")]
    finally:
        for s in stops.values():
            s.set()
        c.close()


def test_a_long_task_not_marked_long_lets_the_batches_in_from_its_own_between() -> None:
    """The auditor's r1: two long tasks that nothing marks long; the second runs inside the
    first's between(); a batch queued meanwhile runs in the second's between(), not after it."""
    c = ComputeThread(threads=1)
    order: list = []
    stop1, stop2 = threading.Event(), threading.Event()
    try:
        l1 = c.submit(_long, c, order, "L1", stop1)
        deadline = time.monotonic() + 5
        while not order and time.monotonic() < deadline:
            time.sleep(0.002)
        l2 = c.submit(_long, c, order, "L2", stop2)
        while len(order) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert order == [("start", "L1"), ("start", "L2")]  # nested: it was not known to be long
        s = c.submit(lambda: order.append(("short", c._depth)))
        s.result(5)  # while L2 still runs: from its between(), a level further down
        assert not l2.done()
        stop2.set()
        l2.result(5)
        stop1.set()
        l1.result(5)
        assert order == [("start", "L1"), ("start", "L2"), ("short", 3), ("end", "L2"), ("end", "L1")]
    finally:
        stop1.set()
        stop2.set()
        c.close()


def test_between_runs_only_what_was_queued_when_it_was_called() -> None:
    """A steady stream of batches cannot stall the long task: one between() call runs at most
    the tasks queued when it began (those queued meanwhile wait for the next one)."""
    c = ComputeThread(threads=1)
    seen: list[str] = []
    later: list = []
    go = threading.Event()

    def short() -> None:
        seen.append("first")
        later.append(c.submit(seen.append, "later"))

    def long() -> list[str]:
        go.wait(5)
        c.between()
        after_one = list(seen)
        c.between()
        return after_one

    try:
        f = c.submit(long, long=True)
        c.submit(short)
        go.set()
        assert f.result(5) == ["first"]
        assert seen == ["first", "later"]
    finally:
        c.close()


def test_what_marks_a_task_long() -> None:
    c, other = ComputeThread(threads=1), ComputeThread(threads=1)
    hold = threading.Event()
    try:
        c.submit(hold.wait, 5)  # keeps the queue in place

        def marks(*args, **kwargs) -> bool:
            c.submit(lambda *a, **k: None, *args, **kwargs)
            return c._queue[-1][3]

        assert marks(RunContext(between=c.between))
        assert marks(x=RunContext(between=c.between))
        assert marks(long=True)
        assert not marks(RunContext(between=c.between), long=False)
        assert not marks(RunContext())
        assert not marks(RunContext(between=other.between))
        assert not marks(torch.zeros(1), "between")
    finally:
        hold.set()
        c.close()
        other.close()
