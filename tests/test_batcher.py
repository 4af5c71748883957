"""The micro-batcher on its own: batches formed in its thread, answers to the right requests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.batcher import Batcher, BatchReport, Overloaded
from service.defenses.base import DeadlineExceeded, RunContext
from service.pipeline import ImageResult


def _echo(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
    """Label = the image's first pixel, so each answer shows whose image it was."""
    return [ImageResult(status="accepted", label=int(v), confidence=float(ctx.options.get("scale", 1)))
            for v in x[:, 0, 0, 0].tolist()]


def _img(v: int, n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), float(v))


def test_concurrent_requests_share_batches_and_each_gets_its_own_answers() -> None:
    reports: list[BatchReport] = []
    threads: set[str] = set()

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # a model call: the next requests queue up meanwhile
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=8, max_delay_ms=5,
                    on_batch=reports.append)
        answers = await asyncio.gather(*(b.submit(_img(i, 1 + i % 2)) for i in range(40)))
        for i, a in enumerate(answers):
            assert [r.label for r in a] == [i] * (1 + i % 2)
        await b.close()

    asyncio.run(main())
    assert sum(r.size for r in reports) == sum(1 + i % 2 for i in range(40))
    assert max(r.size for r in reports) <= 8 and len(reports) < 40  # merged, never over the limit
    assert max(r.size for r in reports) >= 6
    assert threads == {"shieldserve-batch-p"}  # the batches ran in the batcher's own thread


def test_an_idle_batcher_waits_for_requests_on_their_way_and_a_lone_one_goes_at_once() -> None:
    """company_wait_ms: the first request to reach an idle batcher waits for those admitted
    and still being decoded (`expecting`), never for requests that do not exist: alone, it
    runs at once. A request that fails before it is queued stops being waited for."""
    sizes: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        sizes.append(int(x.shape[0]))
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=8, max_delay_ms=0,
                    company_wait_ms=2000)

        async def request(v: int, decode_s: float, fail: bool = False) -> list[ImageResult] | None:
            with b.expecting(1) as on_its_way:
                await asyncio.sleep(decode_s)  # the decode, in a worker thread in the service
                if fail:
                    raise ValueError("not an image")
                return await b.submit(_img(v), expected=on_its_way)

        started = time.monotonic()
        assert [r.label for r in await request(1, 0.0)] == [1]  # alone: no wait
        assert time.monotonic() - started < 1.0 and sizes == [1]
        await asyncio.sleep(0.3)  # the batch thread back to idle (a request before that goes at once)
        # three on their way together: the first waits for the other two (decoded 0.1 s later)
        answers = await asyncio.gather(request(2, 0.0), request(3, 0.1), request(4, 0.1))
        assert [a[0].label for a in answers] == [2, 3, 4] and sizes[1:] == [3]
        # one whose decode fails is not waited for: the other goes well before 2 s
        await asyncio.sleep(0.3)
        started = time.monotonic()
        results = await asyncio.gather(request(5, 0.0), request(6, 0.05, fail=True), return_exceptions=True)
        assert results[0][0].label == 5 and isinstance(results[1], ValueError)
        assert time.monotonic() - started < 1.0 and b._arriving == 0
        await b.close()

    asyncio.run(main())


def test_an_idle_batcher_waits_briefly_for_the_clients_of_its_last_batch() -> None:
    """After a batch of k requests the first to reach the idle batcher waits for up to k, at
    most a tenth of what that batch ran (and of company_wait_ms): closed-loop clients come
    back about together. After a batch of one nothing waits."""
    sizes: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        sizes.append(int(x.shape[0]))
        time.sleep(0.8)  # a costly pipeline: a tenth of it is 80 ms
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=8, max_delay_ms=0,
                    company_wait_ms=5000)

        async def later(v: int, s: float) -> list[ImageResult]:
            await asyncio.sleep(s)
            return await b.submit(_img(v))

        # 1 alone, then 2-4, queued while it ran, as one batch of 3
        await asyncio.gather(later(1, 0.0), later(2, 0.2), later(3, 0.2), later(4, 0.2))
        assert sizes == [1, 3]
        await asyncio.sleep(0.2)
        await asyncio.gather(later(5, 0.0), later(6, 0.01), later(7, 0.02))  # back together
        assert sizes[-1] == 3
        await asyncio.sleep(0.2)
        await asyncio.gather(later(8, 0.0), later(9, 0.5))  # the wait is capped: 80 ms, not 500
        assert sizes[-2:] == [1, 1]
        await b.close()

    asyncio.run(main())


