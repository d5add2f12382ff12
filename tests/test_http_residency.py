"""A server that loads tasks on first use: answers, listings, pins, metrics and errors over HTTP."""
from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from fastapi.testclient import TestClient

from serving import AdapterBank
from serving.http import ServiceSettings, create_app
from serving.http.cli import main as serve_main
from tests.helpers.asgi import serving
from tests.helpers.http_adapters import assert_predictions, expected, make_tiny_adapters
from tests.helpers.server import close_to, metric, start_server, stop, wait_ready

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TASKS = {"sst2": 2, "topic": 3, "stsb": 1, "spam": 2, "news": 4}
TEXTS = ["a gripping film", "win a prize now", "the team won the vote"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, http_base):
    folder = make_tiny_adapters(tmp_path_factory.mktemp("catalogue"), http_base, TASKS)
    (folder / "broken").mkdir()
    (folder / "broken" / "adapter_config.json").write_text('{"task": "broken"}')
    return folder


@pytest.fixture(scope="module")
def full(adapter_dir):
    return AdapterBank.load([adapter_dir / t for t in TASKS], dtype="float32")


def app_for(adapter_dir, **load):
    bank = AdapterBank.load(adapter_dir, dtype="float32", **load)
    return create_app(bank, ServiceSettings(adapters=adapter_dir, admin_token=TOKEN, max_wait_ms=20))


def test_answers_listing_and_metrics_of_a_server_holding_two(adapter_dir, full):
    with TestClient(app_for(adapter_dir, max_resident=2, pin=["news"])) as client:
        assert client.get("/ready").status_code == 200
        listing = client.get("/v1/tasks").json()
        assert [t["name"] for t in listing["tasks"]] == ["news"] and listing["pinned"] == ["news"]
        assert listing["on_disk"] == sorted(["broken", *TASKS.keys() - {"news"}])
        for task in [*TASKS, *TASKS]:
            r = client.post("/v1/predict", json={"task": task, "inputs": TEXTS})
            assert r.status_code == 200
            assert_predictions(r.json()["predictions"], expected(full, task, TEXTS))
        listing = client.get("/v1/tasks").json()
        assert len(listing["tasks"]) == 2 and "news" in {t["name"] for t in listing["tasks"]}
        text = client.get("/metrics").text
        assert "increlora_tasks_held 2.0" in text and "increlora_tasks_pinned 1.0" in text
        assert "increlora_task_loads_total 9.0" in text and "increlora_task_evictions_total 7.0" in text
        assert 'increlora_task_misses_total{task="sst2"} 2.0' in text
        assert 'increlora_task_hits_total{task="news"} 2.0' in text  # listings do not count as uses
        assert "increlora_task_load_seconds_count 9.0" in text


def test_unknown_names_broken_folders_and_pins(adapter_dir, full):
    with TestClient(app_for(adapter_dir, max_resident=2)) as client:
        for name in ["nope", "../sst2", "sst2/../topic", ".hidden", "/etc"]:
            r = client.post("/v1/predict", json={"task": name, "inputs": "x"})
            assert r.status_code == 404 and "no adapter folder" in r.json()["detail"], (name, r.json())
        client.post("/v1/predict", json={"task": "sst2", "inputs": "x"})
        client.post("/v1/predict", json={"task": "topic", "inputs": "x"})
        for _ in range(2):
            r = client.post("/v1/predict", json={"task": "broken", "inputs": "x"})
            assert r.status_code == 500 and "'broken' cannot be loaded" in r.json()["detail"]
        assert sorted(t["name"] for t in client.get("/v1/tasks").json()["tasks"]) == ["sst2", "topic"]
        r = client.post("/v1/pins", json={"tasks": ["stsb", "spam", "news"]}, headers=ADMIN)
        assert r.status_code == 409 and "over the limit of 2" in r.json()["detail"]
        assert client.post("/v1/pins", json={"tasks": ["nope"]}, headers=ADMIN).status_code == 404
        assert client.post("/v1/pins", json={"tasks": ["stsb"]}).status_code in (401, 403)
        assert client.post("/v1/pins", json={"tasks": ["stsb"]}, headers=ADMIN).json() == {"pinned": ["stsb"]}
        for task in ["sst2", "topic", "spam"]:
            client.post("/v1/predict", json={"task": task, "inputs": "x"})
        assert "stsb" in {t["name"] for t in client.get("/v1/tasks").json()["tasks"]}
        assert client.delete("/v1/pins/stsb", headers=ADMIN).json() == {"pinned": []}
        r = client.post("/v1/predict", json={"task": "stsb", "inputs": TEXTS})
        assert_predictions(r.json()["predictions"], expected(full, "stsb", TEXTS))


def test_pinning_a_broken_folder_answers_as_loading_it_does(adapter_dir):
    with TestClient(app_for(adapter_dir, max_resident=2)) as client:
        load = client.post("/v1/tasks", json={"name": "broken"}, headers=ADMIN)
        pin = client.post("/v1/pins", json={"tasks": ["broken"]}, headers=ADMIN)
        assert pin.status_code == load.status_code == 422, (load.json(), pin.json())
        assert "'broken' cannot be loaded" in pin.json()["detail"]
        assert client.get("/v1/tasks").json()["pinned"] == []


