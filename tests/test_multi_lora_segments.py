"""The batched multi-adapter matmul equals its dense one-adapter-at-a-time reference."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import lora_segments, lora_segments_reference
from tests.helpers.segments import random_case
from tests.helpers.threads import shared_out

lora_math = importlib.import_module("serving.ops.lora_segments")


@pytest.mark.parametrize("shared", [False, True], ids=["one-thread", "shared-out"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16),
       segs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=8))
def test_fast_path_equals_reference_fp32(shared, seed, segs):
    rows, ranks = [n for n, _ in segs], [r for _, r in segs]
    x, bounds, a_list, b_list, out = random_case(seed, rows, ranks)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    with shared_out() if shared else contextlib.nullcontext():
        got = lora_segments(x, bounds, a_list, b_list, out.clone())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # benchmarks/gpu_check.sh runs the latter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.15), (torch.float16, 0.15)])
def test_every_device_and_dtype_matches_the_reference(device, dtype, tol):
    x, bounds, a_list, b_list, out = random_case(11, [37, 0, 128, 5, 300], [3, 7, 16, 0, 1], fan_in=96, fan_out=64,
                                                 dtype=dtype)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    moved = [t.to(device) for t in (x, *a_list, *b_list, out)]
    x_d, out_d = moved[0], moved[-1]
    a_d, b_d = moved[1:1 + len(a_list)], moved[1 + len(a_list):-1]
    got = lora_segments(x_d, bounds, a_d, b_d, out_d)
    assert got is out_d and got.device.type == device and got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol / 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_equals_reference_half_precision(dtype):
    x, bounds, a_list, b_list, out = random_case(3, [5, 1, 8, 3], [4, 1, 9, 2], dtype=dtype)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    got = lora_segments(x, bounds, a_list, b_list, out.clone())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.03)


def test_works_in_place_and_leaves_rows_of_no_adapter_alone():
    x, bounds, a_list, b_list, out = random_case(1, [3, 4, 2], [2, 3, 1])
    before = out.clone()
    # the middle segment's task has rank 0 in this module: it is not passed at all
    result = lora_segments(x, [bounds[0], bounds[2]], [a_list[0], a_list[2]], [b_list[0], b_list[2]], out)
    assert result is out
    torch.testing.assert_close(out[3:7], before[3:7], atol=0, rtol=0)
    assert not torch.equal(out[:3], before[:3])


def test_rank_zero_factors_and_empty_segments_add_nothing():
    x, bounds, _, _, out = random_case(2, [3, 0, 2], [0, 0, 0])
    empty_a = [torch.zeros(0, x.shape[1])] * 3
    empty_b = [torch.zeros(out.shape[1], 0)] * 3
    before = out.clone()
    lora_segments(x, bounds, empty_a, empty_b, out)
    torch.testing.assert_close(out, before, atol=0, rtol=0)


def test_intra_op_threads_are_restored(two_threads):
    threads = torch.get_num_threads()
    x, bounds, a_list, b_list, out = random_case(5, [4, 4], [2, 3])
    lora_segments(x, bounds, a_list, b_list, out)
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError):
        lora_segments(x, bounds, a_list, [b[:-1] for b in b_list], out)  # wrong shapes fail inside
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_out_half_precision(dtype):
    x, bounds, a_list, b_list, out = random_case(4, [50, 1, 80, 30], [4, 1, 9, 2], dtype=dtype)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    with shared_out(), stacking(False):  # the loop, which 16 bits on the CPU take only with stacking off
        got = lora_segments(x, bounds, a_list, b_list, out.clone())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.03)


def test_sharing_out_follows_openmp_wait_policy(monkeypatch):
    for value, want in [("PASSIVE", True), (" passive ", True), ("ACTIVE", False), (None, False)]:
        if value is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", value)
        assert lora_math.openmp_threads_sleep() is want


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 4), segs=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 32)), min_size=1, max_size=12))
def test_shares_cover_every_row_once_in_runs_of_about_equal_cost(n, segs):
    work, start = [], 0
    for rows, rank in segs:
        work.append((start, start + rows, torch.zeros(rank, 1), None))
        start += rows
    pieces, bounds = lora_math._shares(work, n)
    covered = [row for s, e, _, _ in pieces for row in range(s, e)]
    assert covered == list(range(start))  # in order, each row once
    for s, e, a, _ in pieces:  # a piece keeps its segment's factors
        owner = next(w for w in work if w[0] <= s < w[1])
        assert e <= owner[1] and a is owner[2]
    assert bounds[0] == 0 and bounds[-1] == len(pieces) and len(bounds) - 1 <= n
    assert all(lo < hi for lo, hi in zip(bounds, bounds[1:]))
    total = sum((e - s) * a.shape[0] for s, e, a, _ in pieces)
    largest_row = max(a.shape[0] for _, _, a, _ in work)
    for lo, hi in zip(bounds, bounds[1:]):
        cost = sum((e - s) * a.shape[0] for s, e, a, _ in pieces[lo:hi])
        assert cost <= total / n + largest_row


def test_without_torchscript_the_updates_run_on_the_calling_thread(monkeypatch, caplog):
    def no_script(fn):
        raise RuntimeError("TorchScript removed")

    monkeypatch.setattr(torch.jit, "script", no_script)
    with caplog.at_level("WARNING", logger="serving.ops.lora_segments"):
        assert lora_math._forked_runner.__wrapped__() is None
    assert "TorchScript unavailable" in caplog.text
    monkeypatch.setattr(lora_math, "_forked_runner", lambda: None)
    x, bounds, a_list, b_list, out = random_case(8, [30, 20], [3, 5])
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    with shared_out(require_torchscript=False):
        torch.testing.assert_close(lora_segments(x, bounds, a_list, b_list, out.clone()), want, atol=1e-5, rtol=1e-5)


def test_with_autograd_recording_the_updates_stay_on_one_thread(monkeypatch):
    x, bounds, a_list, b_list, out = random_case(9, [30, 20], [3, 5])
    a_list = [a.requires_grad_() for a in a_list]

    def no_fork():
        raise AssertionError("shared out while autograd records")

    monkeypatch.setattr(lora_math, "_forked_runner", no_fork)
    with shared_out(require_torchscript=False):
        got = lora_segments(x, bounds, a_list, b_list, out.clone())
    got.sum().backward()
    assert all(a.grad is not None for a in a_list)
    torch.testing.assert_close(got.detach(), lora_segments_reference(x, bounds, a_list, b_list, out).detach(),
                               atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def stacking(on: bool, columns: int | None = None):
    """Switch the CPU 16-bit stacked products on or off (and their column bound) for one block."""
    saved = lora_math.STACK_16BIT, lora_math.STACK_COLUMNS
    lora_math.STACK_16BIT = on
    lora_math.STACK_COLUMNS = columns or saved[1]
    try:
        yield
    finally:
        lora_math.STACK_16BIT, lora_math.STACK_COLUMNS = saved


@pytest.mark.parametrize("shared", [False, True], ids=["one-thread", "shared-out"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), columns=st.integers(1, 24),
       segs=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 12)), min_size=1, max_size=8))
def test_stacked_16bit_products_equal_the_reference(shared, seed, columns, segs):
    # segments of rank 0 leave rows inside a stacked run that no task adapts: they must stay untouched
    rows, ranks = [n for n, _ in segs], [r for _, r in segs]
    x, bounds, a_list, b_list, out = random_case(seed, rows, ranks, dtype=torch.bfloat16)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    with stacking(True, columns), shared_out() if shared else contextlib.nullcontext():
        got = lora_segments(x, bounds, a_list, b_list, out.clone())
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.03)
    for (start, end), r in zip(bounds, ranks):
        if r == 0:
            assert torch.equal(got[start:end], out[start:end])


@pytest.mark.parametrize("dtype, stacked", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_16bit_on_the_cpu_stacks_runs_of_segments_up_to_the_column_bound(monkeypatch, dtype, stacked):
    groups = []
    real = lora_math._stack
    def spy(pieces):
        groups.extend(real(pieces))
        return real(pieces)

    monkeypatch.setattr(lora_math, "_stack", spy)
    ranks = [5, 3, 4, 6, 1, 8]
    x, bounds, a_list, b_list, out = random_case(12, [7, 3, 9, 4, 2, 6], ranks, dtype=dtype)
    with stacking(True, 9):
        lora_segments(x, bounds, a_list, b_list, out)
    if not stacked:
        assert groups == []
        return
    assert [a.shape[0] for _, _, a, _, _ in groups] == [8, 4, 7, 8]  # ranks 5+3 | 4 | 6+1 | 8
    assert [(lo, hi) for lo, hi, *_ in groups] == [(0, 10), (10, 19), (19, 25), (25, 31)]


def test_stacked_products_carry_gradients_like_the_reference():
    x, bounds, a_list, b_list, out = random_case(13, [20, 6, 15, 9], [3, 2, 5, 4], dtype=torch.bfloat16)
    leaves = [t.detach().float().requires_grad_() for t in (*a_list, *b_list)]
    with stacking(True, 8):
        got = lora_segments(x, bounds, [t.to(torch.bfloat16) for t in leaves[:4]],
                            [t.to(torch.bfloat16) for t in leaves[4:]], out.clone())
    got.float().square().sum().backward()
    fast = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    lora_segments_reference(x, bounds, leaves[:4], leaves[4:], out).square().sum().backward()
    for f, t in zip(fast, leaves):
        torch.testing.assert_close(f, t.grad, atol=0.5, rtol=0.05)
