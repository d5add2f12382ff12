"""The dynamic cross-task batcher against a scriptable fake bank: merging, isolation, limits, timeouts."""
from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import UnknownTaskError
from serving.http.batcher import DynamicBatcher
from serving.http.errors import (
    BatcherClosedError,
    PredictionError,
    QueueFullError,
    RequestTimeoutError,
    error_body,
    http_status,
)
from tests.helpers.fake_bank import FakeBank, answer


class Shapes:
    def __init__(self):
        self.batches, self.depths = [], []

    def observe_batch(self, requests, rows, tasks, seconds):
        self.batches.append((requests, rows, tasks))

    def set_queue_depth(self, depth):
        self.depths.append(depth)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(bank, **kw) -> DynamicBatcher:
    b = DynamicBatcher(bank, **kw)
    b.start()
    return b


async def queued(b: DynamicBatcher, n: int) -> None:
    """Wait (bounded) until n requests wait in the batcher's queue."""
    for _ in range(500):
        if b.queue_depth >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{b.queue_depth} requests queued, expected {n}")


def direct(bank, task, inputs):
    return [answer(task, x, bank._tasks[task]) for x in inputs]


def test_concurrent_requests_of_several_tasks_share_one_model_call():
    bank, shapes = FakeBank(), Shapes()

    async def go():
        b = await started(bank, max_batch_size=64, max_wait_ms=50, observer=shapes)
        reqs = [("sst2", ["a", "b"]), ("topic", ["a"]), ("stsb", [("a", "b"), "c"]), ("sst2", ["z"])]
        out = await asyncio.gather(*(b.submit(t, x, timeout=5) for t, x in reqs))
        await b.close()
        return reqs, out

    reqs, out = run(go())
    assert len(bank.calls) == 1 and sorted(set(bank.calls[0][1])) == ["sst2", "stsb", "topic"]
    for (task, inputs), got in zip(reqs, out):
        assert got == direct(bank, task, inputs)
    assert shapes.batches == [(4, 6, 3)]
    assert shapes.depths[-1] == 0


def test_request_larger_than_max_batch_size_is_answered_in_order_and_alone():
    bank = FakeBank()

    async def go():
        b = await started(bank, max_batch_size=4, max_wait_ms=20)
        big = [f"t{i}" for i in range(10)]
        out = await asyncio.gather(b.submit("sst2", big, 5), b.submit("topic", ["x"], 5))
        await b.close()
        return big, out

    big, (got_big, got_small) = run(go())
    assert got_big == direct(bank, "sst2", big) and got_small == direct(bank, "topic", ["x"])
    assert [len(c[0]) for c in bank.calls] == [4, 4, 2, 1]  # the big one in chunks, before the next request


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.tuples(st.sampled_from(["sst2", "topic", "stsb"]), st.integers(1, 7)),
                     min_size=1, max_size=12),
       max_batch=st.integers(1, 9))
def test_every_request_gets_its_own_answers_and_batches_respect_the_row_limit(sizes, max_batch):
    bank = FakeBank()
    reqs = [(task, [f"r{i}x{j}" for j in range(n)]) for i, (task, n) in enumerate(sizes)]

    async def go():
        b = await started(bank, max_batch_size=max_batch, max_wait_ms=2)
        out = await asyncio.gather(*(b.submit(t, x, 5) for t, x in reqs))
        await b.close()
        return out

    for (task, inputs), got in zip(reqs, run(go())):
        assert got == direct(bank, task, inputs)
    assert all(len(inputs) <= max_batch for inputs, _ in bank.calls)
    assert sum(len(inputs) for inputs, _ in bank.calls) == sum(n for _, n in sizes)