def test_behind_a_costly_batch_its_clients_join_those_queued_and_behind_a_cheap_one_nothing_waits() -> None:
    """Requests queued behind a batch go in the next one at once, except behind a costly batch
    (>= 10x company_wait_ms): then the batch thread waits, company_wait_ms at most, for that
    batch's own clients to come back, so closed-loop clients share one batch instead of
    alternating in two."""
    def sizes_for(run_s: float, back_s: float) -> list[int]:
        sizes: list[int] = []

        def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
            sizes.append(int(x.shape[0]))
            time.sleep(run_s)
            return _echo(x, ctx)

        async def main() -> None:
            b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=8, max_delay_ms=0,
                        company_wait_ms=100)

            async def client_a() -> None:  # a closed-loop client: back `back_s` after its answer
                assert [r.label for r in await b.submit(_img(1))] == [1]
                await asyncio.sleep(back_s)
                assert [r.label for r in await b.submit(_img(4))] == [4]

            async def later(v: int) -> None:  # queued while A's first batch runs
                await asyncio.sleep(run_s / 3)
                assert [r.label for r in await b.submit(_img(v))] == [v]

            await asyncio.gather(client_a(), later(2), later(3))
            await b.close()

        asyncio.run(main())
        return sizes

    assert sizes_for(1.1, 0.02) == [1, 3]  # costly (1.1 s >= 1 s): A's second request joins 2 and 3
    # cheap (0.15 s): 2 and 3 go at once, A's second after them. A is back 80 ms later here,
    # within the 100 ms a costly batch's clients are waited for, so a wait would still show
    # as [1, 3]; at 20 ms a batch thread late by that much to take 2 and 3 would show it too
    assert sizes_for(0.15, 0.08) == [1, 2, 1]


def test_max_delay_holds_the_first_request_of_an_idle_batcher_not_those_queued_behind_a_batch() -> None:
    """Waiting for company is for a batcher that was idle; requests that queued while a batch ran
    have waited already and go at once (holding them too cost ~5% of the throughput at 32
    clients with max_delay_ms 2)."""
    sizes: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        sizes.append(int(x.shape[0]))
        time.sleep(0.1)
        return _echo(x, ctx)

    async def timed(b: Batcher, v: int, after: float = 0.0) -> float:
        await asyncio.sleep(after)
        started = time.monotonic()
        assert [r.label for r in await b.submit(_img(v))] == [v]
        return time.monotonic() - started

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=2, max_delay_ms=600)
        # a and b fill a batch at once; c arrives while it runs and is queued when it finishes
        _, _, queued_behind = await asyncio.gather(timed(b, 1), timed(b, 2), timed(b, 3, after=0.03))
        # the batcher is idle again: this one waits for company. After a pause, so that the batch
        # thread is back waiting: one sent the moment c's answer arrived could reach the queue
        # before the thread has finished c's batch, and go at once as a request queued behind a
        # batch does (CI on a loaded 2-core VM: 0.10 s once)
        alone = await timed(b, 4, after=0.25)
        await b.close()
        assert queued_behind < 0.45, queued_behind  # ~0.17 s: the rest of the batch, then its own
        assert alone >= 0.55, alone  # max_delay_ms, then its own batch

    asyncio.run(main())
    assert sizes == [2, 1, 1]


def test_requests_with_different_options_never_share_a_batch() -> None:
    seen: list[tuple[float, ...]] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        seen.append(tuple({float(ctx.options.get("scale", 1))}))
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=64, max_delay_ms=20)
        answers = await asyncio.gather(*(b.submit(_img(i), options={"scale": i % 2}) for i in range(10)))
        for i, a in enumerate(answers):
            assert a[0].label == i and a[0].confidence == float(i % 2)
        await b.close()

    asyncio.run(main())
    assert len(seen) >= 2


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    calls = {"n": 0}

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("model exploded")
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=4, max_delay_ms=0)
        with pytest.raises(ValueError, match="exploded"):
            await b.submit(_img(1))
        assert (await b.submit(_img(2)))[0].label == 2
        await b.close()

    asyncio.run(main())


