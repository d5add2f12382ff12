"""A Ray Serve bank replica without a cluster (a fake catalog, the tiny base): a task is loaded once and
stays, a task the catalog replaces leaves at once, catalog answers never move it backwards, checking an
admin's adapter leaves nothing behind; with a per-replica limit, a replica holds what a model of LRU with
pins holds, never lets a task with requests in flight go, and the catalog refuses pins that do not fit."""
from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from serving import AdapterBank  # noqa: E402  (after the check that Ray is installed)
from serving.bank.errors import PinError, UnknownTaskError  # noqa: E402
from serving.http import ray_replica  # noqa: E402
from tests.helpers.adapters import TASKS, adapter_set, make_adapter  # noqa: E402
from tests.helpers.http_adapters import assert_predictions, expected  # noqa: E402

INPUTS = ["great film", "bad movie", "the best plot"]


class Remote:
    """What an actor's method is to its caller: `.remote(...)` gives something to await."""

    def __init__(self, fn) -> None:
        self.remote = fn


class FakeCatalog(ray_replica.TaskCatalog):
    """The Catalog actor as a replica calls it: `since.remote(...)` gives something to await."""

    def __init__(self, tasks: dict[str, str], max_tasks: int | None = None) -> None:
        super().__init__(tasks, (), max_tasks)
        self.since = Remote(self._since)

    def replace(self, task: str, path: str) -> None:
        self.remove(task)
        self.add(task, path)

    async def _since(self, version: int):
        return ray_replica.TaskCatalog.since(self, version)


def make_replica(http_base, tmp_path, monkeypatch, max_tasks: int | None = None, max_wait_ms: float = 1.0):
    adapters = adapter_set(http_base, tmp_path / "adapters")
    catalog = FakeCatalog({task: str(adapters / task) for task in TASKS}, max_tasks)
    monkeypatch.setattr(ray_replica.ray, "get_actor", lambda name, namespace=None: catalog)
    made = ray_replica.BankReplica({"base_model": str(http_base), "catalog": "catalog", "dtype": "float32",
                                    "max_tasks_per_replica": max_tasks, "settings": {"max_wait_ms": max_wait_ms}})
    made.test_catalog, made.test_adapters = catalog, adapters
    return made


@pytest.fixture
def replica(http_base, tmp_path, monkeypatch):
    return make_replica(http_base, tmp_path, monkeypatch)


def test_a_task_is_loaded_once_and_stays(replica):
    alone = AdapterBank.load(replica.test_adapters, dtype="float32")

    async def traffic():
        for _ in range(3):
            got = await replica.predict_many([(task, INPUTS) for task in TASKS])
            for task, answers in zip(TASKS, got):
                assert_predictions([{k: v for k, v in a.items() if k != "task"} for a in answers],
                                   expected(alone, task, INPUTS))
    asyncio.run(traffic())
    assert asyncio.run(replica.stats())["loads"] == len(TASKS)
    assert sorted(replica.bank.tasks) == sorted(TASKS)


def test_a_call_runs_at_once_not_after_a_second_batch_wait(http_base, tmp_path, monkeypatch):
    """The front waited max_wait_ms to gather the call: the replica runs it at once (calls that come during a
    forward share the next one); it used to wait max_wait_ms again."""
    replica = make_replica(http_base, tmp_path, monkeypatch, max_wait_ms=4000.0)

    async def calls():
        await replica.predict_many([("sst2", INPUTS)])  # loads the task
        started = time.monotonic()
        await asyncio.gather(*(replica.predict_many([(task, INPUTS)]) for task in ("sst2", "sst2", "sst2")))
        return time.monotonic() - started
    assert asyncio.run(calls()) < 2.0


def test_a_replaced_adapter_leaves_at_once_even_with_requests_in_flight(replica, http_base, tmp_path):
    folder = replica.test_adapters / "sst2"
    old = AdapterBank.load([folder], dtype="float32")
    new_folder = make_adapter(http_base, tmp_path / "new", "sst2", 2, seed=99)
    new = AdapterBank.load([new_folder], dtype="float32")
    assert expected(old, "sst2", INPUTS) != expected(new, "sst2", INPUTS)

    async def scenario():
        first = await replica.predict_many([("sst2", INPUTS)])
        assert_predictions(strip(first[0]), expected(old, "sst2", INPUTS))
        with replica._holding({"sst2"}):  # a request of the old adapter still in flight
            shutil.rmtree(folder)
            shutil.copytree(new_folder, folder)  # the admin's DELETE, new files, POST: same folder
            replica.test_catalog.replace("sst2", str(folder))
            after = await replica.predict_many([("sst2", INPUTS)])
        assert_predictions(strip(after[0]), expected(new, "sst2", INPUTS))
    asyncio.run(scenario())


