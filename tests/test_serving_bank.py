"""AdapterBank: loading, answers equal to each adapter alone, add/remove, refusals, input errors."""
from __future__ import annotations

import gc
import json
import pickle
import re
import shutil

import pytest
import torch

from increlora import AdapterFormatError, BaseModelMismatchError, export_peft, model_fingerprint, read_adapter
from serving import (
    AdapterBank,
    AdapterShapeError,
    BankLoadError,
    DuplicateTaskError,
    InputError,
    NonFiniteOutputError,
    UnknownTaskError,
)
from tests.helpers.adapters import TASKS, adapter_set, encode, make_adapter, reference_model


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bank(adapters):
    return AdapterBank.load(adapters, dtype="float32")


def ref(tiny_base, adapter_dir, tokenizer, text):
    enc = encode(tokenizer, text)
    with torch.no_grad():
        return reference_model(tiny_base, adapter_dir)(**enc).logits[0]


INPUTS = ["great film", ("a good plot", "the story"), "bad movie", "hello world", ("win", "prize now"),
          "the best movie ever"]


def test_loads_every_adapter_of_the_folder(bank, tiny_base):
    assert sorted(bank.tasks) == sorted(TASKS)
    assert bank.load_errors == {}
    assert bank.max_length == 64
    assert bank.base_model == str(tiny_base)
    assert bank.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # the GPU by default
    assert bank.dtype == torch.float32


def test_mixed_batch_equals_each_adapter_alone(tiny_base, adapters, bank):
    tasks = ["sst2", "topic", "stsb", "tags", "sst2", "mrpc"]
    for x, t, got in zip(INPUTS, tasks, bank.logits(INPUTS, tasks)):
        assert got.shape == (TASKS[t][0],)
        torch.testing.assert_close(got, ref(tiny_base, adapters / t, bank.tokenizer, x), atol=1e-5, rtol=1e-5)


def test_a_batch_of_one_task_equals_its_rows_in_a_mixed_batch(bank):
    tasks = ["topic", "sst2", "topic", "stsb", "topic", "tags"]
    mixed = bank.logits(INPUTS, tasks)
    rows = [i for i, t in enumerate(tasks) if t == "topic"]
    alone = bank.logits([INPUTS[i] for i in rows], "topic")
    for i, got in zip(rows, alone):
        torch.testing.assert_close(mixed[i], got, atol=1e-5, rtol=1e-5)


def test_answers_per_problem_type(bank):
    sst2, stsb, tags = bank.predict(["great film", "great film", "great film"], ["sst2", "stsb", "tags"])
    assert set(sst2) == {"task", "label", "score", "scores"} and sst2["task"] == "sst2"
    assert sum(sst2["scores"].values()) == pytest.approx(1.0)
    assert sst2["score"] == max(sst2["scores"].values()) and sst2["scores"][sst2["label"]] == sst2["score"]
    assert set(stsb) == {"task", "value"}
    assert stsb["value"] == pytest.approx(bank.logits("great film", "stsb")[0].item())
    logits = bank.logits("great film", "tags")[0]
    assert list(tags["scores"]) == [f"tags_{j}" for j in range(4)]
    assert list(tags["scores"].values()) == pytest.approx(torch.sigmoid(logits).tolist())
    assert tags["labels"] == [k for k, p in tags["scores"].items() if p >= 0.5]


def test_task_info_and_describe(bank, adapters):
    info = bank.task_info("topic")
    adapter = read_adapter(adapters / "topic")
    assert info["name"] == "topic" and info["labels"] == ["topic_0", "topic_1", "topic_2"]
    assert info["problem_type"] == "single_label_classification"
    assert info["total_rank"] == sum(adapter.rank_pattern.values())
    assert info["parameter_count"] == adapter.parameter_count()
    e_values = sum(f.E.numel() for f in adapter.modules.values())
    assert info["memory_bytes"] == 4 * (adapter.parameter_count() - e_values)  # E is folded into B
    described = bank.describe()
    assert {t["name"] for t in described["tasks"]} == set(TASKS) and described["max_length"] == 64
    with pytest.raises(UnknownTaskError):
        bank.task_info("nope")


def test_wrapping_keeps_the_base_fingerprint(bank, adapters):
    adapter = read_adapter(adapters / "sst2")
    assert model_fingerprint(bank.model, adapter.modules_to_save) == adapter.fingerprint


def test_bad_inputs_give_clear_errors(bank):
    with pytest.raises(InputError, match="non-empty list"):
        bank.predict([], [])
    with pytest.raises(InputError, match="2 inputs but 1"):
        bank.predict(["a", "b"], ["sst2"])
    with pytest.raises(InputError, match="input 1"):
        bank.predict(["a", 3], "sst2")
    with pytest.raises(InputError, match="input 0"):
        bank.predict([("a", "b", "c")], "sst2")
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope'.*'sst2'") as info:
        bank.predict(["a", "b"], ["sst2", "nope"])
    assert isinstance(info.value, KeyError)
    # It crosses from the model process to the service intact (pickled), message and fields.
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), str(copy), copy.task, copy.known, copy.removed) == (
        UnknownTaskError, str(info.value), "nope", info.value.known, False)


