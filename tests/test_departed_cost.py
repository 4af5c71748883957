"""A request that leaves (its client disconnects, its deadline passes) while a batch is computing
its rows keeps its admission cost held until that batch ends: the service never has more than
`admission.max_cost` of work running. One that leaves while still queued lets go at once (the
batch thread skips it). Requests are served here as Runtime.infer serves them: an admission
hold around Batcher.submit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from service.admission import Admission
from service.batcher import Batcher, Overloaded
from service.defenses.base import DeadlineExceeded, RunContext
from service.pipeline import ImageResult


def _echo(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
    return [ImageResult(status="accepted", label=int(v)) for v in x[:, 0, 0, 0].tolist()]


def _img(v: int) -> torch.Tensor:
    return torch.full((1, 1, 2, 2), float(v))


class Gate:
    """A pipeline run that blocks until `open()`; `calls` records each run's first pixels."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        self.calls: list[list[int]] = []
        self.fail = fail

    def open(self) -> None:
        self.gate.set()

    def __call__(self, x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        self.calls.append([int(v) for v in x[:, 0, 0, 0].tolist()])
        self.started.set()
        if not self.gate.wait(30):
            raise RuntimeError("the test never opened the gate")
        if self.fail is not None:
            raise self.fail
        return _echo(x, ctx)


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll, not sleep: a loaded machine starts threads late."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


async def _request(adm: Admission, b: Batcher, x: torch.Tensor, cost: float,
                   deadline: float | None = None) -> list[ImageResult]:
    with adm.hold(cost, "a request"):  # as Runtime.infer and Runtime.classify take it
        return await b.submit(x, deadline=deadline)


def _budget_and_batcher(run: Any, merged: bool) -> tuple[Admission, Batcher]:
    """A budget of 100 units in flight, and a batcher that merges two requests into one batch
    (waiting for the second) or runs each alone at once."""
    adm = Admission(max_cost=100, max_concurrent=10)
    b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=2 if merged else 1,
                max_delay_ms=5000 if merged else 0)
    return adm, b


async def _all_back(adm: Admission) -> None:
    """Every unit and request the budget held is given back (the batch thread ends a batch
    after its answers are sent: polled, bounded)."""
    await _until(lambda: adm.cost_in_flight == 0)
    assert adm.requests_in_flight == 0


