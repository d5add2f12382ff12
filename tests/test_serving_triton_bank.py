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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's interpreter on the CPU
INPUTS = ["great film", ("a good plot", "the story"), "bad movie", "hello world", ("win", "prize now"),
          "the best movie ever", "dull", "a plot"]
MIXED = ["sst2", "topic", "stsb", "tags", "sst2", "mrpc", "topic", "tags"]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bank(adapters):
    return AdapterBank.load(adapters, backend="triton", dtype="float32")


def test_mixed_batch_equals_each_adapter_alone_and_the_torch_backend(tiny_base, adapters, bank):
    assert bank.backend == "triton" and bank.describe()["backend"] == "triton"
    torch_bank = AdapterBank.load(adapters, backend="torch", dtype="float32")
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
    bank = AdapterBank.load(adapters, backend="triton", dtype="float32")
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
        AdapterBank.load(adapters, backend="cuda-graphs", dtype="float32")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BankLoadError, match="TRITON_INTERPRET=1"):
        AdapterBank.load(adapters, backend="triton", device="cpu", dtype="float32")
    monkeypatch.setattr("serving.bank.adapter_bank.triton_available", lambda: False)
    with pytest.raises(BankLoadError, match="needs the triton package"):
        AdapterBank.load(adapters, backend="triton", device="cpu", dtype="float32")
    assert AdapterBank.load(adapters, device="cpu").backend == "torch"  # 'auto' without triton, or on the CPU


def test_a_forward_reads_no_device_value_back(bank, monkeypatch):
    """No .item()/.tolist() in the forward: what a CUDA graph capture needs (on a GPU it would sync)."""
    from serving.bank.batch_inputs import tokenize
    from serving.layers import BatchContext, using_batch

    tasks = [bank._registry.get(t) for t in sorted(MIXED)]
    enc = tokenize(bank.tokenizer, [INPUTS[0]] * len(tasks), bank.max_length)
    enc = {k: v.to(bank.device) for k, v in enc.items() if k in bank._input_names}
    for name in ("item", "tolist"):
        def refuse(self, *args, _name=name):
            raise AssertionError(f"Tensor.{_name}() called in the forward")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.inference_mode(), using_batch(BatchContext(tasks, "triton")):
        logits = bank.model(**enc).logits
    monkeypatch.undo()
    assert logits.shape[0] == len(tasks) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("cuda, capability, triton, want", [
    (False, None, True, "torch"), (True, (7, 5), True, "torch"), (True, (8, 0), True, "triton"),
    (True, (9, 0), True, "triton"), (True, (9, 0), False, "torch")])
def test_auto_picks_triton_only_on_compute_capability_8_or_newer(monkeypatch, caplog, cuda, capability, triton, want):
    from serving.bank.adapter_bank import _backend

    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("serving.bank.adapter_bank.triton_available", lambda: triton)
    with caplog.at_level("INFO", logger="serving.bank.adapter_bank"):
        assert _backend("auto", torch.device("cuda" if cuda else "cpu")) == want
    (line,) = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    why = (f"compute capability {capability[0]}.{capability[1]}" if cuda and triton
           else "not installed" if cuda else "not CUDA")
    assert f": {want}, because" in line and why in line


class _Task:
    """A task as the layers read it: packed factors per module, no heads."""

    def __init__(self, name, lora):
        self.name, self.lora, self.heads = name, lora, {}


class _Granularities(torch.nn.Module):
    """Token-level, then sequence-level, then token-level adapted layers in one forward."""

    def __init__(self, width=16):
        from serving.layers import MultiLoraLinear

        super().__init__()
        torch.manual_seed(0)
        self.tok1 = MultiLoraLinear(torch.nn.Linear(width, width), "tok1")
        self.seq = MultiLoraLinear(torch.nn.Linear(width, width), "seq")
        self.tok2 = MultiLoraLinear(torch.nn.Linear(width, width), "tok2")

    def forward(self, x):  # [batch, tokens, width]
        h = self.tok1(x)
        return self.tok2(h + self.seq(h.mean(dim=1))[:, None, :])


def _granularity_tasks(seed, ranks=(2, 5, 3), width=16):
    from serving.ops import PackedFactors, PackedSlot

    g = torch.Generator().manual_seed(seed)
    stores = {m: PackedFactors(width, width, DEVICE, torch.float32, capacity=0) for m in ("tok1", "seq", "tok2")}
    tasks = []
    for i, rank in enumerate(ranks):
        lora = {m: PackedSlot(store, store.add(torch.randn(rank, width, generator=g) / 4,
                                              torch.randn(width, rank, generator=g) / 4), rank)
                for m, store in stores.items()}
        tasks.append(_Task(f"t{i}", lora))
    return tasks