def test_the_listing_loads_nothing_and_shows_a_task_evicted_meanwhile_on_disk(adapter_dir):
    from serving.http.service import task_list

    bank = AdapterBank.load(adapter_dir, max_resident=2, dtype="float32")
    for task in ["sst2", "topic"]:
        bank.predict(["x"], [task])
    names = bank.tasks  # the names a listing reads just before a batch evicts sst2

    class JustBefore:  # the bank as such a listing sees it
        def __getattr__(self, attr):
            return getattr(bank, attr)

        tasks = names

    bank.predict(["x"], ["stsb"])
    loads, held = bank.residency_stats()["loads"], bank.residency.held
    listing = task_list(JustBefore())
    assert bank.residency_stats()["loads"] == loads and bank.residency.held == held == ["topic", "stsb"]
    assert sorted(t.name for t in listing.tasks) == ["stsb", "topic"] and "sst2" in listing.on_disk


def test_pinning_a_server_holding_every_task_is_refused(adapter_dir):
    bank = AdapterBank.load([adapter_dir / "sst2"], dtype="float32")
    with TestClient(create_app(bank, ServiceSettings(adapters=adapter_dir, admin_token=TOKEN))) as client:
        r = client.post("/v1/pins", json={"tasks": ["sst2"]}, headers=ADMIN)
        assert r.status_code == 409 and "--max-resident" in r.json()["detail"]
        assert "on_disk" not in client.get("/v1/tasks").json()


def test_a_broken_task_in_a_batch_fails_alone(adapter_dir, full):
    async def run():
        async with serving(app_for(adapter_dir, max_resident=2)) as client:
            asks = [client.post("/v1/predict", json={"task": t, "inputs": TEXTS})
                    for t in ["sst2", "broken", "topic", "broken", "stsb"]]
            return await asyncio.gather(*asks)

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200, 500, 200, 500, 200]
    for r in replies:
        if r.status_code == 200:
            task = r.json()["task"]
            assert_predictions(r.json()["predictions"], expected(full, task, TEXTS))


def test_the_command_refuses_residency_options_that_do_not_fit(adapter_dir, capsys):
    assert serve_main(["--adapters", str(adapter_dir), "--pin", "sst2"]) == 2
    assert "--pin needs --max-resident" in capsys.readouterr().err
    assert serve_main(["--adapters", str(adapter_dir), "--max-resident", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert serve_main(["--adapters", str(adapter_dir / "sst2"), "--max-resident", "2"]) == 2
    assert "folder of adapter folders" in capsys.readouterr().err
    assert serve_main(["--adapters", str(adapter_dir), "--max-resident-mb", "2", "--ray", "auto"]) == 2
    assert "--max-resident-mb is not available with --ray" in capsys.readouterr().err
    assert serve_main(["--adapters", str(adapter_dir), "--pin", "sst2", "--ray", "auto"]) == 2
    assert "--pin needs --max-resident with --ray" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_server_holding_two_of_five_answers_round_robin_as_a_bank_holding_all(adapter_dir, full, tmp_path):
    root = tmp_path / "catalogue"
    shutil.copytree(adapter_dir, root)
    proc, base, _ = start_server(["--adapters", str(root), "--max-resident", "2", "--pin", "news",
                                  "--admin-token", TOKEN, "--max-wait-ms", "5"])
    try:
        wait_ready(base)
        with httpx.Client(base_url=base, timeout=30) as client:
            for task in [*TASKS, *TASKS, *TASKS]:
                r = client.post("/v1/predict", json={"task": task, "inputs": TEXTS})
                assert r.status_code == 200, r.text
                want = expected(full, task, TEXTS)
                assert all(close_to(g, w) for g, w in zip(r.json()["predictions"], want))
            assert len(client.get("/v1/tasks").json()["tasks"]) == 2
            assert client.post("/v1/predict", json={"task": "broken", "inputs": "x"}).status_code == 500
            assert client.post("/v1/predict", json={"task": "../news", "inputs": "x"}).status_code == 404
            assert client.post("/v1/pins", json={"tasks": ["sst2"]}, headers=ADMIN).json() == {
                "pinned": ["news", "sst2"]}
        assert metric(base, "increlora_task_loads_total") == 1 + 4 * 3 + 1  # the pin at start, then misses
        assert metric(base, "increlora_tasks_held") == 2
    finally:
        stop(proc)


def test_a_restarted_model_process_gets_the_admin_pins_back(adapter_dir):
    from serving.http.supervisor import TaskSet, restore

    bank = AdapterBank.load(adapter_dir, max_resident=2, pin=["news"], dtype="float32")  # as the loader starts it again
    restore(bank, TaskSet(("news", "sst2"), (), pinned=("sst2",)))
    assert bank.residency_stats()["pinned"] == ["sst2"] and "sst2" in bank.tasks
    restore(bank, TaskSet(("sst2",)))  # the admin route never used: the loader's pins stay
    assert bank.residency_stats()["pinned"] == ["sst2"]
