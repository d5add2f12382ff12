"""Tasks loaded on first use and held by recency: eviction order and in-flight protection against a model
of LRU with pins, one load for concurrent first uses, replaced and broken folders, names, pins."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import AdapterBank, BankLoadError, UnknownTaskError
from serving.bank.errors import NoAdapterFolderError, PinError, TaskLoadError
from serving.bank.residency import Catalogue, Residency
from tests.helpers.adapters import TASKS, adapter_set, make_adapter

NAMES = [f"t{i}" for i in range(6)]


@pytest.fixture(scope="module")
def stub_catalogue(tmp_path_factory):
    """Folders t0..t5 that a stub loader 'loads' (only their config must exist for the catalogue)."""
    root = tmp_path_factory.mktemp("stubs")
    for name in NAMES:
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text("{}")
    return Catalogue(root)


class Stub:
    """A loader and unloader that record their calls; loading `name` gives a fresh object each time."""

    def __init__(self, delay: float = 0.0) -> None:
        self.loaded: list[str] = []
        self.unloaded: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def load(self, folder, name):
        time.sleep(self.delay)
        with self.lock:
            self.loaded.append(name)
        return (name, len(self.loaded))

    def unload(self, name):
        self.unloaded.append(name)


class LruModel:
    """LRU with pins and in-flight counts, the obvious way: a list, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit, self.order, self.pins, self.busy = limit, [], set(), Counter()
        self.loads = self.evictions = 0

    def acquire(self, name):
        if name in self.order:
            self.order.remove(name)
        else:
            self.loads += 1
        self.order.append(name)
        self.busy[name] += 1
        self.evict()

    def release(self, names):
        for n in names:
            self.busy[n] -= 1
        self.busy += Counter()  # drop zeros
        self.evict()

    def evict(self):
        while len(self.order) > self.limit:
            free = [n for n in self.order if n not in self.pins and not self.busy[n]]
            if not free:
                return
            self.order.remove(free[0])
            self.evictions += 1


op = st.one_of(
    st.tuples(st.just("open"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)),
    st.tuples(st.just("close"), st.integers(0, 5)),
    st.tuples(st.just("pin"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=2)),
    st.tuples(st.just("unpin"), st.sampled_from(NAMES)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 4), ops=st.lists(op, max_size=40))
def test_eviction_order_and_in_flight_protection_follow_an_lru_with_pins(stub_catalogue, limit, ops):
    stub, model = Stub(), LruModel(limit)
    res = Residency(stub_catalogue, stub.load, stub.unload, lambda a: 1, max_tasks=limit)
    open_batches: list[tuple[contextlib.AbstractContextManager, list[str]]] = []
    for kind, arg in ops:
        if kind == "open":
            cm = res.hold(arg)
            got = cm.__enter__()
            assert [g[0] for g in got] == arg  # each name's own adapter, in order
            for name in dict.fromkeys(arg):
                model.acquire(name)
            open_batches.append((cm, arg))
        elif kind == "close" and open_batches:
            cm, names = open_batches.pop(arg % len(open_batches))
            cm.__exit__(None, None, None)
            model.release(dict.fromkeys(names))
        elif kind == "pin":
            if len(model.pins | set(arg)) > limit:
                with pytest.raises(PinError, match="over the limit"):
                    res.pin(arg)
                continue
            res.pin(arg)
            for name in dict.fromkeys(arg):
                model.acquire(name)
            model.pins |= set(arg)
            model.release(dict.fromkeys(arg))
        elif kind == "unpin":
            res.unpin([arg])
            model.pins.discard(arg)
            model.evict()
        assert res.held == model.order
        assert res.pinned == sorted(model.pins)
        assert (res.loads, res.evictions) == (model.loads, model.evictions)
        in_flight = {n for _, names in open_batches for n in names}
        assert in_flight | model.pins <= set(res.held)  # never evicted while in a batch or pinned
        assert len(res.held) <= limit or set(res.held) <= in_flight | model.pins
    for cm, _ in open_batches:
        cm.__exit__(None, None, None)
    assert len(res.held) <= limit


