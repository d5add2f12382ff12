"""The ingress of the Ray Serve application without a cluster (fakes of the replicas and the catalog):
listing tasks never waits on the catalog, and gathered batches go out without waiting for those in flight."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, RayActorError  # noqa: E402

from serving.bank.errors import UnknownTaskError  # noqa: E402  (after the check that Ray is installed)
from serving.http.errors import BatcherClosedError, PredictionError  # noqa: E402
from serving.http.ray_ingress import RayBank, RayBatcher  # noqa: E402


class Ref:
    """An ObjectRef as RayBank uses it: `.future()`."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def future(self) -> Future:
        return self._future


class Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


def done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class Described:
    def result(self):
        return {"max_length": 64, "tokenizer": None, "max_tasks_per_replica": None}


class FakeCatalog:
    """Answers `since` at once until `hold` is set; then the test answers the fetches in `pending`."""

    def __init__(self) -> None:
        self.pending: list[Future] = []
        self.hold = False
        self.since = Remote(self._since)

    def _since(self, version):
        if not self.hold:
            return Ref(done((0, {"sst2": ("a", 0)}, [])))
        self.pending.append(Future())
        return Ref(self.pending[-1])


def ray_bank(catalog) -> RayBank:
    replicas = type("Replicas", (), {"describe": Remote(lambda: Described())})()
    return RayBank(replicas, catalog, refresh_seconds=0.0)


def test_listing_tasks_never_waits_on_the_catalog():
    catalog = FakeCatalog()
    bank = ray_bank(catalog)
    assert bank.tasks == ["sst2"]
    catalog.hold = True  # the catalog stops answering
    started = time.perf_counter()
    for _ in range(20):
        assert bank.tasks == ["sst2"] and "sst2" in bank
    assert time.perf_counter() - started < 0.5
    assert len(catalog.pending) == 1  # one fetch at a time
    catalog.pending[0].set_result((2, {"sst2": ("a", 0), "topic": ("b", 2)}, []))
    assert bank.tasks == ["sst2", "topic"]
    catalog.pending[1].set_result((1, {"sst2": ("a", 0)}, []))  # an older answer, arriving later
    assert bank.tasks == ["sst2", "topic"]


class SlowBank:
    """RayBank.answer with calls the test releases; each request's answer names its task and inputs."""

    def __init__(self) -> None:
        self.tasks = ["sst2", "topic"]
        self.calls: list[tuple[list, asyncio.Event]] = []

    async def answer(self, requests):
        self.calls.append((requests, release := asyncio.Event()))
        await release.wait()
        return [UnknownTaskError(task, self.tasks) if task == "gone" else [{"task": task, "x": inputs}]
                for task, inputs in requests]


def running_batcher(bank: SlowBank, max_batch_size: int) -> RayBatcher:
    batcher = RayBatcher(bank, max_batch_size=max_batch_size, max_wait_ms=1.0, max_queue=16)
    batcher.start()
    return batcher


async def sent(bank: SlowBank, calls: int) -> None:
    while len(bank.calls) < calls:
        await asyncio.sleep(0.001)


def test_gathered_batches_go_out_without_waiting_for_those_in_flight():
    async def scenario():
        bank = SlowBank()
        batcher = running_batcher(bank, max_batch_size=8)
        first = asyncio.create_task(batcher.submit("sst2", ["a"], 5))
        await sent(bank, 1)
        second = [asyncio.create_task(batcher.submit(t, [t], 5)) for t in ("topic", "gone")]
        await sent(bank, 2)  # while the first call is still unanswered
        assert [r for r, _ in bank.calls] == [[("sst2", ["a"])], [("topic", ["topic"]), ("gone", ["gone"])]]
        for _, release in reversed(bank.calls):
            release.set()
        assert await first == [{"task": "sst2", "x": ["a"]}]
        assert await second[0] == [{"task": "topic", "x": ["topic"]}]
        with pytest.raises(UnknownTaskError):
            await second[1]
        await batcher.close()
    asyncio.run(asyncio.wait_for(scenario(), 10))


class FakeReplicas:
    """Replicas with a per-replica task limit: each task's call answers its requests, except those `failing`
    names, which raise their errors in turn (one per call); records which calls were awaited."""

    def __init__(self, failing: dict[str, list[BaseException]]) -> None:
        self.failing = failing
        self.awaited: list[str] = []
        self.describe = Remote(lambda: type("Limited", (), {"result": lambda _: {
            "max_length": 64, "tokenizer": None, "max_tasks_per_replica": 2}})())

    def options(self, multiplexed_model_id):
        return type("Handle", (), {"predict_many": Remote(lambda requests: self._call(multiplexed_model_id,
                                                                                      requests))})()

    async def _call(self, task, requests):
        self.awaited.append(task)
        await asyncio.sleep(0)
        if self.failing.get(task):
            raise self.failing[task].pop(0)
        return [[{"task": t, "x": x}] for t, x in requests]


@pytest.mark.parametrize("errors", [[RuntimeError("boom")], [ActorDiedError(), RayActorError()]],
                         ids=["error", "replica-gone-twice"])
def test_a_failed_task_call_fails_only_its_own_requests(errors):
    replicas = FakeReplicas({"bad": list(errors)})
    bank = RayBank(replicas, FakeCatalog(), refresh_seconds=0.0)
    requests = [("sst2", ["a"]), ("bad", ["b"]), ("topic", ["c"]), ("bad", ["d"])]
    outcomes = asyncio.run(bank.answer(requests))
    assert outcomes[0] == [{"task": "sst2", "x": ["a"]}] and outcomes[2] == [{"task": "topic", "x": ["c"]}]
    assert isinstance(outcomes[1], PredictionError) and outcomes[3] is outcomes[1]
    assert sorted(replicas.awaited) == sorted(["sst2", "topic"] + ["bad"] * len(errors))  # every call awaited


def test_close_answers_the_calls_in_flight_after_the_grace():
    async def scenario():
        bank = SlowBank()
        batcher = running_batcher(bank, max_batch_size=1)
        quick = asyncio.create_task(batcher.submit("sst2", ["a"], 30))
        hung = asyncio.create_task(batcher.submit("topic", ["b"], 30))
        await sent(bank, 2)
        asyncio.get_running_loop().call_later(0.05, bank.calls[0][1].set)  # answers within the grace
        started = time.perf_counter()
        await batcher.close(grace_s=0.5)
        assert time.perf_counter() - started < 2.0
        assert await quick == [{"task": "sst2", "x": ["a"]}]
        with pytest.raises(BatcherClosedError):
            await asyncio.wait_for(hung, 1.0)  # at once, not after its own 30 s timeout
        await asyncio.sleep(0)
        assert not batcher._calls  # the hung call was cancelled
    asyncio.run(asyncio.wait_for(scenario(), 10))
