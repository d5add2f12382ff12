"""The HTTP API on Ray Serve (local cluster, loopback): two replicas holding at most two of five tasks each
answer mixed-task traffic as AdapterBank alone does, a task the admin pins reaches and stays on both replicas,
tasks of every kind on every route too, an adapter the
admin replaced never answers afterwards, and a killed replica is replaced while requests keep being answered;
one replica without a limit loads each task once and batches across tasks."""
from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from increlora.errors import IncreLoraError
from serving import AdapterBank
from tests.helpers.adapters import TAGS, TASKS, adapter_set, make_adapter
from tests.helpers.http_adapters import assert_predictions, expected
from tests.helpers.server import start_server, stop, wait_ready

INPUTS = ["great film", "bad movie", ["a good plot", "the story"], "hello", "the best movie ever", "dull"]
TOKEN = "ray-admin"
KINDS = ("search", "ner")  # an embedding task and a token-classification task beside TASKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(http_base, tmp_path_factory):
    folder = adapter_set(http_base, tmp_path_factory.mktemp("ray_adapters"))  # a tokenizer that knows its words
    make_adapter(http_base, folder, "search", seed=7, task_type="embedding")
    make_adapter(http_base, folder, "ner", len(TAGS), seed=8, task_type="token-classification")
    return folder


@pytest.fixture(scope="module")
def port(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def front(ray_cluster, adapters, app: str, *options: str):
    """`increlora-serve --ray` on the test's cluster: HTTP served by its own process, the replicas on Ray."""
    proc, url, _ = start_server(["--adapters", str(adapters), "--ray", ray_cluster.get_runtime_context().gcs_address,
                                 "--ray-app", app, "--replica-cpus", "0.25", *options], seconds=240)
    wait_ready(url, seconds=90)
    return proc, url


@pytest.fixture(scope="module")
def served(port, ray_cluster, adapters):
    """Two replicas holding at most two tasks each, behind `increlora-serve --ray`."""
    from ray import serve

    proc, url = front(ray_cluster, adapters, "increlora", "--replicas", "2", "--max-tasks-per-replica", "2",
                      "--admin-token", TOKEN, "--max-wait-ms", "2")
    try:
        yield url, AdapterBank.load(adapters, dtype="float32")
    finally:
        assert stop(proc) == 0
        assert "increlora" not in serve.status().applications  # the server removes its replicas as it stops


@pytest.fixture(scope="module")
def single(port, ray_cluster, adapters):
    """One replica without a task limit behind `increlora-serve --ray`, in a Serve application of its own."""
    proc, url = front(ray_cluster, adapters, "single", "--max-wait-ms", "50", "--max-batch-size", "64",
                      "--max-queue", "100")
    try:
        yield url, AdapterBank.load(adapters, dtype="float32")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def serve_run(port, adapters):
    """The application of `serve run` (Serve's proxy, an ingress replica) with one replica, at /serve_run."""
    from ray import serve

    from serving.http.ray_serve import build_application

    settings = {"max_wait_ms": 50.0, "max_batch_size": 64, "max_queue": 100}
    app = build_application(adapters, replicas=1, replica_cpus=0.25, settings=settings, name="serve_run",
                            dtype="float32")
    assert app._bound_deployment.max_ongoing_requests == 100  # the ingress; Serve's default is 5
    assert app._bound_deployment.init_args[0]._bound_deployment.max_ongoing_requests == 100  # the replicas
    for deployment in (app._bound_deployment, app._bound_deployment.init_args[0]._bound_deployment):
        assert deployment.logging_config["enable_access_log"] is False  # no log line per request
    serve.run(app, name="serve_run", route_prefix="/serve_run")
    url = f"http://127.0.0.1:{port}/serve_run"
    wait_ready(url, seconds=90)
    yield url, AdapterBank.load(adapters, dtype="float32")


def test_a_server_name_in_use_on_the_cluster_is_refused(served, adapters):
    from serving.http.ray_serve import build_replicas

    with pytest.raises(IncreLoraError, match="'increlora' runs on this Ray cluster already"):
        build_replicas(adapters, name="increlora")  # served's catalog has that name


def ask(url: str, task: str, inputs: list) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"task": task, "inputs": inputs}, timeout=60)