def test_catalog_answers_never_move_the_replica_backwards(replica, http_base, tmp_path):
    catalog = replica.test_catalog
    gates: list[asyncio.Event] = []

    async def late_since(version):  # each answer is what the catalog held when asked, given when released
        answer = (catalog.version, dict(catalog.tasks), list(catalog.pins))
        gates.append(gate := asyncio.Event())
        await gate.wait()
        return answer

    async def scenario():
        catalog.since = Remote(late_since)
        first = asyncio.create_task(replica._sync())  # asks at version 0
        await asyncio.sleep(0.01)
        catalog.replace("sst2", str(make_adapter(http_base, tmp_path / "new", "sst2", 2, seed=7)))
        second = asyncio.create_task(replica._sync())  # asks at version 1
        await asyncio.sleep(0.01)
        gates[1].set()
        await second
        gates[0].set()  # the older answer comes last
        await first
    asyncio.run(scenario())
    assert replica.version == catalog.version == 2 and replica.entries == catalog.tasks


def test_checking_an_admins_adapter_leaves_nothing_behind(replica, http_base, tmp_path):
    from increlora.errors import AdapterFormatError

    async def scenario():
        await replica.predict_many([("sst2", INPUTS), ("topic", INPUTS)])
        task = await replica.check_adapter(str(make_adapter(http_base, tmp_path / "more", "extra", 3, seed=5)))
        assert task == "extra"
        broken = tmp_path / "broken"
        broken.mkdir()
        with pytest.raises(AdapterFormatError):
            await replica.check_adapter(str(broken))
    asyncio.run(scenario())
    assert sorted(replica.bank.tasks) == ["sst2", "topic"]  # the checked adapter takes no place here
    assert asyncio.run(replica.stats())["loads"] == 3


def strip(answers: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if k != "task"} for a in answers]


def test_a_limited_replica_holds_what_lru_with_pins_holds(http_base, tmp_path, monkeypatch):
    """Random single-task calls, pins and unpins on a replica holding at most 2 of 5 tasks, against a model:
    the least recently used task that is neither pinned nor in the call goes first; every answer is right."""
    replica = make_replica(http_base, tmp_path, monkeypatch, max_tasks=2)
    catalog, alone = replica.test_catalog, AdapterBank.load(replica.test_adapters, dtype="float32")
    held: list[str] = []  # the model: least recently used first
    pins: set[str] = set()

    def evict(protected: set[str]) -> None:
        while len(held) > 2:
            victim = next((t for t in held if t not in pins and t not in protected), None)
            if victim is None:
                return
            held.remove(victim)

    def model_call(task: str) -> None:
        evict({task})  # the call follows the catalog (pins changed) and loads the pins first
        for pin in sorted(pins):
            if pin not in held:
                held.append(pin)
                evict({task})
        if task in held:
            held.remove(task)
        held.append(task)
        evict({task})
        evict(set())  # answered

    rng = random.Random(30)
    names = list(TASKS)

    async def scenario():
        for _ in range(40):
            roll = rng.random()
            if roll < 0.15:
                wanted = rng.sample(names, rng.choice([1, 2, 3]))
                if len(pins | set(wanted)) > 2:
                    with pytest.raises(PinError, match="over the limit of 2"):
                        catalog.pin(wanted)
                else:
                    assert catalog.pin(wanted) == sorted(pins | set(wanted))
                    pins.update(wanted)
            elif roll < 0.25 and pins:
                gone = rng.choice(sorted(pins))
                pins.discard(gone)
                assert catalog.unpin(gone) == sorted(pins)
            else:
                task = rng.choice(names)
                (got,) = await replica.predict_many([(task, INPUTS)])
                assert_predictions(strip(got), expected(alone, task, INPUTS))
                model_call(task)
                assert list(replica.loaded) == held and sorted(replica.bank.tasks) == sorted(held)
    asyncio.run(scenario())
    stats = asyncio.run(replica.stats())
    assert stats["evictions"] > 0 and stats["pinned"] == sorted(pins)


