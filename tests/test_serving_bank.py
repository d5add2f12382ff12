"""AdapterBank: loading, predictions equal to each adapter alone, add/remove, errors."""
from __future__ import annotations

import pytest
import torch

from serving import AdapterBank
from tests.test_serving_support import TASKS, adapter_set, reference_model


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bank(adapters):
    return AdapterBank.load(adapters)


def ref(tiny_base, adapters, bank, task, text):
    enc = bank.tokenizer(*([text] if isinstance(text, str) else list(text)), return_tensors="pt")
    with torch.no_grad():
        return reference_model(tiny_base, adapters / task)(**enc).logits[0]


def test_loads_every_adapter_of_the_folder(bank):
    assert sorted(bank.tasks) == sorted(TASKS)
    assert bank.load_errors == {}
    assert bank.max_length == 64


def test_mixed_batch_equals_each_adapter_alone(tiny_base, adapters, bank):
    inputs = ["great film", ("a good plot", "the story"), "bad movie", "hello world", ("win", "prize now")]
    tasks = ["sst2", "topic", "stsb", "tags", "sst2"]
    for x, t, got in zip(inputs, tasks, bank.logits(inputs, tasks)):
        torch.testing.assert_close(got, ref(tiny_base, adapters, bank, t, x), atol=1e-5, rtol=1e-5)