def mixed_traffic(url: str, bank: AdapterBank, n: int, senders: int = 8) -> list[int]:
    """n concurrent requests over every task, each answer checked; returns the status codes."""
    jobs = [(list(TASKS)[i % len(TASKS)], INPUTS[i % len(INPUTS):][:2] or INPUTS[:1]) for i in range(n)]
    with ThreadPoolExecutor(senders) as pool:
        responses = list(pool.map(lambda job: ask(url, *job), jobs))
    for (task, inputs), r in zip(jobs, responses):
        if r.status_code == 200:
            assert_predictions(r.json()["predictions"], expected(bank, task, inputs))
    return [r.status_code for r in responses]


def test_mixed_tasks_on_two_replicas_equal_the_bank_alone(served):
    url, bank = served
    assert mixed_traffic(url, bank, 30) == [200] * 30
    listed = httpx.get(f"{url}/v1/tasks", timeout=60).json()  # what one replica holds, the other tasks on disk
    held = [info["name"] for info in listed["tasks"]]
    assert len(held) <= 2 and sorted(held + listed["on_disk"]) == sorted([*TASKS, *KINDS]), listed
    assert listed["pinned"] == []
    assert ask(url, "nope", ["x"]).status_code == 404


def test_a_pin_reaches_every_replica_and_stays_under_the_limit(served):
    """Pinning three tasks is over the limit of 2 (409); one pinned task is held by both replicas through
    traffic over every task, each replica holding at most 2 once answered; unpinning reaches both too."""
    url, bank = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{url}/v1/pins", json={"tasks": ["sst2", "topic", "stsb"]}, headers=auth, timeout=60)
    assert r.status_code == 409 and "over the limit of 2" in r.json()["detail"], r.text
    assert httpx.post(f"{url}/v1/pins", json={"tasks": ["nope"]}, headers=auth, timeout=60).status_code == 404
    r = httpx.post(f"{url}/v1/pins", json={"tasks": ["topic"]}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json() == {"pinned": ["topic"]}, r.text
    evictions = sum(s["evictions"] for s in replica_stats("increlora", 2).values())
    assert mixed_traffic(url, bank, 30) == [200] * 30
    stats = replica_stats("increlora", 2)
    for s in stats.values():
        assert s["pinned"] == ["topic"] and "topic" in s["tasks"] and len(s["tasks"]) <= 2, s["tasks"]
    assert sum(s["evictions"] for s in stats.values()) > evictions
    r = httpx.delete(f"{url}/v1/pins/topic", headers=auth, timeout=60)
    assert r.status_code == 200 and r.json() == {"pinned": []}
    assert all(s["pinned"] == [] for s in replica_stats("increlora", 2).values())


def test_one_replica_loads_each_task_once_and_batches_across_tasks(single):
    url, bank = single
    for _ in range(3):
        assert mixed_traffic(url, bank, 30, senders=30) == [200] * 30
    (stats,) = replica_stats("single", 1).values()
    assert stats["loads"] == len(TASKS)  # once each, then kept
    assert stats["multi_task_batches"] >= 1 and stats["batches"] < 90
    # the ingress gathers past Serve's default batch of 5 requests (how far on average depends on the load)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count, up_to_8 = (float(re.search(rf"^{re.escape(f'increlora_batch_size_requests_{k}')} (\S+)$", text, re.M)
                            .group(1)) for k in ("count", 'bucket{le="8.0"}'))
    assert count - up_to_8 >= 1, (count, up_to_8)  # a batch of more than 8


