"""The bank in a model process (serving.bank.ProcessBank) answers as the bank does, and fails clearly."""
from __future__ import annotations

import functools
import importlib
import os
import signal
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serving import AdapterBank, BankLoadError, DuplicateTaskError
from serving.bank.process_bank import OPENMP_WAIT_VARIABLES, ProcessBank, WorkerDiedError, _passive_openmp
from serving.http import create_app
from serving.http.model_process import ProcessBankLoader
from serving.ops.lora_segments import openmp_threads_sleep
from tests.helpers.http_adapters import make_tiny_adapters
from tests.helpers.server import close_to, process_state


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, http_base):
    return make_tiny_adapters(tmp_path_factory.mktemp("adapters"), http_base, {"sst2": 2, "topic": 3, "extra": 1})


def test_the_process_bank_answers_like_the_bank_and_follows_add_and_remove(adapter_dir):
    local = AdapterBank.load([adapter_dir / "sst2", adapter_dir / "topic", adapter_dir / "extra"], dtype="float32")
    bank = ProcessBank.start(functools.partial(AdapterBank.load, [adapter_dir / "sst2", adapter_dir / "topic"],
                                                 dtype="float32"))
    try:
        assert sorted(bank.tasks) == ["sst2", "topic"] and bank.max_length == local.max_length
        assert bank.tokenizer("good film")["input_ids"] == local.tokenizer("good film")["input_ids"]
        inputs, tasks = ["good film", ("the plot", "the actor"), "bad"], ["sst2", "topic", "topic"]
        got, want = bank.predict(inputs, tasks), local.predict(inputs, tasks)
        assert [g["task"] for g in got] == tasks and all(close_to(g, w) for g, w in zip(got, want))
        assert bank.task_info("topic")["labels"] == ["topic_0", "topic_1", "topic_2"]
        with pytest.raises(KeyError):
            bank.predict(["x"], ["nope"])
        assert bank.add(adapter_dir / "extra") == "extra" and "extra" in bank.tasks
        want = local.predict(["good"], ["extra"])[0]["value"]
        assert bank.predict(["good"], ["extra"])[0]["value"] == pytest.approx(want)
        with pytest.raises(DuplicateTaskError):
            bank.add(adapter_dir / "extra")
        bank.remove("sst2")
        assert sorted(bank.tasks) == ["extra", "topic"]
        with pytest.raises(KeyError):
            bank.remove("sst2")

        with TestClient(create_app(bank)) as client:
            assert client.get("/ready").status_code == 200
            bank._process.kill()
            bank._process.join(10)
            assert not bank.alive
            with pytest.raises(WorkerDiedError):
                bank.predict(["x"], ["topic"])
            r = client.get("/ready")
            assert r.status_code == 503 and "model process" in r.json()["detail"]
            assert client.post("/v1/predict", json={"task": "topic", "inputs": "x"}).status_code == 503
    finally:
        bank.close()


def test_a_load_error_in_the_model_process_reaches_the_caller(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankLoadError):
        ProcessBank.start(functools.partial(AdapterBank.load, tmp_path / "empty"))


def test_a_cancelled_loader_stops_the_model_process_while_it_loads():
    loader = ProcessBankLoader(functools.partial(time.sleep, 120))  # a load that would take two minutes
    outcome: list[BaseException] = []
    waiting = threading.Thread(target=lambda: outcome.extend(_raised(loader)))
    started = time.monotonic()
    waiting.start()
    while loader._process is None and time.monotonic() - started < 30:
        time.sleep(0.05)
    loader.cancel()
    waiting.join(30)
    assert not waiting.is_alive() and time.monotonic() - started < 40
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerDiedError)
    assert not loader._process.is_alive()
    with pytest.raises(WorkerDiedError):  # cancelled before the child runs: it is killed at once too
        cancelled = ProcessBankLoader(functools.partial(time.sleep, 120))
        cancelled.cancel()
        cancelled()