def test_full_queue_refuses_with_queue_full_error():
    bank = FakeBank()
    bank.gate = threading.Event()

    async def go():
        b = await started(bank, max_batch_size=1, max_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(b.submit("sst2", ["running"], 5))
        await asyncio.to_thread(bank.entered.wait, 5)  # the worker holds it: the queue is empty again
        waiting = [asyncio.ensure_future(b.submit("sst2", [f"q{i}"], 5)) for i in range(2)]
        await queued(b, 2)
        with pytest.raises(QueueFullError) as exc:
            await b.submit("sst2", ["one too many"], 5)
        bank.gate.set()
        done = await asyncio.gather(first, *waiting)
        await b.close()
        return exc.value, done

    err, done = run(go())
    assert err.status_code == 503 and err.headers["Retry-After"] == "1"
    assert [d[0]["task"] for d in done] == ["sst2"] * 3


def test_timeout_answers_504_frees_the_slot_and_the_worker_goes_on():
    bank = FakeBank()
    bank.gate = threading.Event()

    async def go():
        b = await started(bank, max_batch_size=1, max_wait_ms=0, max_queue=1)
        stuck = asyncio.ensure_future(b.submit("sst2", ["slow"], 0.2))
        await asyncio.to_thread(bank.entered.wait, 5)
        with pytest.raises(RequestTimeoutError):
            await b.submit("topic", ["waits"], 0.1)  # times out in the queue
        assert b.queue_depth == 0
        with pytest.raises(RequestTimeoutError):
            await stuck  # times out while the model runs it
        bank.gate.set()
        after = await b.submit("topic", ["later"], 5)
        await b.close()
        return after

    assert run(go()) == direct(bank, "topic", ["later"])
    assert all("waits" not in c[0] for c in bank.calls)


def test_task_removed_mid_flight_fails_only_its_requests():
    bank = FakeBank()
    bank.gate = threading.Event()

    async def go():
        b = await started(bank, max_batch_size=32, max_wait_ms=0)
        blocker = asyncio.ensure_future(b.submit("stsb", ["first"], 5))
        await asyncio.to_thread(bank.entered.wait, 5)
        doomed = asyncio.ensure_future(b.submit("topic", ["x", "y"], 5))
        kept = [asyncio.ensure_future(b.submit(t, [t + "!"], 5)) for t in ("sst2", "stsb")]
        await queued(b, 3)
        bank.remove("topic")
        bank.gate.set()
        results = await asyncio.gather(blocker, doomed, *kept, return_exceptions=True)
        await b.close()
        return results

    blocker, doomed, sst2, stsb = run(go())
    assert isinstance(doomed, UnknownTaskError) and doomed.removed and http_status(doomed) == 404
    body = error_body(doomed)
    assert "removed" in body["detail"] and "topic" not in body["known_tasks"]
    assert sst2 == direct(bank, "sst2", ["sst2!"]) and stsb == direct(bank, "stsb", ["stsb!"])
    assert blocker == direct(bank, "stsb", ["first"])


def test_a_failing_input_fails_only_its_request_and_the_worker_survives():
    bank = FakeBank()
    bank.fail_on = {"boom"}

    async def go():
        b = await started(bank, max_batch_size=32, max_wait_ms=30)
        out = await asyncio.gather(b.submit("sst2", ["fine"], 5), b.submit("topic", ["ok", "boom"], 5),
                                   b.submit("stsb", ["good"], 5), return_exceptions=True)
        again = await b.submit("sst2", ["still up"], 5)
        await b.close()
        return out, again

    (fine, boom, good), again = run(go())
    assert isinstance(boom, PredictionError) and boom.status_code == 500 and "ValueError" in boom.message
    assert fine == direct(bank, "sst2", ["fine"]) and good == direct(bank, "stsb", ["good"])
    assert again == direct(bank, "sst2", ["still up"])


def test_a_bank_answering_the_wrong_task_is_an_error_not_an_answer():
    class Swapping(FakeBank):
        def predict(self, inputs, tasks):
            return super().predict(inputs, ["sst2"] * len(tasks))

    async def go():
        b = await started(Swapping(), max_wait_ms=0)
        with pytest.raises(PredictionError):
            await b.submit("topic", ["x"], 5)
        await b.close()

    run(go())


def test_close_fails_queued_requests_and_refuses_new_ones():
    bank = FakeBank()
    bank.gate = threading.Event()

    async def go():
        b = await started(bank, max_batch_size=1, max_wait_ms=0)
        running = asyncio.ensure_future(b.submit("sst2", ["a"], 5))
        await asyncio.to_thread(bank.entered.wait, 5)
        waiting = asyncio.ensure_future(b.submit("sst2", ["b"], 5))
        await queued(b, 1)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.02)
        assert not closing.done()  # it waits for the running batch
        bank.gate.set()
        await closing
        with pytest.raises(BatcherClosedError):
            await b.submit("sst2", ["c"], 5)
        return await asyncio.gather(running, waiting, return_exceptions=True)

    running, waiting = run(go())
    assert running == direct(bank, "sst2", ["a"]) and isinstance(waiting, BatcherClosedError)


def test_close_answers_the_running_batch_503_when_the_model_does_not_finish_within_the_grace_time():
    bank = FakeBank()
    bank.gate = threading.Event()  # the model never finishes (a hung model process)

    async def go():
        b = await started(bank, max_batch_size=1, max_wait_ms=0)
        running = asyncio.ensure_future(b.submit("sst2", ["a"], 30))
        await asyncio.to_thread(bank.entered.wait, 5)
        await asyncio.wait_for(b.close(grace_s=0.2), 3)
        return await asyncio.gather(running, return_exceptions=True)

    try:
        (running,) = run(go())
    finally:
        bank.gate.set()
    assert isinstance(running, BatcherClosedError) and "did not finish" in str(running)