@pytest.mark.parametrize("app", ["served", "single", "serve_run"])
def test_tasks_of_every_kind_answer_as_the_bank_alone_on_every_route(app, request):
    """/v1/predict of an embedding and a token-classification task, /v1/embeddings and /v1/rerank (stsb: one
    output, mrpc: two labels), sent together (one replica batches them across kinds), equal the bank's
    answers; a task of the wrong kind is 422, as on one server. After the test of loads per task (single).
    serve_run: the same through Serve's proxy and the ingress replica, mixed traffic first."""
    url, bank = request.getfixturevalue(app)
    texts = ["good film and a great plot", "the market fell"]
    rerank = {"query": "market news", "documents": texts}
    calls = [("predict", {"task": task, "inputs": texts}) for task in KINDS] + \
        [("embeddings", {"model": "search", "input": texts})] + \
        [("rerank", {"model": task, **rerank}) for task in ("stsb", "mrpc")] + \
        [("embeddings", {"model": "stsb", "input": "x"}), ("rerank", {"model": "search", **rerank}),
         ("rerank", {"model": "topic", **rerank}), ("predict", {"task": "ner", "inputs": [["a", "b"]]})]
    if app == "serve_run":
        assert mixed_traffic(url, bank, 30) == [200] * 30
    mixed = [s["multi_task_batches"] for s in replica_stats(app, 1).values()] if app == "single" else None
    with ThreadPoolExecutor(len(calls)) as pool:
        got = list(pool.map(lambda c: httpx.post(f"{url}/v1/{c[0]}", json=c[1], timeout=60), calls))
    if app == "single":
        assert [s["multi_task_batches"] for s in replica_stats(app, 1).values()][0] > mixed[0]
    assert [r.status_code for r in got] == [200] * 5 + [422] * 4, [r.text for r in got]
    for task, r in zip(KINDS, got):
        for g, w in zip(r.json()["predictions"], bank.predict(texts, [task] * len(texts)), strict=True):
            if task == "search":
                assert g["tokens"] == w["tokens"] and g["embedding"] == pytest.approx(w["embedding"], abs=1e-5)
            else:
                assert [(e["entity_group"], e["start"], e["end"]) for e in g["entities"]] == \
                    [(e["entity_group"], e["start"], e["end"]) for e in w["entities"]]
                assert [e["score"] for e in g["entities"]] == pytest.approx([e["score"] for e in w["entities"]])
    for d, w in zip(got[2].json()["data"], bank.embed(texts, "search"), strict=True):
        assert d["embedding"] == pytest.approx(w, abs=1e-5)
    for task, r in zip(("stsb", "mrpc"), got[3:5]):
        want = bank.rerank("market news", texts, task)
        assert [x["index"] for x in r.json()["results"]] == [w["index"] for w in want]
        assert [x["relevance_score"] for x in r.json()["results"]] == \
            pytest.approx([w["relevance_score"] for w in want], abs=1e-5)
    for r, words in zip(got[5:], ("sequence-classification", "embedding", "labels", "single texts")):
        assert words in r.json()["detail"]


