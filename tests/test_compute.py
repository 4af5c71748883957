"""The compute thread: every torch call of a runtime on one thread (service/compute.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from service.compute import ComputeThread
from tests.conftest import png


def test_call_runs_on_the_thread_and_hands_back_results_and_errors() -> None:
    c = ComputeThread(name="t-compute")
    try:
        assert c.call(lambda: threading.current_thread().name) == "t-compute"
        assert c.call(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            c.call(lambda: 1 / 0)
        assert c.call(lambda: c.call(lambda: 7)) == 7  # from the thread itself: inline, no deadlock
    finally:
        c.close()
    with pytest.raises(RuntimeError):
        c.submit(lambda: None)


def test_a_task_runs_with_the_threads_it_asks_for() -> None:
    c = ComputeThread(threads=2)
    try:
        assert c.call(torch.get_num_threads, threads=1) == 1
        assert c.call(torch.get_num_threads) == 2  # None: all of them
        assert c.call(torch.get_num_threads, threads=8) == 2  # never more than the process's count
    finally:
        c.close()


def test_between_runs_the_tasks_queued_behind_a_long_one_in_default_grad_mode() -> None:
    """A long task that calls between() lets the queued tasks run; they see torch's default
    grad mode although the long task runs in inference_mode; one level deep only."""
    c = ComputeThread()
    seen: list[tuple[str, bool, bool]] = []
    queued = threading.Event()

    def short(tag: str) -> str:
        seen.append((tag, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        c.between()  # nested: a task that calls between() lets the rest in from here, in order
        return tag

    def long() -> int:
        steps = 0
        with torch.inference_mode():
            queued.wait(5)
            while len(seen) < 2 and steps < 1000:
                c.between()
                steps += 1
                time.sleep(0.001)
            assert torch.is_inference_mode_enabled()  # its own mode is back after the others ran
        return steps

    try:
        first = c.submit(long)
        a, b = c.submit(short, "a"), c.submit(short, "b")
        queued.set()
        assert a.result(5) == "a" and b.result(5) == "b"
        assert not first.done() or first.result() < 1000  # they ran inside the long task
        first.result(5)
        assert seen == [("a", True, False), ("b", True, False)]
    finally:
        c.close()


def test_every_pipeline_run_of_the_service_is_on_the_compute_thread(make_client, mnist) -> None:
    client = make_client(warmup=False)
    rt = client.app.state.runtime
    threads: set[str] = set()
    for b in rt.batchers.values():
        def spy(x, ctx, _run=b._run):
            threads.add(threading.current_thread().name)
            return _run(x, ctx)

        b._run = spy
    x = mnist.test.x[:1]
    for name in ("baseline", "magnet", "smoothing"):
        r = client.post(f"/predict?pipeline={name}", content=png(x[0]), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    assert threads == {rt.compute._thread.name}
    # by default the undefended classifier's batches on one intra-op thread, the defended
    # ones on all, but where a pipeline says otherwise
    assert rt._threads("baseline") == 1
    assert rt._threads("magnet") is None and rt._threads("smoothing") is None
    assert rt._threads("defensegan") is None  # its small steps gain from the second thread too
    rt.settings = rt.settings.model_copy(update={"parallel_min_cost": 100.0})
    assert rt._threads("baseline") == 1 and rt._threads("magnet") == 1
    assert rt._threads("smoothing") is None


def test_a_long_certify_lets_predict_requests_through(make_client, mnist) -> None:
    """GET/POST /certify runs on the compute thread; between its noise batches the batches
    queued behind it run, so /predict answers while a certificate is being computed."""
    client = make_client(warmup=False, certify={"max_n": 10_000_000, "batch_size": 200},
                         admission={"max_cost": 1e9})
    body = png(mnist.test.x[0])
    done: dict[str, float] = {}

    def certify() -> None:
        r = client.post("/certify?pipeline=smoothing&n=5000000", content=body,
                        headers={"Content-Type": "image/png", "X-Request-Timeout": "4"})
        done["certify"] = time.monotonic()
        done["certify_status"] = r.status_code

    t = threading.Thread(target=certify)
    t.start()
    rt = client.app.state.runtime
    deadline = time.monotonic() + 5
    while rt.compute._depth == 0 and time.monotonic() < deadline:  # the certificate has started
        time.sleep(0.005)
    r = client.post("/predict?pipeline=baseline", content=body, headers={"Content-Type": "image/png"})
    done["predict"] = time.monotonic()
    t.join(30)
    assert r.status_code == 200
    assert done["certify_status"] == 504  # it ran until its deadline...
    assert done["predict"] < done["certify"] - 1.0  # ...and /predict was answered well before