def test_queue_limit_deadline_cancellation_and_close() -> None:
    release = threading.Event()
    entered: list[int] = []  # batches the thread has taken (a sleep guessed it: a loaded machine lags)

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        entered.append(1)
        release.wait(5)
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=1, max_delay_ms=0, max_queue=3)
        first = asyncio.ensure_future(b.submit(_img(1)))  # taken by the thread, blocked in run
        await _until(lambda: len(entered) == 1)
        expired = asyncio.ensure_future(b.submit(_img(2), deadline=time.monotonic() + 0.01))
        dropped = asyncio.ensure_future(b.submit(_img(3)))
        kept = asyncio.ensure_future(b.submit(_img(4), options={"k": 1}))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):  # 3 images queued: the limit
            await b.submit(_img(5))
        dropped.cancel()  # the client went away: its job is skipped
        await asyncio.sleep(0.05)
        release.set()
        assert (await first)[0].label == 1
        with pytest.raises(DeadlineExceeded):
            await expired
        assert (await kept)[0].label == 4
        assert b.queued_images == 0
        # closing answers what is still queued with Overloaded, and refuses new work
        release.clear()
        running = asyncio.ensure_future(b.submit(_img(6)))
        await _until(lambda: len(entered) == 3)  # first's batch, kept's, and this one
        queued = asyncio.ensure_future(b.submit(_img(7)))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        release.set()
        await closing
        with pytest.raises(Overloaded):
            await queued
        assert (await running)[0].label == 6  # the running batch finished
        with pytest.raises(Overloaded):
            await b.submit(_img(8))

    asyncio.run(main())


def test_requests_from_two_event_loops_are_answered_on_their_own_loops() -> None:
    """One batcher, two event loops in two threads (as test clients and lifespans make): each
    future is settled on the loop that awaits it."""
    b = Batcher("p", _echo, device=torch.device("cpu"), max_batch_size=64, max_delay_ms=30)
    got: dict[int, list[int]] = {}

    def client(k: int) -> None:
        async def main() -> list[int]:
            answers = await asyncio.gather(*(b.submit(_img(10 * k + i)) for i in range(5)))
            return [a[0].label for a in answers]

        got[k] = asyncio.run(main())

    ts = [threading.Thread(target=client, args=(k,)) for k in (1, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert got == {1: [10, 11, 12, 13, 14], 2: [20, 21, 22, 23, 24]}
    asyncio.run(b.close())


def test_a_merged_batch_holds_each_request_exactly_and_shares_no_memory_with_them() -> None:
    seen: list[torch.Tensor] = []
    seeds: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        seen.append(x.clone())
        seeds.append(ctx.seed)
        x.add_(1)  # a defense may work in place on its batch
        return [ImageResult(status="accepted", label=0, confidence=1.0) for _ in range(x.shape[0])]

    xs = [torch.rand(2, 1, 3, 3), torch.rand(3, 1, 3, 3)[1:2], torch.rand(2, 1, 3, 3).transpose(2, 3)]
    before = [t.clone() for t in xs]

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=8, max_delay_ms=200)
        await asyncio.gather(*(b.submit(t) for t in xs))
        await b.close()

    asyncio.run(main())
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat(before))  # one batch, in order
    assert all(torch.equal(a, b) for a, b in zip(xs, before))  # the requests' tensors untouched
    assert 0 <= seeds[0] < 2**63