def test_a_bare_pair_is_one_input_and_a_list_is_many(bank):
    (pair,) = bank.logits(("a good plot", "the story"), "mrpc")
    (listed,) = bank.logits([("a good plot", "the story")], ["mrpc"])
    torch.testing.assert_close(pair, listed)
    assert len(bank.logits(["a good plot", "the story"], "mrpc")) == 2


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "8"])
def test_a_bad_max_batch_size_is_refused(adapters, size):
    with pytest.raises(BankLoadError, match="max_batch_size must be a positive integer"):
        AdapterBank.load(adapters, max_batch_size=size, dtype="float32")


def test_non_finite_logits_are_an_error_naming_the_task(adapters):
    bank = AdapterBank.load(adapters, max_batch_size=2, dtype="float32")
    with torch.no_grad():
        bank._registry.get("topic").heads["classifier"].weight.fill_(float("inf"))
    good = bank.predict(["great film", "bad film"], ["sst2", "stsb"])
    with pytest.raises(NonFiniteOutputError, match=r"\['topic'\]"):
        bank.predict(["great film", "bad film", "a plot"], ["sst2", "stsb", "topic"])
    with pytest.raises(NonFiniteOutputError, match="topic"):
        bank.logits(["a plot"], "topic")
    assert bank.predict(["great film", "bad film"], ["sst2", "stsb"]) == good


def test_long_inputs_are_truncated(bank):
    (got,) = bank.logits(["good " * 500], "sst2")
    (cut,) = bank.logits([" ".join(["good"] * (bank.max_length - 2))], "sst2")
    torch.testing.assert_close(got, cut)


def test_large_calls_are_split_into_batches(adapters):
    bank = AdapterBank.load(adapters, max_batch_size=2, dtype="float32")
    tasks = ["sst2", "topic", "stsb", "tags", "sst2", "mrpc"]
    one = AdapterBank.load(adapters, dtype="float32").logits(INPUTS, tasks)
    for a, b in zip(bank.logits(INPUTS, tasks), one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_add_and_remove(tiny_base, adapters, tmp_path):
    bank = AdapterBank.load([adapters / "sst2", adapters / "topic"], dtype="float32")
    before = bank.logits(INPUTS[:3], ["sst2", "topic", "sst2"])
    make_adapter(tiny_base, tmp_path, "news", 5, seed=42, max_rank=6)
    assert bank.add(tmp_path / "news") == "news"
    assert "news" in bank.tasks and bank.task_info("news")["labels"][4] == "news_4"
    (got,) = bank.logits(["hello"], "news")
    torch.testing.assert_close(got, ref(tiny_base, tmp_path / "news", bank.tokenizer, "hello"), atol=1e-5, rtol=1e-5)
    bank.remove("topic")
    assert sorted(bank.tasks) == ["news", "sst2"]
    after = bank.logits([INPUTS[0], INPUTS[2]], "sst2")
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after[1], before[2], atol=1e-6, rtol=1e-6)
    with pytest.raises(UnknownTaskError, match="'topic'"):
        bank.predict(["x"], "topic")
    with pytest.raises(UnknownTaskError) as info:
        bank.remove("topic")
    assert isinstance(info.value, KeyError)
    with pytest.raises(DuplicateTaskError, match="already loaded"):
        bank.add(adapters / "sst2")
    bank.add(adapters / "topic")  # back again
    torch.testing.assert_close(bank.logits([INPUTS[1]], "topic")[0], before[1], atol=1e-6, rtol=1e-6)