async def _gone(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_request_that_left_a_running_batch_holds_its_cost_until_the_batch_ends() -> None:
    """The audit's finding: a client that sends an expensive request next to a slow live one and
    disconnects must not free its cost while the batch still computes its rows, or a client
    that does that over and over has the service accept more than max_cost of work at once."""
    run = Gate()

    async def main() -> None:
        adm, b = _budget_and_batcher(run, merged=True)
        live = asyncio.ensure_future(_request(adm, b, _img(1), 40))
        gone = asyncio.ensure_future(_request(adm, b, _img(2), 40))
        await _until(run.started.is_set)
        assert run.calls == [[1, 2]]  # one merged batch, computing both requests' rows
        await _gone(gone)  # the request task ends at once (no one waits for its answer) ...
        assert adm.cost_in_flight == 80 and adm.requests_in_flight == 2  # ... its cost stays held
        with pytest.raises(Overloaded):  # so a new expensive request is refused: 80 + 40 > 100
            adm.admit(40, "the departed client, back again")
        adm.admit(20, "what is left")
        adm.release(20)
        run.open()
        assert [r.label for r in await live] == [1]
        await _all_back(adm)  # the batch has ended: all of it is back
        await b.close()

    asyncio.run(main())


def test_a_request_that_left_while_queued_lets_go_at_once_and_is_never_run() -> None:
    run = Gate()

    async def main() -> None:
        adm, b = _budget_and_batcher(run, merged=False)
        first = asyncio.ensure_future(_request(adm, b, _img(1), 30))
        await _until(run.started.is_set)  # the batch thread is busy with it
        queued = asyncio.ensure_future(_request(adm, b, _img(2), 40))
        await _until(lambda: b.queued_images == 1)
        assert adm.cost_in_flight == 70
        await _gone(queued)
        assert adm.cost_in_flight == 30 and adm.requests_in_flight == 1  # at once, not at the batch's end
        run.open()
        assert [r.label for r in await first] == [1]
        assert [r.label for r in await _request(adm, b, _img(3), 10)] == [3]
        assert run.calls == [[1], [3]]  # the cancelled job was skipped
        await _all_back(adm)
        await b.close()

    asyncio.run(main())


@pytest.mark.parametrize("fail", [ValueError("model exploded"), KeyboardInterrupt()])
def test_a_failing_batch_gives_back_a_departed_requests_cost_once(fail: BaseException) -> None:
    """The batch fails (a merged one runs each request again alone; a BaseException does not):
    the departed request's cost comes back exactly once, when all of that has ended."""
    run = Gate(fail=fail)

    async def main() -> None:
        adm, b = _budget_and_batcher(run, merged=True)
        live = asyncio.ensure_future(_request(adm, b, _img(1), 40))
        gone = asyncio.ensure_future(_request(adm, b, _img(2), 30))
        await _until(run.started.is_set)
        await _gone(gone)
        assert adm.cost_in_flight == 70
        run.open()
        with pytest.raises((ValueError, RuntimeError)):
            await live
        await _all_back(adm)
        # the batcher goes on, and its accounting with it
        run.fail = None
        answers = await asyncio.gather(_request(adm, b, _img(3), 10), _request(adm, b, _img(4), 10))
        assert [[r.label for r in a] for a in answers] == [[3], [4]]
        await _until(lambda: adm.cost_in_flight == 0)
        assert adm.cost_in_flight == 0 and adm.requests_in_flight == 0
        await b.close()

    asyncio.run(main())


def test_when_every_request_left_the_batch_stops_and_then_their_costs_come_back() -> None:
    stopped = threading.Event()
    started = threading.Event()

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        started.set()
        try:
            while True:  # a sampling loop: it stops at the check after its last client left
                ctx.check()
                time.sleep(0.005)
        finally:
            stopped.set()

    async def main() -> None:
        adm, b = _budget_and_batcher(run, merged=True)
        one = asyncio.ensure_future(_request(adm, b, _img(1), 40))
        two = asyncio.ensure_future(_request(adm, b, _img(2), 40))
        await _until(started.is_set)
        await _gone(one)
        assert adm.cost_in_flight == 80
        await _gone(two)
        await _until(lambda: adm.cost_in_flight == 0)
        assert stopped.is_set()  # given back only once the batch had stopped
        assert adm.requests_in_flight == 0
        await b.close()

    asyncio.run(main())


def test_closing_the_batcher_leaks_no_cost() -> None:
    """Close answers the queued requests (their holds end with them) and lets the running batch
    finish; a departed member of that batch gets its cost back when it has."""
    run = Gate()

    async def main() -> None:
        adm = Admission(max_cost=200, max_concurrent=10)
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=2, max_delay_ms=5000)
        live = asyncio.ensure_future(_request(adm, b, _img(1), 40))
        gone = asyncio.ensure_future(_request(adm, b, _img(2), 40))
        await _until(run.started.is_set)
        queued = asyncio.ensure_future(_request(adm, b, _img(3), 40))
        await _until(lambda: b.queued_images == 1)
        await _gone(gone)
        closing = asyncio.ensure_future(b.close())
        with pytest.raises(Overloaded):
            await queued
        assert adm.cost_in_flight == 80  # the running batch: the live request's and the departed one's
        run.open()
        await closing
        assert [r.label for r in await live] == [1]
        await _all_back(adm)
        with pytest.raises(Overloaded):  # refused before it queued: nothing held after
            await _request(adm, b, _img(4), 40)
        assert adm.cost_in_flight == 0 and adm.requests_in_flight == 0
        assert run.calls == [[1, 2]]

    asyncio.run(main())


def test_a_request_whose_deadline_passed_while_queued_lets_go_with_its_answer() -> None:
    run = Gate()

    async def main() -> None:
        adm, b = _budget_and_batcher(run, merged=False)
        first = asyncio.ensure_future(_request(adm, b, _img(1), 30))
        await _until(run.started.is_set)
        expired = asyncio.ensure_future(_request(adm, b, _img(2), 40, deadline=time.monotonic() - 1))
        await _until(lambda: b.queued_images == 1)
        assert adm.cost_in_flight == 70
        run.open()
        with pytest.raises(DeadlineExceeded):
            await expired
        assert [r.label for r in await first] == [1]
        await _all_back(adm)
        await b.close()

    asyncio.run(main())


def test_through_the_runtime_a_departed_request_holds_its_cost_until_its_batch_ends(make_client, mnist) -> None:
    """Runtime.infer (the /v2 path; Runtime.classify takes its hold the same way), its task
    cancelled as the disconnect watch (api.middleware) cancels it."""
    c = make_client(batching={"max_batch_size": 2, "max_delay_ms": 5000}, warmup=False)
    rt = c.app.state.runtime
    b = rt.batchers["baseline"]
    run, pipeline = Gate(), b._run
    b._run = lambda x, ctx: (run(x, ctx), pipeline(x, ctx))[1]  # the real pipeline, once let through
    each = rt.cost("baseline", 1)
    x = mnist.test.x[:2]

    async def main() -> None:
        adm = rt.admission
        live = asyncio.ensure_future(rt.infer("baseline", x[0:1]))
        gone = asyncio.ensure_future(rt.infer("baseline", x[1:2]))
        await _until(run.started.is_set)
        await _gone(gone)
        assert adm.cost_in_flight == pytest.approx(2 * each) and adm.requests_in_flight == 2
        run.open()
        [result] = await live
        assert result.status in ("accepted", "rejected", "abstained")
        await _until(lambda: adm.requests_in_flight == 0)
        assert adm.cost_in_flight == 0

    asyncio.run(main())