def replica_stats(app: str, replicas: int) -> dict[str, dict]:
    """Each replica's stats, by actor name (asking until every replica has answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("BankReplica", app_name=app)
    stats: dict[str, dict] = {}
    for _ in range(50):
        got = handle.stats.remote().result()
        stats[got["actor"]] = got
        if len(stats) == replicas:
            return stats
    raise AssertionError(f"only {len(stats)} of {replicas} replicas answered")


def sst2_traffic(url: str, stop: threading.Event, log: list) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        r = ask(url, "sst2", INPUTS[:2])
        log.append((sent, r.status_code, r.json()["predictions"] if r.status_code == 200 else None))


def test_a_replaced_adapter_never_answers_after_the_admin_call(served, adapters, http_base, tmp_path):
    """DELETE, new files in the same folder, POST, with sst2 requests overlapping all along: every request sent
    after the POST returned is answered by the new adapter, by both replicas; then the old one comes back."""
    url, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    folder = adapters / "sst2"
    old_files = tmp_path / "old"
    shutil.copytree(folder, old_files)
    new = make_adapter(http_base, tmp_path / "new", "sst2", 2, seed=99)
    for files in (new, old_files):
        want = AdapterBank.load([files], dtype="float32")
        log: list[tuple[float, int, list | None]] = []  # (sent at, status, predictions)
        stop = threading.Event()
        senders = [threading.Thread(target=sst2_traffic, args=(url, stop, log)) for _ in range(4)]
        for t in senders:
            t.start()
        time.sleep(0.5)
        assert httpx.delete(f"{url}/v1/tasks/sst2", headers=auth, timeout=60).status_code == 200
        shutil.rmtree(folder)
        shutil.copytree(files, folder)
        r = httpx.post(f"{url}/v1/tasks", json={"name": "sst2"}, headers=auth, timeout=60)
        added = time.monotonic()
        assert r.status_code == 201, r.text
        time.sleep(3)
        stop.set()
        for t in senders:
            t.join()
        after = [(status, got) for sent, status, got in log if sent > added]
        assert len(after) >= 8 and all(status == 200 for status, _ in after), after
        for _, got in after:
            assert_predictions(got, expected(want, "sst2", INPUTS[:2]))
        loads = sum(s["loads"] for s in replica_stats("increlora", 2).values())
        for _ in range(10):  # the new copy stays: no load per request (Serve still counts the old one as held)
            assert ask(url, "sst2", INPUTS[:2]).status_code == 200
        assert sum(s["loads"] for s in replica_stats("increlora", 2).values()) - loads <= 2


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
    from serving.http.shutdown import DrainingServer

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    assert main(["--adapters", str(adapters), "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["--adapters", str(adapters), "--ray", "--max-tasks-per-replica", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["--adapters", str(adapters), "--ray", "--max-resident", "2", "--max-tasks-per-replica", "3"]) == 2
    assert "give one of them" in capsys.readouterr().err

    built = {}
    monkeypatch.setattr(ray_serve.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray_serve.serve, "start", lambda **options: built.update(start=options))
    monkeypatch.setattr(ray_serve, "build_replicas",
                        lambda folder, **kw: built.update(folder=folder, **kw) or ("app", f"catalog {kw['name']}"))
    monkeypatch.setattr(ray_serve.serve, "run", lambda app, name, route_prefix: built.update(
        name=name, route=route_prefix, deleted_before=built.get("deleted")) or f"handle of {app}")
    monkeypatch.setattr(ray_serve, "front_loader", lambda handle, catalog: built.update(front=(handle, catalog)))
    monkeypatch.setattr(ray_serve.serve, "delete", lambda name: built.update(deleted=name))
    left = {"increlora": "left by a server that was killed"}
    monkeypatch.setattr(ray_serve.serve, "status", lambda: SimpleNamespace(applications=left))

    def serving(server):  # this process's own uvicorn, at --host/--port, stopped by Ctrl-C
        built["http"] = (server.config.host, server.config.port)
        raise KeyboardInterrupt
    monkeypatch.setattr(DrainingServer, "run", serving)
    code = main(["--adapters", str(adapters), "--ray", "--replicas", "3", "--max-tasks-per-replica", "5",
                 "--replica-cpus", "0.5", "--admin-token", "s3cret", "--api-key", "k1", "--port", "8123",
                 "--autoscaling", '{"min_replicas": 1, "max_replicas": 4}'])
    assert code == 130 and built["deleted"] == built["name"] == "increlora"
    assert built["deleted_before"] == "increlora"  # the application of a server that was killed goes first
    assert built["start"]["proxy_location"] == "Disabled" and built["route"] is None  # no Serve proxy: HTTP here
    assert built["http"] == ("127.0.0.1", 8123) and built["front"] == ("handle of app", "catalog increlora")
    assert built["folder"] == adapters
    assert (built["replicas"], built["max_tasks_per_replica"], built["replica_cpus"]) == (3, 5, 0.5)
    assert built["autoscaling"] == {"min_replicas": 1, "max_replicas": 4}
    assert built["settings"]["admin_token"] == "s3cret"  # the replicas get the secrets themselves, not masks
    assert built["settings"]["api_keys"] == ["k1"]
    assert built["pin"] == []
    built.clear()
    code = main(["--adapters", str(adapters), "--ray", "--max-resident", "2", "--pin", "sst2,topic",
                 "--ray-app", "other"])
    assert built["deleted_before"] is None  # no application of that name: nothing removed before
    assert code == 130 and (built["max_tasks_per_replica"], built["pin"]) == (2, ["sst2", "topic"])
    assert built["deleted"] == built["name"] == "other" and built["front"][1] == "catalog other"

    def failing(app, name, route_prefix):
        raise RuntimeError("Deploying application other failed: no such base model")
    monkeypatch.setattr(ray_serve.serve, "run", failing)
    built.clear()
    assert main(["--adapters", str(adapters), "--ray", "--ray-app", "other"]) == 1
    assert "replicas did not start on Ray: Deploying application other failed" in capsys.readouterr().err
    assert built["deleted"] == "other" and "http" not in built