def test_bad_adapters_are_reported_and_never_stop_the_others(tiny_base, other_tiny_base, adapters, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(adapters / "sst2", folder / "sst2")
    shutil.copytree(adapters / "stsb", folder / "stsb_copy")  # duplicate task name
    shutil.copytree(adapters / "stsb", folder / "stsb")
    make_adapter(other_tiny_base, folder, "foreign", 2, seed=3)  # trained on another base model
    shutil.copytree(adapters / "topic", folder / "corrupt")
    (folder / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "notes").mkdir()  # not an adapter folder: skipped silently
    bank = AdapterBank.load(folder, base_model=str(tiny_base), dtype="float32")
    assert sorted(bank.tasks) == ["sst2", "stsb"]
    errors = {k.rsplit("/", 1)[-1]: v for k, v in bank.load_errors.items()}
    assert set(errors) == {"foreign", "corrupt", "stsb_copy"}
    assert isinstance(errors["foreign"], BaseModelMismatchError) and "foreign" in str(errors["foreign"])
    assert isinstance(errors["corrupt"], AdapterFormatError)
    assert "corrupt/adapter_model.safetensors" in str(errors["corrupt"])
    assert isinstance(errors["stsb_copy"], DuplicateTaskError)
    with pytest.raises(BaseModelMismatchError, match="foreign"):
        bank.add(folder / "foreign")


@pytest.mark.parametrize("collecting", [True, False])
def test_loading_many_leaves_the_collector_and_threads_as_they_were(adapters, collecting, monkeypatch, two_threads):
    # loading pauses the garbage collector and runs on one intra-op thread; both come back, also
    # when reading an adapter raises something unexpected
    threads = torch.get_num_threads()
    seen = []
    def fail(folder):
        seen.append((gc.isenabled(), torch.get_num_threads()))
        raise RuntimeError("disk on fire")
    (gc.enable if collecting else gc.disable)()
    try:
        assert len(AdapterBank.load(adapters, dtype="float32").tasks) == len(TASKS)
        assert gc.isenabled() is collecting and torch.get_num_threads() == threads
        monkeypatch.setattr(AdapterBank, "_prepare", lambda self, folder: fail(folder))
        with pytest.raises(RuntimeError, match="disk on fire"):
            AdapterBank.load(adapters, dtype="float32")
        assert seen == [(False, 1)]
        assert gc.isenabled() is collecting and torch.get_num_threads() == threads
    finally:
        gc.enable()


def _without_fingerprint(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["base_model_fingerprint"] = None
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_adapters_that_do_not_fit_the_base_model_are_refused(tiny_base, adapters, tmp_path):
    bank = AdapterBank.load([adapters / "sst2"], dtype="float32")
    wide = tmp_path / "wide_base"
    from tests.tiny import make_tiny_base
    make_tiny_base(wide, seed=0, hidden_size=48, intermediate_size=96)
    make_adapter(wide, tmp_path / "made", "wide", 2, seed=1)
    with pytest.raises(BaseModelMismatchError):
        bank.add(tmp_path / "made" / "wide")
    unchecked = _without_fingerprint(tmp_path / "made" / "wide", tmp_path / "wide_unchecked")
    with pytest.raises(AdapterShapeError, match=r"wide_unchecked.*(trained on another architecture|shape)"):
        bank.add(unchecked)
    renamed = _without_fingerprint(adapters / "topic", tmp_path / "renamed")
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier"]  # the pooler tensors are then outside modules_to_save
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="renamed"):
        bank.add(renamed)
    assert bank.tasks == ["sst2"]


def test_a_head_narrower_than_the_labels_is_refused(tiny_base, adapters, tmp_path):
    # sst2 saves a 2-row classifier, the base model's default width; with 3 labels its third score
    # would be made up by the zero padding of a mixed batch
    folder = tmp_path / "folder"
    shutil.copytree(adapters / "topic", folder / "topic")
    narrow = folder / "narrow"
    shutil.copytree(adapters / "sst2", narrow)
    config = json.loads((narrow / "adapter_config.json").read_text())
    config.update(task="narrow", num_labels=3, labels=["negative", "neutral", "positive"])
    (narrow / "adapter_config.json").write_text(json.dumps(config))
    bank = AdapterBank.load(folder, base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == ["topic"]
    (error,) = bank.load_errors.values()
    assert isinstance(error, AdapterShapeError)
    assert re.search(r"narrow: saved tensor classifier\.(weight|bias) has shape \(2,.*num_labels=3", str(error))


def test_a_config_of_the_wrong_shape_is_reported_not_raised(tiny_base, adapters, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(adapters / "sst2", folder / "sst2")
    shutil.copytree(adapters / "topic", folder / "bad")
    config = json.loads((folder / "bad" / "adapter_config.json").read_text())
    config["scaling_pattern"] = list(config["scaling_pattern"].values())
    (folder / "bad" / "adapter_config.json").write_text(json.dumps(config))
    bank = AdapterBank.load(folder, base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == ["sst2"]
    (error,) = bank.load_errors.values()
    assert isinstance(error, AdapterFormatError) and "scaling_pattern" in str(error)


def test_an_adapter_without_the_task_head_is_refused(tiny_base, tmp_path):
    from increlora import IncreLoraConfig, apply_increlora, save_adapter
    from tests.tiny import tiny_classifier
    model = tiny_classifier(tiny_base, 2)
    apply_increlora(model, IncreLoraConfig(modules_to_save=["pooler"], lora_dropout=0.0))
    save_adapter(model, tmp_path / "headless", task="headless")
    bank = AdapterBank.load(tmp_path / "headless", base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == []
    (error,) = bank.load_errors.values()
    assert isinstance(error, AdapterShapeError) and "classifier" in str(error) and "headless" in str(error)


def test_peft_folders_are_converted_on_load(tiny_base, adapters, tmp_path):
    export_peft(adapters / "topic", tmp_path / "peft_topic")
    bank = AdapterBank.load([tmp_path / "peft_topic", adapters / "sst2"], base_model=str(tiny_base), dtype="float32")
    assert sorted(bank.tasks) == ["peft_topic", "sst2"]
    (got,) = bank.logits(["hello world"], "peft_topic")
    torch.testing.assert_close(got, ref(tiny_base, adapters / "topic", bank.tokenizer, "hello world"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_half_precision_bank_is_close_to_float32(adapters, dtype):
    bank16 = AdapterBank.load(adapters, dtype=dtype)
    assert bank16.dtype in (torch.bfloat16, torch.float16)
    assert bank16.load_errors == {}  # the fingerprint is checked on the weights as loaded
    bank32 = AdapterBank.load(adapters, dtype="float32")
    tasks = ["sst2", "topic", "stsb", "tags", "sst2", "mrpc"]
    for a, b in zip(bank16.logits(INPUTS, tasks), bank32.logits(INPUTS, tasks)):
        torch.testing.assert_close(a, b, atol=0.15, rtol=0.05)


def test_a_module_adapted_by_one_task_and_saved_by_another_is_refused(tiny_base, adapters, tmp_path):
    from increlora import IncreLoraConfig, apply_increlora, save_adapter
    from tests.tiny import tiny_classifier
    model = tiny_classifier(tiny_base, 2)
    apply_increlora(model, IncreLoraConfig(target_modules=["query", "pooler.dense"], modules_to_save=["classifier"],
                                           lora_dropout=0.0))
    save_adapter(model, tmp_path / "pooler_lora", task="pooler_lora")
    bank = AdapterBank.load(tmp_path / "pooler_lora", base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == ["pooler_lora"]
    with pytest.raises(AdapterShapeError, match="overlap"):
        bank.add(adapters / "sst2")  # saves bert.pooler, which holds the adapted bert.pooler.dense
    # the wrapping stays after remove (a running batch may still use it), and the message says so
    bank.remove("pooler_lora")
    with pytest.raises(AdapterShapeError, match="removed tasks included.*new bank"):
        bank.add(adapters / "sst2")


def test_load_errors_for_missing_folders_and_unknown_base(tmp_path, adapters):
    from serving import BankLoadError
    with pytest.raises(BankLoadError, match="no such adapter folder"):
        AdapterBank.load(tmp_path / "nowhere", dtype="float32")
    bank = AdapterBank.load(adapters / "sst2", dtype="float32")  # one adapter folder
    assert bank.tasks == ["sst2"]
    with pytest.raises(BankLoadError, match="base_model="):
        AdapterBank.load(adapters / "sst2", base_model=str(tmp_path / "no_model_here"), dtype="float32")


def test_when_every_folder_is_unreadable_the_error_says_why(tmp_path, adapters, tiny_base):
    folder = tmp_path / "folder"
    shutil.copytree(adapters / "sst2", folder / "sst2")
    (folder / "sst2" / "adapter_config.json").write_text("{not json")
    for where in (folder, folder / "sst2"):
        with pytest.raises(BankLoadError, match=r"none of the 1 adapter folders.*sst2/adapter_config.json: unreadable"):
            AdapterBank.load(where, dtype="float32")
    # with a base model: an empty bank, the error kept
    bank = AdapterBank.load(folder, base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == [] and list(bank.load_errors) == [str(folder / "sst2")]


def test_overlapping_loads_leave_the_collector_and_threads_as_they_were(adapters, monkeypatch, two_threads):
    # two loads in two threads: the second starts while the first reads and ends after it; the
    # collector comes back on and the thread count back to what it was
    import threading

    threads = torch.get_num_threads()
    first_inside, second_inside, release_second = threading.Event(), threading.Event(), threading.Event()
    real = AdapterBank._prepare

    def slow(self, folder):
        if threading.current_thread().name == "first":
            first_inside.set()
            assert second_inside.wait(20)
        else:
            second_inside.set()
            assert release_second.wait(20)
        return real(self, folder)

    monkeypatch.setattr(AdapterBank, "_prepare", slow)
    first = threading.Thread(target=AdapterBank.load, args=(adapters,), name="first")
    first.start()
    assert first_inside.wait(20)
    second = threading.Thread(target=AdapterBank.load, args=(adapters,))
    second.start()
    first.join(30)
    release_second.set()
    second.join(30)
    assert not first.is_alive() and not second.is_alive()
    assert gc.isenabled() and torch.get_num_threads() == threads
    seen = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a thread started afterwards
    probe.start()
    probe.join()
    assert seen == [threads]