def test_layers_of_two_row_granularities_in_one_forward_each_read_their_own_table():
    """The second table (sequence-level) must not overwrite the first (token-level), which the last
    layer reads after it; the torch loop over the same packed factors is the reference."""
    from serving.layers import BatchContext, using_batch

    model = _Granularities().to(DEVICE)
    tasks = _granularity_tasks(0)
    rows = [tasks[0]] * 3 + [tasks[1]] * 2 + [tasks[2]] * 4
    x = torch.randn(len(rows), 5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        with using_batch(BatchContext(rows, "torch")):
            want = model(x)
        with using_batch(BatchContext(rows, "triton")):
            got = model(x)
        base = model(x)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapters change the answer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _pooler_adapters(tiny_base, folder):
    """Two adapters that adapt bert.pooler.dense (a sequence-level layer) beside token-level layers."""
    from increlora import IncreLoraConfig, apply_increlora, increlora_layers, save_adapter
    from tests.tiny import tiny_classifier

    for seed, task in enumerate(("pool_a", "pool_b")):
        model = tiny_classifier(tiny_base, 2 + seed, seed=seed)
        apply_increlora(model, IncreLoraConfig(target_modules=["query", "value", "pooler.dense"],
                                               modules_to_save=["classifier"], lora_dropout=0.0,
                                               advance_learning=False))
        for i, (_, layer) in enumerate(increlora_layers(model)):
            layer.grow(1 + (i + seed) % 3)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "classifier" in name:
                    p.normal_(0.0, 0.3)
        save_adapter(model.eval(), folder / task, task=task)
    return folder


def test_an_adapted_pooler_in_a_mixed_batch_equals_each_adapter_alone_forward_after_forward(tiny_base, tmp_path):
    """A second forward under the same context (as a CUDA graph capture follows a warm-up) reuses its
    tables after other batches and a growth of the packed buffers, and still equals the first."""
    from serving.bank.batch_inputs import tokenize
    from serving.layers import BatchContext, using_batch

    folder = _pooler_adapters(tiny_base, tmp_path)
    bank = AdapterBank.load(folder, backend="triton", dtype="float32")
    assert "bert.pooler.dense" in bank._packed
    inputs, tasks = INPUTS[:5], ["pool_a", "pool_a", "pool_b", "pool_b", "pool_b"]
    got = bank.logits(inputs, tasks)
    for x, task, row in zip(inputs, tasks, got):
        with torch.no_grad():
            want = reference_model(tiny_base, folder / task)(**encode(bank.tokenizer, x)).logits[0]
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)

    enc = tokenize(bank.tokenizer, inputs, bank.max_length)
    enc = {k: v.to(bank.device) for k, v in enc.items() if k in bank._input_names}
    ctx = BatchContext([bank._registry.get(t) for t in tasks], "triton")
    with torch.inference_mode(), using_batch(ctx):
        first = bank.model(**enc).logits.float().cpu()
    bank.logits(INPUTS[5:], ["pool_b", "pool_a", "pool_b"])  # other tables built on this thread
    for store in bank._packed.values():  # the packed buffers grow (copied), as adding many tasks does
        old = store.A
        store.add(torch.zeros(store.capacity + 1, store.fan_in), torch.zeros(store.fan_out, store.capacity + 1))
        assert store.A is not old
    with torch.inference_mode(), using_batch(ctx):
        second = bank.model(**enc).logits.float().cpu()
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    for row, want in zip(first, got):
        torch.testing.assert_close(row[:want.shape[0]], want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_captured_bank_forward_replays_equal_to_eager(tiny_base, tmp_path):
    """Capture after one eager forward under the context (it keeps its tables); replay with new inputs
    after other batches, a growth of the packed buffers and the removal of a task of the batch."""
    from serving.bank.batch_inputs import tokenize
    from serving.layers import BatchContext, using_batch

    folder = _pooler_adapters(tiny_base, tmp_path)
    bank = AdapterBank.load(folder, device="cuda", backend="triton", dtype="float32")
    inputs, tasks = INPUTS[:5], ["pool_a", "pool_a", "pool_b", "pool_b", "pool_b"]
    again = [inputs[i] for i in (3, 0, 4, 2, 1)]  # other rows for each task, the same padded length

    def encoded(texts):
        enc = tokenize(bank.tokenizer, texts, bank.max_length)
        return {k: v.to("cuda") for k, v in enc.items() if k in bank._input_names}

    static = encoded(inputs)
    ctx = BatchContext([bank._registry.get(t) for t in tasks], "triton")

    def forward():
        with torch.inference_mode(), using_batch(ctx):
            return bank.model(**static).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()

    def check(texts):
        graph.replay()
        for row, want in zip(out.float().cpu(), bank.logits(texts, tasks)):
            torch.testing.assert_close(row[:want.shape[0]], want, atol=1e-4, rtol=1e-4)

    check(inputs)
    bank.logits(INPUTS[5:], ["pool_b", "pool_a", "pool_b"])  # other tables built on this thread
    for store in bank._packed.values():
        store.add(torch.zeros(store.capacity + 1, store.fan_in), torch.zeros(store.fan_out, store.capacity + 1))
    for name, value in encoded(again).items():
        assert value.shape == static[name].shape
        static[name].copy_(value)
    check(again)
    want = [w.clone() for w in bank.logits(again, tasks)]
    bank.remove("pool_a")
    gc.collect()
    graph.replay()
    for row, w in zip(out.float().cpu(), want):
        torch.testing.assert_close(row[:w.shape[0]], w, atol=1e-4, rtol=1e-4)