def test_concurrent_first_uses_share_one_load(stub_catalogue):
    stub = Stub(delay=0.3)
    res = Residency(stub_catalogue, stub.load, stub.unload, lambda a: 1, max_tasks=2)
    start, got = threading.Barrier(8), []

    def use():
        start.wait()
        with res.hold(["t1"]) as adapters:
            got.append(adapters[0])

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert stub.loaded == ["t1"] and len(got) == 8 and len(set(got)) == 1
    assert res.stats()["misses"] == {"t1": 8} and res.loads == 1


def test_a_failed_load_is_shared_remembered_and_evicts_nothing(stub_catalogue):
    calls = []

    def load(folder, name):
        calls.append(name)
        if name == "t5":
            from increlora.errors import AdapterFormatError
            raise AdapterFormatError(f"{folder}: adapter_model.safetensors is corrupted")
        return name

    res = Residency(stub_catalogue, load, lambda n: None, lambda a: 1, max_tasks=2)
    with res.hold(["t0", "t1"]):
        pass
    for _ in range(3):
        with pytest.raises(TaskLoadError, match="t5.*corrupted.*tried again once its folder changes"):
            with res.hold(["t0", "t5"]):
                pass
    assert calls == ["t0", "t1", "t5"] and res.held == ["t1", "t0"] and res.load_failures == 1
    (stub_catalogue.root / "t5" / "new_file").write_text("x")  # the folder changed: tried again
    try:
        with pytest.raises(TaskLoadError):
            with res.hold(["t5"]):
                pass
        assert calls.count("t5") == 2
    finally:
        (stub_catalogue.root / "t5" / "new_file").unlink()


def test_memory_limit_counts_the_adapters_bytes(stub_catalogue):
    sizes = {"t0": 40, "t1": 40, "t2": 30, "t3": 90}
    res = Residency(stub_catalogue, lambda f, n: n, lambda n: None, sizes.__getitem__, max_bytes=100)
    for name in ["t0", "t1", "t2"]:
        with res.hold([name]):
            pass
    assert res.held == ["t1", "t2"] and res.held_bytes == 70
    with res.hold(["t3"]):
        assert res.held == ["t3"]
    with pytest.raises(PinError, match="MB"):
        res.pin(["t3", "t0"])
    assert res.pinned == []


def test_concurrent_pins_never_pass_the_task_limit(stub_catalogue):
    loading, go = threading.Event(), threading.Event()

    def load(folder, name):
        if name == "t2":  # this pin waits in its load, past its first check, while another pin lands
            loading.set()
            assert go.wait(10)
        return name

    res = Residency(stub_catalogue, load, lambda n: None, lambda a: 1, max_tasks=2)
    errors = []

    def pin_t2():
        try:
            res.pin(["t2"])
        except PinError as exc:
            errors.append(exc)

    late = threading.Thread(target=pin_t2)
    late.start()
    assert loading.wait(10)
    assert res.pin(["t0", "t1"]) == ["t0", "t1"]
    go.set()
    late.join(10)
    assert res.pinned == ["t0", "t1"] and len(errors) == 1 and "over the limit of 2" in str(errors[0])


# --- the bank ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def full(adapters):
    return AdapterBank.load(adapters, dtype="float32")


INPUTS = ["great film", ("a good plot", "the story"), "bad movie"]


def answers(bank, task):
    return bank.predict(INPUTS, [task] * len(INPUTS))


def test_a_bank_holding_two_of_five_answers_as_one_holding_all(adapters, full):
    bank = AdapterBank.load(adapters, max_resident=2, dtype="float32")
    assert bank.tasks == [] and bank.catalogue.root == adapters.resolve()
    order = list(TASKS) * 2 + ["sst2", "sst2", "tags"]
    for task in order:
        assert answers(bank, task) == answers(full, task)
        assert len(bank.tasks) <= 2
    mixed = [t for t in TASKS for _ in INPUTS]  # one batch of five tasks: all held while it runs
    assert bank.predict(INPUTS * 5, mixed) == full.predict(INPUTS * 5, mixed)
    assert len(bank.tasks) == 2
    stats = bank.residency_stats()
    assert stats["evictions"] == stats["loads"] - 2 and stats["hits"]["sst2"] >= 1