def test_a_screen_settles_images_and_requests_before_the_pipeline_runs_the_rest() -> None:
    """The query monitor's way in (Batcher `screen`): it sees the whole batch with each job's
    client; an image it answers is not run, a job it fails gets the exception, the other jobs
    their pipeline results; unscreened jobs (client None) go straight to the pipeline."""
    seen: list[tuple[list[tuple[str | None, int]], list[int]]] = []
    ran: list[list[int]] = []
    hold = threading.Event()

    entered: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        entered.append(1)
        hold.wait(5)
        ran.append([int(v) for v in x[:, 0, 0, 0].tolist()])
        return _echo(x, ctx)

    def screen(x: torch.Tensor, parts: list[tuple[str | None, int]]):
        seen.append((parts, [int(v) for v in x[:, 0, 0, 0].tolist()]))
        answered = [ImageResult(status="rejected") if int(v) == 7 else None for v in x[:, 0, 0, 0].tolist()]
        errors = [PermissionError(f"{c} blocked") if c == "bad" else None for c, _ in parts]
        return answered, errors, [c for c, _ in parts]

    reports: list[BatchReport] = []

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0,
                    screen=screen, on_batch=reports.append)
        first = asyncio.ensure_future(b.submit(_img(1), client="a"))  # runs alone, held in run()
        await _until(lambda: entered)
        queued = [asyncio.ensure_future(b.submit(torch.cat([_img(2), _img(7), _img(3)]), client="a")),
                  asyncio.ensure_future(b.submit(_img(4, 2), client="bad")),
                  asyncio.ensure_future(b.submit(_img(7), client="c"))]
        await asyncio.sleep(0.1)
        hold.set()
        assert [r.label for r in await first] == [1]
        mixed = await queued[0]
        assert [r.status for r in mixed] == ["accepted", "rejected", "accepted"]
        assert [mixed[0].label, mixed[2].label] == [2, 3]
        with pytest.raises(PermissionError, match="bad blocked"):
            await queued[1]
        assert [r.status for r in await queued[2]] == ["rejected"]
        assert [r.label for r in await b.submit(_img(5))] == [5]  # no client: not screened
        await b.close()

    asyncio.run(main())
    assert seen[1] == ([("a", 3), ("bad", 2), ("c", 1)], [2, 7, 3, 4, 4, 7])  # one call per batch
    assert len(seen) == 2 and ran == [[1], [2, 3], [5]]  # neither the rejected nor the failed job's images
    # the report holds what the requests were answered with (not the failed job's rows) and the screen's report
    assert [r.status for r in reports[1].results] == ["accepted", "rejected", "accepted", "rejected"]
    assert reports[1].screened == ["a", "bad", "c"]


async def _until(condition, timeout: float = 20.0) -> None:
    """Wait until `condition()` is true (a thread's progress), at most `timeout` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def _checking_run(sizes: list[int], ends: list[str], seconds: float = 0.3,
                  quick_from: int | None = None):
    """A run that calls ctx.check() every 10 ms for `seconds` (a sampling loop), then answers;
    a batch whose first pixel is >= `quick_from` answers at once. `ends` records how each ran out."""
    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        sizes.append(int(x.shape[0]))
        if quick_from is not None and int(x[0, 0, 0, 0]) >= quick_from:
            return _echo(x, ctx)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                ctx.check()
                time.sleep(0.01)
        except DeadlineExceeded as exc:
            ends.append(f"stopped: {exc}")
            raise
        ends.append("finished")
        return _echo(x, ctx)

    return run


def test_one_member_of_a_merged_batch_going_away_never_stops_it_for_the_others() -> None:
    """A batch runs until it is done or *every* job is gone: its deadline is the latest of its
    jobs' and `cancelled` means all of them are done (Batcher._run_jobs). One client
    disconnecting, another's deadline passing mid-run: the third gets its full results."""
    sizes: list[int] = []
    ends: list[str] = []

    async def main() -> None:
        b = Batcher("p", _checking_run(sizes, ends, seconds=2.0), device=torch.device("cpu"), max_batch_size=3,
                    max_delay_ms=2000)  # the first waits for company until the batch of 3 is full
        started = time.monotonic()
        gone = asyncio.ensure_future(b.submit(_img(1)))
        expiring = asyncio.ensure_future(b.submit(_img(2), deadline=started + 1.0))  # passes mid-run
        stays = asyncio.ensure_future(b.submit(_img(3), deadline=started + 60))
        await _until(lambda: sizes)  # polled, not slept: a loaded machine starts threads late
        assert sizes == [3] and not ends  # one merged batch, running
        gone.cancel()  # the client disconnected
        assert [r.label for r in await stays] == [3]  # after the whole run, not stopped
        assert time.monotonic() - started >= 2.0
        assert gone.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await gone
        try:  # the batch ran past its deadline: it gets the results computed for it, or DeadlineExceeded
            assert [r.label for r in await expiring] == [2]
        except DeadlineExceeded:
            pass
        assert b.queued_images == 0
        await b.close()

    asyncio.run(main())
    assert sizes == [3] and ends == ["finished"]


