"""AdapterBank on the Triton backend (the interpreter without a GPU): mixed batches equal each adapter
alone and the torch backend, factors packed at their true size, rows reused only once no batch needs them."""
from __future__ import annotations

import gc

import pytest
import torch

from increlora import read_adapter
from serving import AdapterBank, BankLoadError
from serving.ops import PackedSlot
from tests.helpers.adapters import TASKS, adapter_set, encode, make_adapter, reference_model

INPUTS = ["great film", ("a good plot", "the story"), "bad movie", "hello world", ("win", "prize now"),
          "the best movie ever", "dull", "a plot"]
MIXED = ["sst2", "topic", "stsb", "tags", "sst2", "mrpc", "topic", "tags"]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bank(adapters):
    return AdapterBank.load(adapters, backend="triton")


def test_mixed_batch_equals_each_adapter_alone_and_the_torch_backend(tiny_base, adapters, bank):
    assert bank.backend == "triton" and bank.describe()["backend"] == "triton"
    torch_bank = AdapterBank.load(adapters, backend="torch")
    assert torch_bank.backend == "torch"  # also what 'auto' picks on the CPU
    got, loop = bank.logits(INPUTS, MIXED), torch_bank.logits(INPUTS, MIXED)
    for x, task, row, loop_row in zip(INPUTS, MIXED, got, loop):
        with torch.no_grad():
            want = reference_model(tiny_base, adapters / task)(**encode(bank.tokenizer, x)).logits[0]
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row, loop_row, atol=1e-5, rtol=1e-5)


def test_factors_are_packed_at_their_true_size(bank, adapters):
    task = bank._registry.get("topic")
    adapter = read_adapter(adapters / "topic")
    assert all(isinstance(slot, PackedSlot) for slot in task.lora.values())
    assert {m: s.rank for m, s in task.lora.items()} == {m: r for m, r in adapter.rank_pattern.items() if r}
    e_values = sum(f.E.numel() for f in adapter.modules.values())
    assert task.info()["memory_bytes"] == 4 * (adapter.parameter_count() - e_values)  # E folded into B
    used = sum(store.used_rows for store in bank._packed.values())
    assert used == sum(sum(read_adapter(adapters / t).rank_pattern.values()) for t in TASKS)


def test_removed_rows_are_reused_only_once_no_batch_holds_the_task(tiny_base, adapters, tmp_path):
    bank = AdapterBank.load(adapters, backend="triton")
    running = bank._registry.get("tags")  # as a batch in flight holds it
    held = {m: (s.offset, s.rank) for m, s in running.lora.items()}
    bank.remove("tags")
    gc.collect()
    extra = make_adapter(tiny_base, tmp_path, "extra", 3, seed=7)
    bank.add(extra)
    for module, slot in bank._registry.get("extra").lora.items():
        if module in held:
            start, rank = held[module]
            assert slot.offset >= start + rank or slot.offset + slot.rank <= start, module
    (answer,) = bank.logits(["great film"], ["extra"])
    with torch.no_grad():
        want = reference_model(tiny_base, extra)(**encode(bank.tokenizer, "great film")).logits[0]
    torch.testing.assert_close(answer, want, atol=1e-5, rtol=1e-5)
    before = sum(store.used_rows for store in bank._packed.values())
    del running
    gc.collect()
    freed = sum(r for _, r in held.values())
    assert sum(store.used_rows for store in bank._packed.values()) == before - freed


def test_backend_choice_is_checked(adapters, monkeypatch):
    with pytest.raises(BankLoadError, match="backend must be one of"):
        AdapterBank.load(adapters, backend="cuda-graphs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BankLoadError, match="TRITON_INTERPRET=1"):
        AdapterBank.load(adapters, backend="triton", device="cpu")
    monkeypatch.setattr("serving.bank.adapter_bank.triton_available", lambda: False)
    with pytest.raises(BankLoadError, match="needs the triton package"):
        AdapterBank.load(adapters, backend="triton", device="cpu")
    assert AdapterBank.load(adapters, device="cpu").backend == "torch"  # 'auto' without triton, or on the CPU


def test_a_forward_reads_no_device_value_back(bank, monkeypatch):
    """No .item()/.tolist() in the forward: what a CUDA graph capture needs (on a GPU it would sync)."""
    from serving.bank.batch_inputs import tokenize
    from serving.layers import BatchContext, using_batch

    tasks = [bank._registry.get(t) for t in sorted(MIXED)]
    enc = tokenize(bank.tokenizer, [INPUTS[0]] * len(tasks), bank.max_length)
    enc = {k: v for k, v in enc.items() if k in bank._input_names}
    for name in ("item", "tolist"):
        def refuse(self, *args, _name=name):
            raise AssertionError(f"Tensor.{_name}() called in the forward")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.inference_mode(), using_batch(BatchContext(tasks, "triton")):
        logits = bank.model(**enc).logits
    monkeypatch.undo()
    assert logits.shape[0] == len(tasks) and bool(torch.isfinite(logits).all())