def test_first_use_under_concurrency_loads_once(adapters, full):
    bank = AdapterBank.load(adapters, max_resident=2, dtype="float32")
    start, got = threading.Barrier(6), []

    def ask():
        start.wait()
        got.append(answers(bank, "topic"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [answers(full, "topic")] * 6
    assert bank.residency_stats()["loads"] == 1


def test_a_replaced_folder_answers_with_its_new_version(tiny_base, adapters, tmp_path):
    root = tmp_path / "catalogue"
    shutil.copytree(adapters, root)
    bank = AdapterBank.load(root, max_resident=2, dtype="float32")
    before = answers(bank, "sst2")
    make_adapter(tiny_base, tmp_path / "v2", "sst2", 2, seed=42)
    new = AdapterBank.load([tmp_path / "v2" / "sst2"], dtype="float32")
    shutil.rmtree(root / "sst2")
    shutil.copytree(tmp_path / "v2" / "sst2", root / "sst2")
    assert answers(new, "sst2") != before
    for _ in range(2):
        assert answers(bank, "sst2") == answers(new, "sst2")
    assert bank.residency_stats()["loads"] == 2 and bank.tasks == ["sst2"]


def test_a_broken_folder_answers_its_problem_until_it_changes(adapters, tmp_path, full):
    root = tmp_path / "catalogue"
    shutil.copytree(adapters, root)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"task": "broken"}))
    bank = AdapterBank.load(root, max_resident=2, dtype="float32")
    answers(bank, "sst2"), answers(bank, "topic")
    for _ in range(2):
        with pytest.raises(TaskLoadError, match="'broken' cannot be loaded: .*broken"):
            bank.predict(["great film", "bad movie"], ["sst2", "broken"])
    assert sorted(bank.tasks) == ["sst2", "topic"] and bank.residency_stats()["load_failures"] == 1
    shutil.rmtree(root / "broken")
    shutil.copytree(adapters / "mrpc", root / "broken")  # now a good adapter, but of task mrpc
    with pytest.raises(TaskLoadError, match="name the folder 'mrpc'"):
        answers(bank, "broken")
    assert answers(bank, "sst2") == answers(full, "sst2")


def test_a_folder_added_after_start_is_served(adapters, tmp_path, full):
    root = tmp_path / "catalogue"
    root.mkdir()
    shutil.copytree(adapters / "sst2", root / "sst2")
    bank = AdapterBank.load(root, max_resident=1, dtype="float32")
    with pytest.raises(NoAdapterFolderError):
        answers(bank, "topic")
    shutil.copytree(adapters / "topic", root / "topic")
    assert answers(bank, "topic") == answers(full, "topic")


def test_names_outside_the_folder_are_unknown(adapters, tmp_path):
    bank = AdapterBank.load(adapters, max_resident=2, dtype="float32")
    shutil.copytree(adapters / "sst2", tmp_path / "outside")
    link = adapters / "link_out"
    os.symlink(tmp_path / "outside", link)
    try:
        for name in ["nope", "../sst2", "sst2/..", ".", "..", "/etc", f"{adapters}/sst2", "link_out", " sst2", "",
                     "x" * 300]:
            with pytest.raises(UnknownTaskError, match="no adapter folder"):
                bank.predict(["x"], [name])
    finally:
        link.unlink()
    assert bank.residency_stats()["loads"] == 0


def test_pins_are_loaded_at_start_never_evicted_and_limited(adapters, full):
    bank = AdapterBank.load(adapters, max_resident=2, pin=["stsb"], dtype="float32")
    assert bank.tasks == ["stsb"]
    for task in ["sst2", "topic", "tags", "mrpc"]:
        answers(bank, task)
        assert "stsb" in bank.tasks
    with pytest.raises(PinError, match="over the limit of 2"):
        bank.pin(["sst2", "topic"])
    assert bank.pin(["tags"]) == ["stsb", "tags"] and sorted(bank.tasks) == ["stsb", "tags"]
    assert bank.unpin(["stsb"]) == ["tags"]
    answers(bank, "sst2")
    assert sorted(bank.tasks) == ["sst2", "tags"]
    with pytest.raises(BankLoadError, match="cannot pin"):
        AdapterBank.load(adapters, max_resident=2, pin=["nope"], dtype="float32")
    with pytest.raises(BankLoadError, match="cannot pin"):
        AdapterBank.load(adapters, max_resident=1, pin=["sst2", "topic"], dtype="float32")
    with pytest.raises(PinError, match="holds every task"):
        full.pin(["sst2"])


