"""The HTTP API on Ray Serve (local cluster, loopback): two replicas holding at most two of five tasks each
answer mixed-task traffic as AdapterBank alone does, admin changes reach every replica, and a killed
replica is replaced while requests keep being answered."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving import AdapterBank
from tests.helpers.adapters import TASKS, adapter_set
from tests.helpers.http_adapters import assert_predictions, expected
from tests.helpers.server import wait_ready

INPUTS = ["great film", "bad movie", ["a good plot", "the story"], "hello", "the best movie ever", "dull"]
TOKEN = "ray-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, http_base, tmp_path_factory):
    from ray import serve

    from serving.http.ray_serve import build_application

    adapters = adapter_set(http_base, tmp_path_factory.mktemp("ray_adapters"))  # a tokenizer that knows its words
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_application(adapters, replicas=2, max_tasks_per_replica=2, replica_cpus=0.25,
                            settings={"admin_token": TOKEN, "max_wait_ms": 2.0})
    serve.run(app, name="increlora", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, seconds=90)
    try:
        yield url, AdapterBank.load(adapters)
    finally:
        serve.shutdown()


def ask(url: str, task: str, inputs: list) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"task": task, "inputs": inputs}, timeout=60)


def mixed_traffic(url: str, bank: AdapterBank, n: int) -> list[int]:
    """n concurrent requests over every task, each answer checked; returns the status codes."""
    jobs = [(list(TASKS)[i % len(TASKS)], INPUTS[i % len(INPUTS):][:2] or INPUTS[:1]) for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: ask(url, *job), jobs))
    for (task, inputs), r in zip(jobs, responses):
        if r.status_code == 200:
            assert_predictions(r.json()["predictions"], expected(bank, task, inputs))
    return [r.status_code for r in responses]


def test_mixed_tasks_on_two_replicas_equal_the_bank_alone(served):
    url, bank = served
    assert httpx.get(f"{url}/v1/tasks").json()["tasks"].__len__() == len(TASKS)
    assert mixed_traffic(url, bank, 30) == [200] * 30
    assert ask(url, "nope", ["x"]).status_code == 404


def test_admin_remove_and_add_reach_every_replica(served):
    url, bank = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.delete(f"{url}/v1/tasks/sst2", headers=auth, timeout=60).status_code == 200
    assert all(ask(url, "sst2", ["x"]).status_code == 404 for _ in range(6))  # whichever replica answers
    r = httpx.post(f"{url}/v1/tasks", json={"name": "sst2"}, headers=auth, timeout=60)
    assert r.status_code == 201 and r.json()["name"] == "sst2", r.text
    for _ in range(6):
        r = ask(url, "sst2", INPUTS[:2])
        assert r.status_code == 200
        assert_predictions(r.json()["predictions"], expected(bank, "sst2", INPUTS[:2]))


def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(served):
    import ray
    from ray import serve

    url, bank = served
    handle = serve.get_deployment_handle("BankReplica", app_name="increlora")
    replicas = {handle.describe.remote().result()["actor"] for _ in range(20)}
    assert len(replicas) == 2
    killed = sorted(replicas)[0]
    ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
    codes = mixed_traffic(url, bank, 20)
    assert codes == [200] * 20  # a request caught on the dead replica is retried once on another
    deadline = time.monotonic() + 240  # a replica starts by loading the bank: minutes on a loaded 2-core machine
    while time.monotonic() < deadline:
        now = {handle.describe.remote().result()["actor"] for _ in range(20)}
        if len(now) == 2 and killed not in now:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the killed replica {killed} was not replaced: answering now {now}")
    assert mixed_traffic(url, bank, 10) == [200] * 10


def test_increlora_serve_ray_options(tmp_path, monkeypatch, capsys):
    from serving.http import ray_serve
    from serving.http.cli import main

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    assert main(["--adapters", str(adapters), "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["--adapters", str(adapters), "--ray", "--max-tasks-per-replica", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err

    built = {}
    monkeypatch.setattr(ray_serve.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray_serve.serve, "start", lambda http_options: built.update(http=http_options))
    monkeypatch.setattr(ray_serve, "build_application", lambda folder, **kw: built.update(folder=folder, **kw))
    monkeypatch.setattr(ray_serve.serve, "run", lambda app, name, route_prefix: built.update(name=name))
    monkeypatch.setattr(ray_serve.serve, "delete", lambda name: built.update(deleted=name))

    def interrupt(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(ray_serve.time, "sleep", interrupt)
    code = main(["--adapters", str(adapters), "--ray", "--replicas", "3", "--max-tasks-per-replica", "5",
                 "--replica-cpus", "0.5", "--admin-token", "s3cret", "--api-key", "k1", "--port", "8123",
                 "--autoscaling", '{"min_replicas": 1, "max_replicas": 4}'])
    assert code == 130 and built["deleted"] == built["name"] == "increlora"
    assert built["http"] == {"host": "127.0.0.1", "port": 8123} and built["folder"] == adapters
    assert (built["replicas"], built["max_tasks_per_replica"], built["replica_cpus"]) == (3, 5, 0.5)
    assert built["autoscaling"] == {"min_replicas": 1, "max_replicas": 4}
    assert built["settings"]["admin_token"] == "s3cret"  # the replicas get the secrets themselves, not masks
    assert built["settings"]["api_keys"] == ["k1"]