def test_a_batch_whose_every_request_went_away_stops_at_its_next_check_and_the_batcher_goes_on() -> None:
    sizes: list[int] = []
    ends: list[str] = []

    async def main() -> None:
        b = Batcher("p", _checking_run(sizes, ends, seconds=30.0, quick_from=3), device=torch.device("cpu"),
                    max_batch_size=2, max_delay_ms=2000)
        first = asyncio.ensure_future(b.submit(_img(1)))
        second = asyncio.ensure_future(b.submit(_img(2)))
        await _until(lambda: sizes)
        assert sizes == [2]
        first.cancel()
        await asyncio.sleep(0.05)
        assert not ends  # one still waits: the batch goes on
        second.cancel()
        stopped = time.monotonic()
        # the batch stops within a check or two, and the batch thread takes the next one
        assert [r.label for r in await b.submit(_img(3, 2))] == [3, 3]
        assert time.monotonic() - stopped < 10.0  # not the 30 s the run would take
        assert first.cancelled() and second.cancelled()
        await b.close()

    asyncio.run(main())
    assert sizes == [2, 2] and ends == ["stopped: client disconnected"]


def test_a_request_that_fails_a_merged_batch_fails_alone_and_the_others_get_their_answers() -> None:
    """One client's images must never change another's answer, a failure included: when a
    batch of several requests fails, each runs again alone; the one whose images trip the
    pipeline gets the error, the others the answers they would have had alone. A failure
    that is not a request's own (every run of it fails) reaches every request; a deadline ends
    the batch without running anyone again."""
    hold = threading.Event()
    ran: list[list[int]] = []

    entered: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        entered.append(1)
        hold.wait(5)
        values = [int(v) for v in x[:, 0, 0, 0].tolist()]
        ran.append(values)
        if 13 in values:
            raise ValueError("a defense tripped on image 13")
        if 99 in values:
            raise RuntimeError("the model is gone")
        return _echo(x, ctx)

    reports: list[BatchReport] = []

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0,
                    on_batch=reports.append)
        first = asyncio.ensure_future(b.submit(_img(1)))  # runs alone, held in run()
        await _until(lambda: entered)
        queued = [asyncio.ensure_future(b.submit(_img(2, 2))),
                  asyncio.ensure_future(b.submit(torch.cat([_img(13), _img(3)]))),
                  asyncio.ensure_future(b.submit(_img(4)))]
        await asyncio.sleep(0.1)
        hold.set()
        assert [r.label for r in await first] == [1]
        assert [r.label for r in await queued[0]] == [2, 2]
        with pytest.raises(ValueError, match="image 13"):
            await queued[1]
        assert [r.label for r in await queued[2]] == [4]
        await b.close()

    asyncio.run(main())
    # the merged batch, then each request alone; the failing one's images nowhere else
    assert ran == [[1], [2, 2, 13, 3, 4], [2, 2], [13, 3], [4]]
    assert [r.label for r in reports[-1].results] == [2, 2, 4]  # what was answered, in order

    ran.clear()

    async def everyone_fails() -> None:
        hold.clear()
        entered.clear()
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_img(1)))
        await _until(lambda: entered)
        queued = [asyncio.ensure_future(b.submit(_img(99))), asyncio.ensure_future(b.submit(_img(99)))]
        await asyncio.sleep(0.1)
        hold.set()
        await first
        for q in queued:
            with pytest.raises(RuntimeError, match="gone"):
                await q
        await b.close()

    asyncio.run(everyone_fails())
    assert ran == [[1], [99, 99], [99], [99]]


def test_a_merged_batch_past_its_deadline_is_not_run_again_request_by_request() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        calls.append(int(x.shape[0]))
        time.sleep(0.3 if len(calls) == 1 else 0)
        if len(calls) > 1:
            raise DeadlineExceeded("deadline exceeded")
        return _echo(x, ctx)

    async def main() -> None:
        b = Batcher("p", run, device=torch.device("cpu"), max_batch_size=16, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(_img(1)))
        await _until(lambda: calls)  # taken by the thread: the next two queue behind it
        queued = [asyncio.ensure_future(b.submit(_img(i), deadline=time.monotonic() + 5)) for i in (2, 3)]
        await first
        for q in queued:
            with pytest.raises(DeadlineExceeded):
                await q
        await b.close()

    asyncio.run(main())
    assert calls == [1, 2]  # the merged batch once; nobody alone after it