def test_bad_limits_are_refused(adapters):
    for kw in [{"max_resident": 0}, {"max_resident": 1.5}, {"max_resident_mb": -1}, {"max_resident_mb": "1"}]:
        with pytest.raises(BankLoadError, match="max_resident"):
            AdapterBank.load(adapters, **kw)
    with pytest.raises(BankLoadError, match="folder of adapter folders"):
        AdapterBank.load(adapters / "sst2", max_resident=1, dtype="float32")


def test_start_reads_only_a_few_folders(adapters, tmp_path):
    root = tmp_path / "catalogue"
    shutil.copytree(adapters, root)
    for i in range(200):  # folders that would fail if they were read at start
        (root / f"zz{i:03d}").mkdir()
        (root / f"zz{i:03d}" / "adapter_config.json").write_text("{not json")
    bank = AdapterBank.load(root, max_resident=3, max_resident_mb=1, dtype="float32")
    assert bank.tasks == [] and bank.load_errors == {}
    with pytest.raises(TaskLoadError, match="zz007"):
        answers(bank, "zz007")


def test_evicted_tasks_give_their_packed_rows_back_on_the_triton_backend(adapters, full):
    pytest.importorskip("triton")
    bank = AdapterBank.load(adapters, max_resident=1, backend="triton", dtype="float32")
    for task in [*TASKS, "sst2"]:
        got, want = bank.logits(INPUTS[:2], [task] * 2), full.logits(INPUTS[:2], [task] * 2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    gc.collect()  # the evicted tasks' rows are given back when their objects are gone
    slots = dict(bank._registry.get(bank.residency.held[0]).lora)  # the one task held
    assert {n: store.used_rows for n, store in bank._packed.items()} == {
        n: slots[n].rank if n in slots else 0 for n in bank._packed}


def test_task_info_loads_a_task_on_disk_and_leaves_recency_alone(adapters):
    bank = AdapterBank.load(adapters, max_resident=2, dtype="float32")
    answers(bank, "sst2"), answers(bank, "topic")
    assert bank.task_info("sst2")["name"] == "sst2" and bank.residency.held == ["sst2", "topic"]
    assert bank.task_info("stsb")["problem_type"] == "regression"  # loaded: sst2 was the least recent
    assert bank.residency.held == ["topic", "stsb"]


def test_a_remove_during_a_reload_of_the_task_wins_and_leaves_bank_and_residency_agreeing(adapters, tmp_path):
    root = tmp_path / "catalogue"
    shutil.copytree(adapters, root)
    bank = AdapterBank.load(root, max_resident=2, dtype="float32")
    answers(bank, "sst2")
    config = root / "sst2" / "adapter_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # changed: reloaded
    installed, go = threading.Event(), threading.Event()
    install = bank.residency._load

    def slow_install(folder, name):  # the new version is in the registry, not yet in the residency
        task = install(folder, name)
        installed.set()
        assert go.wait(30)
        return task

    bank.residency._load = slow_install
    reload = threading.Thread(target=answers, args=(bank, "sst2"))
    reload.start()
    assert installed.wait(30)
    remove = threading.Thread(target=bank.remove, args=("sst2",))
    remove.start()
    remove.join(0.5)  # the old code removed at once, before the reload finished; the new one waits for it
    go.set()
    reload.join(30), remove.join(30)
    assert bank.residency.held == bank.tasks == []
    bank.residency._load = install
    for task in ["sst2", "topic", "tags"]:  # evictions in later batches raise nothing
        answers(bank, task)
    assert bank.residency.held == bank.tasks == ["topic", "tags"]


def test_evicting_a_task_already_gone_from_the_registry_does_not_fail_the_batch(adapters, full):
    bank = AdapterBank.load(adapters, max_resident=1, dtype="float32")
    answers(bank, "sst2")
    bank._drop("sst2")  # the registry no longer holds it; the residency still does
    assert answers(bank, "topic") == answers(full, "topic")
    assert bank.residency.held == bank.tasks == ["topic"]