def test_a_task_with_requests_in_flight_is_never_evicted(http_base, tmp_path, monkeypatch):
    """A limit of 1: one call wanting three tasks holds all three until it is answered, then one stays; a task
    whose request is in flight stays while other tasks come and go."""
    replica = make_replica(http_base, tmp_path, monkeypatch, max_tasks=1)
    alone = AdapterBank.load(replica.test_adapters, dtype="float32")

    async def scenario():
        three = ["sst2", "topic", "stsb"]
        got = await replica.predict_many([(task, INPUTS) for task in three])
        for task, answers in zip(three, got):
            assert not isinstance(answers, BaseException), answers
            assert_predictions(strip(answers), expected(alone, task, INPUTS))
        assert len(replica.bank.tasks) == 1
        await replica.predict_many([("mrpc", INPUTS)])
        with replica._holding({"mrpc"}):  # a request of mrpc in flight
            for task in ("sst2", "topic"):
                (answers,) = await replica.predict_many([(task, INPUTS)])
                assert_predictions(strip(answers), expected(alone, task, INPUTS))
                assert "mrpc" in replica.bank.tasks
        assert sorted(replica.bank.tasks) == ["mrpc"]
    asyncio.run(scenario())


def test_the_catalog_refuses_pins_that_do_not_fit(tmp_path):
    tasks = {name: str(tmp_path / name) for name in ("a", "b", "c")}
    with pytest.raises(PinError, match="nothing to pin"):
        ray_replica.TaskCatalog(tasks).pin(["a"])
    with pytest.raises(PinError, match="over the limit of 2 tasks per replica"):
        ray_replica.TaskCatalog(tasks, ["a", "b", "c"], max_tasks=2)
    catalog = ray_replica.TaskCatalog(tasks, ["a"], max_tasks=2)
    assert catalog.since(-1) == (0, {n: (p, 0) for n, p in tasks.items()}, ["a"])
    with pytest.raises(UnknownTaskError):
        catalog.pin(["nope"])
    with pytest.raises(PinError):
        catalog.pin(["b", "c"])
    assert catalog.pins == ["a"] and catalog.version == 0  # nothing changed
    assert catalog.pin(["b"]) == ["a", "b"] and catalog.version == 1
    catalog.remove("a")  # a removed task is no longer pinned
    assert catalog.since(1) == (2, {n: (p, 0) for n, p in tasks.items() if n != "a"}, ["b"])
    assert catalog.unpin("b") == [] and catalog.unpin("b") == [] and catalog.version == 3


def test_build_application_refuses_pins_over_the_limit_before_starting_anything(http_base, tmp_path):
    from serving.http.ray_serve import build_application

    adapters = adapter_set(http_base, tmp_path / "adapters")  # no Ray started: refused before the catalog actor
    with pytest.raises(PinError, match="over the limit of 1"):
        build_application(adapters, max_tasks_per_replica=1, pin=["sst2", "topic"], dtype="float32")
    with pytest.raises(PinError, match="nothing to pin"):
        build_application(adapters, pin=["sst2"], dtype="float32")
    with pytest.raises(UnknownTaskError):
        build_application(adapters, max_tasks_per_replica=1, pin=["nope"], dtype="float32")



def loads(replica) -> int:
    return int(replica.metrics.registry.get_sample_value("increlora_adapter_loads_total") or 0)


def test_listing_a_limited_replica_loads_nothing(http_base, tmp_path, monkeypatch):
    """held_task_infos gives the task_info of the tasks held now, loading none (not even a new pin) and leaving
    the order of use as it is; a task the catalog replaced meanwhile is not listed."""
    replica = make_replica(http_base, tmp_path, monkeypatch, max_tasks=2)
    catalog = replica.test_catalog

    async def scenario():
        for task in ("sst2", "topic", "stsb"):
            await replica.predict_many([(task, INPUTS)])
        assert list(replica.loaded) == ["topic", "stsb"] and loads(replica) == 3
        catalog.pin(["sst2"])
        for _ in range(3):
            listed = await replica.held_task_infos()
            assert listed == [replica.bank.task_info(task) for task in ("topic", "stsb")]
        assert loads(replica) == 3 and list(replica.loaded) == ["topic", "stsb"] and replica.pins == {"sst2"}
        catalog.replace("stsb", str(replica.test_adapters / "stsb"))
        assert [info["name"] for info in await replica.held_task_infos()] == ["topic"]
        assert loads(replica) == 3
    asyncio.run(scenario())



