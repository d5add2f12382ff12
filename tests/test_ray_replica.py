"""A Ray Serve bank replica without a cluster (a fake catalog, the tiny base): a task is loaded once and
stays, a task the catalog replaces leaves at once, catalog answers never move it backwards, and checking an
admin's adapter leaves nothing behind."""
from __future__ import annotations

import asyncio
import shutil

import pytest

pytest.importorskip("ray")

from serving import AdapterBank  # noqa: E402  (after the check that Ray is installed)
from serving.http import ray_replica  # noqa: E402
from tests.helpers.adapters import TASKS, adapter_set, make_adapter  # noqa: E402
from tests.helpers.http_adapters import assert_predictions, expected  # noqa: E402

INPUTS = ["great film", "bad movie", "the best plot"]


class Remote:
    """What an actor's method is to its caller: `.remote(...)` gives something to await."""

    def __init__(self, fn) -> None:
        self.remote = fn


class FakeCatalog:
    """The catalog's `since`, as the Catalog actor answers it."""

    def __init__(self, tasks: dict[str, str]) -> None:
        self.version, self.tasks = 0, {task: (path, 0) for task, path in tasks.items()}
        self.since = Remote(self._since)

    def replace(self, task: str, path: str) -> None:
        self.version += 1
        self.tasks[task] = (path, self.version)

    async def _since(self, version: int):
        return None if version == self.version else (self.version, dict(self.tasks))


@pytest.fixture
def replica(http_base, tmp_path, monkeypatch):
    adapters = adapter_set(http_base, tmp_path / "adapters")
    catalog = FakeCatalog({task: str(adapters / task) for task in TASKS})
    monkeypatch.setattr(ray_replica.ray, "get_actor", lambda name: catalog)
    made = ray_replica.BankReplica({"base_model": str(http_base), "catalog": "catalog",
                                    "settings": {"max_wait_ms": 1.0}})
    made.test_catalog, made.test_adapters = catalog, adapters
    return made


def test_a_task_is_loaded_once_and_stays(replica):
    alone = AdapterBank.load(replica.test_adapters)

    async def traffic():
        for _ in range(3):
            got = await replica.predict_many([(task, INPUTS) for task in TASKS])
            for task, answers in zip(TASKS, got):
                assert_predictions([{k: v for k, v in a.items() if k != "task"} for a in answers],
                                   expected(alone, task, INPUTS))
    asyncio.run(traffic())
    assert replica.stats()["loads"] == len(TASKS)
    assert sorted(replica.bank.tasks) == sorted(TASKS)


def test_a_replaced_adapter_leaves_at_once_even_with_requests_in_flight(replica, http_base, tmp_path):
    folder = replica.test_adapters / "sst2"
    old = AdapterBank.load([folder])
    new_folder = make_adapter(http_base, tmp_path / "new", "sst2", 2, seed=99)
    new = AdapterBank.load([new_folder])
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
        answer = (catalog.version, dict(catalog.tasks))
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
    assert replica.version == 1 and replica.entries == catalog.tasks


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
    assert replica.stats()["loads"] == 3


def strip(answers: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if k != "task"} for a in answers]
