"""Supervision of the model process (serving.http.supervisor) on stand-in children: restarts with the task
set of the moment, the retried prediction, back-off, the crash-loop limit, hung children killed, the request
that kills the model found, and what the app answers meanwhile."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serving.http import ServiceSettings, create_app
from serving.http.cli import main as serve_main
from serving.http.errors import ModelFailedError, ModelRestartingError
from serving.http.supervisor import RestartPolicy, SupervisedBank, TaskSet, restore
from tests.helpers.asgi import in_the_model, in_the_queue, post_later, serving
from tests.helpers.fake_bank import FakeBank, answer
from tests.helpers.fake_child import FakeStarter, adapter_path

FAST = RestartPolicy(max_crashes=3, window_s=60, backoff_s=0.05, max_backoff_s=0.2)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def model_hung(self, detail):
        self.events.append(("hung", detail))

    def model_down(self, detail):
        self.events.append(("down", detail))

    def model_up(self, recovery_s):
        self.events.append(("up", recovery_s))

    def model_failed(self, detail):
        self.events.append(("failed", detail))


def supervised(policy: RestartPolicy = FAST, retry_wait_s: float = 5.0) -> tuple[SupervisedBank, FakeStarter]:
    starter = FakeStarter()
    return SupervisedBank(starter.start(), starter, policy, retry_wait_s), starter


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_restart_policy_backs_off_from_the_second_crash_and_refuses_nonsense():
    policy = RestartPolicy(max_crashes=9, backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    for bad in ({"max_crashes": 0}, {"window_s": 0}, {"backoff_s": -1}, {"heartbeat_timeout_s": 0}):
        with pytest.raises(ValueError, match="--max-crashes"):
            RestartPolicy(**bad)


def test_the_command_refuses_a_crash_limit_below_one(tmp_path, capsys):
    assert serve_main(["--adapters", str(tmp_path), "--max-crashes", "0"]) == 2
    assert "--max-crashes (max_crashes) >= 1" in capsys.readouterr().err


def test_restore_drops_removed_tasks_and_loads_admin_added_ones_again(caplog):
    bank = FakeBank()  # sst2, topic, stsb
    task_set = TaskSet(("sst2", "extra", "gone"), (("extra", adapter_path("extra")), ("gone", "/nowhere/gone")))
    bank.add = lambda path, add=bank.add: add(path) if "nowhere" not in str(path) else (_ for _ in ()).throw(
        FileNotFoundError(path))
    assert sorted(restore(bank, task_set).tasks) == ["extra", "sst2"]
    assert "'gone'" in caplog.text and "no longer load" in caplog.text


def test_a_dead_child_is_replaced_by_one_serving_the_tasks_of_that_moment():
    bank, starter = supervised()
    recorder = Recorder()
    bank.listen(recorder)
    try:
        assert bank.add(adapter_path("extra")) == "extra"
        bank.remove("stsb")
        first = starter.children[0]
        first.kill()
        wait_until(lambda: bank.state == "up" and bank.pid != first.pid)
        assert starter.task_sets[-1] == TaskSet(("sst2", "topic", "extra"), (("extra", adapter_path("extra")),))
        assert sorted(bank.tasks) == ["extra", "sst2", "topic"]
        assert bank.predict(["good"], ["extra"]) == [answer("extra", "good", ["no", "yes"])]
        assert [e[0] for e in recorder.events] == ["down", "up"]
        assert f"model process {first.pid} ended (exit code -9)" in recorder.events[0][1]
    finally:
        bank.close()


class PinningBank(FakeBank):
    """A FakeBank with pins, as a bank with a residency limit has them: removing a task drops its pin."""

    def __init__(self, pins=()):
        super().__init__()
        self.pins = set(pins)

    def pin(self, tasks):
        self.pins |= set(tasks)
        return sorted(self.pins)

    def remove(self, task):
        super().remove(task)
        self.pins.discard(task)

    def residency_stats(self):
        return {"pinned": sorted(self.pins)}


@pytest.mark.parametrize("admin_pinned", [True, False])
def test_a_removed_task_is_not_pinned_again_by_a_restart(admin_pinned):
    bank, starter = supervised()
    try:
        first = starter.children[0]
        first.bank = PinningBank(() if admin_pinned else ["sst2", "topic"])  # else pinned at start (--pin)
        bank.catalogue = first.bank  # anything but None: the bank has a residency limit
        if admin_pinned:
            assert bank.pin(["sst2", "topic"]) == ["sst2", "topic"]
        bank.remove("sst2")
        first.kill()
        wait_until(lambda: bank.state == "up" and bank.pid != first.pid)
        assert starter.task_sets[-1].pinned == ("topic",) and "sst2" not in starter.task_sets[-1].tasks
    finally:
        bank.close()


def test_a_prediction_running_when_the_child_dies_is_retried_once_on_the_next():
    bank, starter = supervised()
    first = starter.children[0]
    first.bank.gate = threading.Event()
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(bank.predict(["good film"], ["sst2"])))
    worker.start()
    try:
        assert first.bank.entered.wait(5)
        first.kill()
        wait_until(lambda: len(starter.children) == 2)
        first.bank.gate.set()  # the dead child's call now fails: the prediction goes to the new child
        worker.join(10)
        assert outcome == [[answer("sst2", "good film", ["negative", "positive"])]]
        assert len(starter.children[1].bank.calls) == 1
    finally:
        bank.close()


def test_a_retry_that_fails_too_is_answered_503():
    bank, starter = supervised(retry_wait_s=0.5)
    starter.children[0].kill()
    wait_until(lambda: len(starter.children) == 2 and bank.state == "up")
    second = starter.children[1]
    second.bank.gate = threading.Event()
    errors: list[BaseException] = []

    def predict():
        try:
            bank.predict(["x"], ["sst2"])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    worker = threading.Thread(target=predict)
    worker.start()
    try:
        assert second.bank.entered.wait(5)
        starter.gate = threading.Event()  # the third child never comes while the retry waits
        second.kill()
        second.bank.gate.set()
        worker.join(10)
        assert not worker.is_alive() and isinstance(errors[0], ModelRestartingError)
    finally:
        starter.gate.set()
        bank.close()


def test_failed_starts_count_as_crashes_and_back_off():
    policy = RestartPolicy(max_crashes=4, window_s=60, backoff_s=0.3, max_backoff_s=1.0)
    bank, starter = supervised(policy)
    try:
        starter.fail = 1
        killed = time.monotonic()
        starter.children[0].kill()
        wait_until(lambda: len(starter.children) == 2 and bank.state == "up")
        assert len(starter.task_sets) == 3  # the first start, the failed one, the one that serves
        assert time.monotonic() - killed >= 0.3  # the second attempt waited its back-off
    finally:
        bank.close()


def test_at_the_crash_limit_the_bank_gives_up_and_says_why():
    bank, starter = supervised()
    recorder = Recorder()
    bank.listen(recorder)
    try:
        for n in range(1, 3):
            starter.children[-1].kill()
            wait_until(lambda n=n: len(starter.children) == n + 1 and bank.state == "up")
        starter.children[-1].kill()
        wait_until(lambda: bank.state == "failed")
        assert "3 crashes of the model process within 60 s (--max-crashes 3)" in bank.detail
        assert recorder.events[-1][0] == "failed" and len(starter.children) == 3
        with pytest.raises(ModelFailedError, match="no longer answers"):
            bank.predict(["x"], ["sst2"])
    finally:
        bank.close()


def test_close_cancels_a_start_and_no_restart_follows():
    bank, starter = supervised()
    bank.close()
    starter.children[0].kill()
    time.sleep(0.2)
    assert starter.cancelled.is_set() and bank.state == "closed" and len(starter.task_sets) == 1
    with pytest.raises(ModelRestartingError, match="shutting down"):
        bank.predict(["x"], ["sst2"])


# --- what the app answers ---------------------------------------------------------------------------

def test_the_app_answers_503_with_retry_after_while_restarting_and_serves_after():
    bank, starter = supervised()
    app = create_app(bank, ServiceSettings(max_wait_ms=0))
    try:
        with TestClient(app) as c:
            starter.gate = threading.Event()  # hold the restart
            starter.children[0].kill()
            wait_until(lambda: bank.state == "restarting")
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "restarting" and r.headers["Retry-After"] == "1"
            r = c.post("/v1/predict", json={"task": "sst2", "inputs": "x"})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "restart" in r.json()["detail"]
            assert c.get("/health").status_code == 200
            starter.gate.set()
            wait_until(lambda: bank.state == "up")
            assert c.get("/ready").status_code == 200
            assert c.post("/v1/predict", json={"task": "sst2", "inputs": "x"}).status_code == 200
            metrics = c.get("/metrics").text
            assert "increlora_model_crashes_total 1.0" in metrics and "increlora_model_restarts_total 1.0" in metrics
            assert "increlora_model_recovery_seconds_count 1.0" in metrics and "increlora_model_up 1.0" in metrics
    finally:
        bank.close()


def test_queued_requests_get_503_at_once_and_the_running_one_is_retried():
    bank, starter = supervised()
    first = starter.children[0]
    first.bank.gate = threading.Event()
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0))

    async def go():
        async with serving(app) as c:
            running = await in_the_model(c, first.bank)
            queued = await in_the_queue(c, app)
            starter.gate = threading.Event()  # the new child comes only when the test says
            first.kill()
            refused = await asyncio.wait_for(queued, 5)  # answered before any new child serves
            starter.gate.set()
            first.bank.gate.set()
            return refused, await asyncio.wait_for(running, 10)

    try:
        refused, retried = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        bank.close()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert retried.status_code == 200
    assert retried.json()["predictions"][0]["label"] == answer("sst2", "runs", ["negative", "positive"])["label"]


def test_health_fails_once_the_server_stopped_restarting():
    bank, starter = supervised(RestartPolicy(max_crashes=1))
    with TestClient(create_app(bank, ServiceSettings())) as c:
        starter.children[0].kill()
        wait_until(lambda: bank.state == "failed")
        health, ready = c.get("/health"), c.get("/ready")
        predicted = c.post("/v1/predict", json={"task": "sst2", "inputs": "x"})
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "stopped restarting" in health.json()["detail"] and "--max-crashes 1" in health.json()["detail"]
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert predicted.status_code == 503 and "stopped restarting" in predicted.json()["detail"]
    assert len(starter.task_sets) == 1


# --- a model process that hangs ---------------------------------------------------------------------

def test_a_stopped_child_is_killed_restarted_and_its_waiting_requests_get_503_meanwhile():
    bank, starter = supervised(RestartPolicy(max_crashes=3, window_s=60, backoff_s=0.05, heartbeat_timeout_s=0.3))
    first = starter.children[0]
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0))

    async def go():
        async with serving(app) as c:
            starter.gate = threading.Event()  # the new child comes only when the test says
            first.stop()  # as SIGSTOP: no heartbeat, and the call below waits
            running = post_later(c, "runs")
            while first.busy() is None:
                await asyncio.sleep(0.01)
            queued = await in_the_queue(c, app)
            refused = await asyncio.wait_for(queued, 5)  # answered once the hang is seen, before any new child
            health, ready = await c.get("/health"), await c.get("/ready")
            starter.gate.set()
            retried = await asyncio.wait_for(running, 10)
            return refused, health, ready, retried, (await c.get("/metrics")).text

    try:
        refused, health, ready, retried, metrics = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        bank.close()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1" and "hung" in refused.json()["detail"]
    assert health.status_code == 200 and health.json()["model"] == "restarting"
    assert f"model process {first.pid} hung (no heartbeat for" in health.json()["detail"]
    assert ready.status_code == 503 and ready.json()["status"] == "restarting"
    assert retried.status_code == 200 and first.exitcode == -9
    assert "increlora_model_hangs_total 1.0" in metrics and "increlora_model_crashes_total 1.0" in metrics
    assert "increlora_model_restarts_total 1.0" in metrics


def test_a_call_past_its_deadline_is_killed_as_hung_and_retried_on_the_next_child():
    policy = RestartPolicy(max_crashes=3, window_s=60, backoff_s=0.05, heartbeat_timeout_s=5, call_timeout_s=0.3)
    bank, starter = supervised(policy)
    recorder = Recorder()
    bank.listen(recorder)
    first = starter.children[0]
    first.bank.gate = threading.Event()  # the child beats but never finishes the call
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(bank.predict(["good film"], ["sst2"])))
    worker.start()
    try:
        wait_until(lambda: recorder.events and recorder.events[0][0] == "hung")
        first.bank.gate.set()  # the killed child's call now returns, as a dead child's: the retry goes on
        worker.join(10)
        assert outcome == [[answer("sst2", "good film", ["negative", "positive"])]]
        assert "one predict call ran for" in recorder.events[0][1] and "deadline of 0.3 s" in recorder.events[0][1]
        assert first.exitcode == -9 and len(starter.children) == 2
    finally:
        first.bank.gate.set()
        bank.close()


def test_a_hang_counts_as_a_crash():
    bank, starter = supervised(RestartPolicy(max_crashes=1, heartbeat_timeout_s=0.3))
    try:
        starter.children[0].stop()
        wait_until(lambda: bank.state == "failed")
        assert "hung (no heartbeat" in bank.detail and "1 crashes of the model process" in bank.detail
        assert len(starter.children) == 1
    finally:
        bank.close()


# --- a request that kills the model process ----------------------------------------------------------

def test_a_request_that_kills_the_model_process_gets_500_its_batch_is_answered_and_it_counts_once():
    bank, starter = supervised(RestartPolicy(max_crashes=3, window_s=60, backoff_s=0.05, max_backoff_s=0.2))
    starter.crash_on.add("poison")
    app = create_app(bank, ServiceSettings(max_wait_ms=300))
    bodies = [("sst2", "good film"), ("topic", "poison"), ("sst2", "bad plot"), ("stsb", "one two")]

    async def go():
        async with serving(app) as c:
            batch = await asyncio.gather(*(post_later(c, x, task) for task, x in bodies))  # one batch
            alone = await c.post("/v1/predict", json={"task": "sst2", "inputs": "poison"})
            await asyncio.to_thread(wait_until, lambda: bank.state == "up" and len(starter.children) == 6)
            return batch, alone, (await c.get("/metrics")).text

    try:
        batch, alone, metrics = asyncio.run(asyncio.wait_for(go(), 30))
        assert [r.status_code for r in batch] == [200, 500, 200, 200]
        for (task, x), r in zip(bodies, batch):
            if r.status_code == 200:
                want, got = answer(task, x, FakeBank()._tasks[task]), r.json()["predictions"][0]
                assert (got.get("label"), got.get("value")) == (want.get("label"), want.get("value"))
        assert "each time it ran this request (1 input(s))" in batch[1].json()["detail"]
        assert alone.status_code == 500 and "not retried" in alone.json()["detail"]
        # five deaths (the batch, its retry, the poison alone; the lone poison, its retry), each poison counted once
        assert "increlora_model_crashes_total 5.0" in metrics
        starter.children[-1].kill()  # one more crash reaches the limit of 3
        wait_until(lambda: bank.state == "failed")
        assert "3 crashes of the model process" in bank.detail
    finally:
        bank.close()


def test_a_request_that_hangs_the_model_process_gets_500_and_its_batch_is_answered():
    policy = RestartPolicy(max_crashes=5, window_s=60, backoff_s=0.05, max_backoff_s=0.2, heartbeat_timeout_s=5,
                           call_timeout_s=0.3)
    bank, starter = supervised(policy)
    starter.hang_on.add("stuck")
    app = create_app(bank, ServiceSettings(max_wait_ms=300))
    bodies = [("sst2", "good film"), ("topic", "stuck"), ("sst2", "bad plot")]

    async def go():
        async with serving(app) as c:
            batch = await asyncio.gather(*(post_later(c, x, task) for task, x in bodies))  # one batch
            await asyncio.to_thread(wait_until, lambda: bank.state == "up")
            after = await c.post("/v1/predict", json={"task": "sst2", "inputs": "fine"})
            return batch, after, (await c.get("/metrics")).text

    try:
        batch, after, metrics = asyncio.run(asyncio.wait_for(go(), 30))
        assert [r.status_code for r in batch] == [200, 500, 200]
        assert "each time it ran this request (1 input(s))" in batch[1].json()["detail"]
        for (task, x), r in zip(bodies, batch):
            if r.status_code == 200:
                want = answer(task, x, FakeBank()._tasks[task])
                assert r.json()["predictions"][0].get("label") == want.get("label")
        assert after.status_code == 200
        # the batch, its retry and the request alone each hung a child: three hangs, one crash per request
        assert "increlora_model_hangs_total 3.0" in metrics
    finally:
        bank.close()