def test_a_pinned_folder_that_fails_to_load_is_not_read_again_on_every_call(http_base, tmp_path, monkeypatch, caplog):
    """A pinned task whose folder is broken is tried once per catalog generation: the other tasks' calls do
    not read it again (nor log it again); its own requests still get the error; unpinned and pinned again, or
    added again (a new generation), it is tried once more."""
    from increlora.errors import AdapterFormatError

    replica = make_replica(http_base, tmp_path, monkeypatch, max_tasks=2)
    catalog, alone = replica.test_catalog, AdapterBank.load(replica.test_adapters, dtype="float32")
    broken = tmp_path / "broken" / "extra"
    broken.mkdir(parents=True)
    catalog.add("extra", str(broken))
    catalog.pin(["extra"])
    reads: list[str] = []
    add = replica.bank.add
    monkeypatch.setattr(replica.bank, "add", lambda path: reads.append(path) or add(path))

    async def calls(*tasks: str) -> None:
        for task in tasks:
            (got,) = await replica.predict_many([(task, INPUTS)])
            assert_predictions(strip(got), expected(alone, task, INPUTS))

    async def scenario():
        await calls("sst2", "topic", "sst2", "stsb")
        assert reads.count(str(broken)) == 1
        (got,) = await replica.predict_many([("extra", INPUTS)])
        assert isinstance(got, AdapterFormatError)  # its own request tries, and gets the error
        assert reads.count(str(broken)) == 2
        await calls("sst2")
        assert reads.count(str(broken)) == 2
        catalog.unpin("extra")
        await calls("sst2")
        catalog.pin(["extra"])
        await calls("sst2", "topic")
        assert reads.count(str(broken)) == 3
        catalog.remove("extra")  # the admin adds it again, from a good folder
        catalog.add("extra", str(make_adapter(http_base, tmp_path / "good", "extra", 3, seed=5)))
        catalog.pin(["extra"])
        await calls("sst2")
        assert reads.count(str(broken)) == 3 and "extra" in replica.bank.tasks
    with caplog.at_level("ERROR", logger=ray_replica.__name__):
        asyncio.run(scenario())
    assert sum("pinned task 'extra' could not be loaded" in r.getMessage() for r in caplog.records) == 2


class Served:
    """An in-process replica and catalog as RayBank calls them (`.method.remote(...).result()` on a Serve handle,
    `.future().result()` on an actor's answer), the replica's coroutines run on a loop of their own."""

    def __init__(self, replica) -> None:
        self.replica, self.loop = replica, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def handle(self) -> Any:
        def method(name):
            def call(*args):
                answer = getattr(self.replica, name)(*args)
                value = self.run(answer) if asyncio.iscoroutine(answer) else answer
                return SimpleNamespace(result=lambda: value, future=lambda: done(value))
            return Remote(call)
        return SimpleNamespace(options=lambda multiplexed_model_id: self.handle(),
                               **{name: method(name) for name in ("describe", "task_info", "held_task_infos")})

    def catalog(self) -> Any:
        catalog = self.replica.test_catalog
        return SimpleNamespace(**{name: Remote(lambda *args, name=name: SimpleNamespace(
            future=lambda: done(getattr(ray_replica.TaskCatalog, name)(catalog, *args))))
            for name in ("since", "pin", "unpin")})

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


@pytest.mark.parametrize("max_tasks", [None, 2], ids=["every-task", "limit-2"])
def test_the_ray_fronts_task_list_loads_nothing_with_a_limit(http_base, tmp_path, monkeypatch, max_tasks):
    """GET /v1/tasks on the Ray front: with a per-replica limit, the tasks the answering replica holds, the other
    catalog tasks on disk and the catalog's pins, loading nothing; without a limit every task, as before. One
    task's info (GET /v1/tasks/{task}) still loads it."""
    from serving.http.ray_ingress import RayBank
    from serving.http.service import task_info, task_list

    replica = make_replica(http_base, tmp_path, monkeypatch, max_tasks=max_tasks)
    served = Served(replica)
    try:
        for task in ("sst2", "topic"):
            served.run(replica.predict_many([(task, INPUTS)]))
        bank = RayBank(served.handle(), served.catalog(), refresh_seconds=60.0)
        if max_tasks is None:
            listed = task_list(bank)
            assert sorted(info.name for info in listed.tasks) == sorted(TASKS)
            assert listed.on_disk is None and listed.pinned is None
            return
        assert bank.pin(["topic"]) == ["topic"]
        listed = task_list(bank)
        assert [info.model_dump() for info in listed.tasks] == [
            task_info_of(replica, task) for task in ("sst2", "topic")]
        assert listed.on_disk == [task for task in TASKS if task not in ("sst2", "topic")]
        assert listed.pinned == ["topic"]
        assert loads(replica) == 2 and list(replica.loaded) == ["sst2", "topic"]
        assert task_info(bank, "mrpc").name == "mrpc" and loads(replica) == 3
        assert sorted(info.name for info in task_list(bank).tasks) == ["mrpc", "topic"]
    finally:
        served.close()


def task_info_of(replica, task: str) -> dict:
    from serving.http.schemas import TaskInfo

    return TaskInfo.model_validate(replica.bank.task_info(task)).model_dump()