def _raised(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return [exc]
    return []


def _openmp_env() -> dict:
    return {v: os.environ.get(v) for v in OPENMP_WAIT_VARIABLES}


class EnvBank:
    """A stand-in bank that reports the model process's OpenMP settings."""

    tasks = ("env",)
    max_length = 8
    tokenizer = None

    def task_info(self, name: str) -> dict:
        shares = importlib.import_module("serving.ops.lora_segments").SHARE_OUT
        return {**_openmp_env(), "share_out": shares}


@pytest.mark.parametrize("preset, passive, want", [
    ({}, True, "PASSIVE"),
    ({}, False, None),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, True, "ACTIVE"),  # the user's choice wins
    ({"GOMP_SPINCOUNT": "1000"}, True, None),
])
def test_idle_openmp_threads_are_told_to_sleep_unless_the_user_chose(monkeypatch, preset, passive, want):
    for var in OPENMP_WAIT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in preset.items():
        monkeypatch.setenv(var, value)
    with _passive_openmp(passive):  # what a model process started now inherits
        assert os.environ.get("OMP_WAIT_POLICY") == want
        assert openmp_threads_sleep() is (want == "PASSIVE")  # the multi-adapter math shares out only then
    assert _openmp_env() == {v: preset.get(v) for v in OPENMP_WAIT_VARIABLES}


def test_the_model_process_starts_with_sleeping_openmp_threads(monkeypatch):
    for var in OPENMP_WAIT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    bank = ProcessBank.start(EnvBank, passive_openmp=True)
    try:
        info = bank.task_info("env")
        assert info["OMP_WAIT_POLICY"] == "PASSIVE" and info["share_out"] is True
    finally:
        bank.close()
    assert _openmp_env() == dict.fromkeys(OPENMP_WAIT_VARIABLES)


def test_close_kills_a_stopped_model_process_whose_call_holds_the_pipe_and_reaps_it():
    bank = ProcessBank.start(EnvBank, heartbeat_s=0.05)
    pid = bank.pid
    try:
        first = bank.last_beat()
        time.sleep(0.5)
        assert bank.last_beat() > first  # it beats while it runs
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        stopped = bank.last_beat()
        outcome: list[BaseException] = []
        caller = threading.Thread(target=lambda: outcome.extend(_raised(functools.partial(bank.task_info, "env"))))
        caller.start()
        while bank.busy() is None:
            time.sleep(0.01)
        time.sleep(0.3)
        assert bank.last_beat() == stopped and bank.busy()[0] == "task_info"  # silent, and the call waits
        closing = threading.Thread(target=bank.close, args=(1.0,))
        started = time.monotonic()
        closing.start()
        closing.join(10)
        caller.join(10)
        assert not closing.is_alive() and time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerDiedError)
        assert process_state(pid) is None  # killed and reaped: no zombie
    finally:
        if process_state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)


def test_a_model_process_that_does_not_load_in_time_is_killed_and_reaped():
    spawned: list = []
    with pytest.raises(WorkerDiedError, match="did not load the adapters within 1 s"):
        ProcessBank.start(functools.partial(time.sleep, 120), timeout=1, on_spawn=spawned.append)
    time.sleep(0.3)
    assert process_state(spawned[0].pid) is None  # not left as a zombie


def test_residency_figures_never_wait_behind_a_call_holding_the_pipe(adapter_dir):
    """A scrape while a batch runs (or the model hangs) answers the last figures read, at once."""
    bank = ProcessBank.start(functools.partial(AdapterBank.load, adapter_dir, max_resident=2))
    try:
        bank.predict(["good film"], ["sst2"])
        first = bank.residency_stats(wait=0.1)
        assert first["loads"] >= 1 and "sst2" in first["hits"] | first["misses"]
        with bank._lock:  # as a call in flight holds it
            t0 = time.monotonic()
            busy = bank.residency_stats(wait=0.1)
            assert time.monotonic() - t0 < 2 and busy == first
        bank.predict(["bad"], ["topic"])
        assert bank.residency_stats(wait=0.1)["loads"] == first["loads"] + 1  # fresh once the pipe is free
    finally:
        bank.close()
