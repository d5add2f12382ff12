"""Property: in any mixed batch, every row's logits equal what its adapter gives alone (fp32, 1e-5)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from increlora import read_adapter
from serving import AdapterBank
from tests.helpers.adapters import encode, make_adapter, reference_model
from tests.helpers.threads import shared_out as shared_out_over_threads
from tests.tiny import WORDS

# name -> (num_labels, problem type, max per-module rank)
SPECS = {
    "a": (2, "single_label_classification", 1),
    "b": (3, "single_label_classification", 8),
    "c": (1, "regression", 4),
    "d": (4, "multi_label_classification", 6),
    "e": (2, "single_label_classification", 3),
}


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("property_adapters")
    for i, (task, (n, pt, max_rank)) in enumerate(SPECS.items()):
        make_adapter(tiny_base, folder, task, n, seed=20 + i, problem_type=pt, max_rank=max_rank)
    ranks = {t: set(read_adapter(folder / t).rank_pattern.values()) for t in SPECS}
    assert all(0 in r for r in ranks.values()) and len(set().union(*ranks.values())) > 5
    return tiny_base, folder, AdapterBank.load(folder, dtype="float32"), {}


def alone(setup, task, x):
    base, folder, bank, cache = setup
    if (task, x) not in cache:
        enc = encode(bank.tokenizer, x)
        with torch.no_grad():
            cache[task, x] = reference_model(base, folder / task)(**enc).logits[0]
    return cache[task, x]


text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join)
model_input = st.one_of(text, st.tuples(text, text))
row = st.tuples(model_input, st.sampled_from(sorted(SPECS)))


@pytest.mark.parametrize("shared_out", [False, True], ids=["one-thread", "shared-out"])
@settings(max_examples=30, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=12))
def test_every_row_equals_its_adapter_alone(setup, shared_out, rows):
    """shared-out: the segments of every module are shared out over two threads (a tiny model's
    modules are far below the size where that happens by itself)."""
    bank = setup[2]
    inputs, tasks = [x for x, _ in rows], [t for _, t in rows]
    with shared_out_over_threads() if shared_out else contextlib.nullcontext():
        logits = bank.logits(inputs, tasks)
    for x, t, got in zip(inputs, tasks, logits):
        torch.testing.assert_close(got, alone(setup, t, x), atol=1e-5, rtol=1e-5)
