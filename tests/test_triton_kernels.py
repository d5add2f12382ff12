"""The Triton kernels equal the dense reference (in Triton's interpreter without a GPU), compile for GPU
targets, and keep to their buffers; the packed factor buffers reuse and keep their space."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import lora_segments_reference
from serving.ops import PackedFactors, PackedSlot
from serving.ops.triton_segments import BLOCK_M, BLOCK_R, build_table, lora_segments_packed, lora_segments_triton
from tests.helpers.segments import random_case
from tests.helpers.triton_compile import variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the largest value of the result: float32 sums in another order; the half types round h
# and the output as the torch loop does
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GUARD = 3


def guarded(t: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """t copied into the middle of a tensor with GUARD rows of `fill` before and after; (whole, middle)."""
    whole = torch.full((t.shape[0] + 2 * GUARD, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    whole[GUARD:GUARD + t.shape[0]] = t
    return whole, whole[GUARD:GUARD + t.shape[0]]


def packed_case(x, bounds, a_list, b_list, module="m"):
    """The factors packed behind a NaN block, with NaN in every free row: a kernel that read a row of
    another task or past a rank would turn the answer into NaN."""
    fan_in, fan_out = x.shape[1], b_list[0].shape[0] if b_list else 8
    store = PackedFactors(fan_in, fan_out, x.device, x.dtype, capacity=0)
    nan = float("nan")
    store.add(torch.full((GUARD, fan_in), nan, dtype=x.dtype), torch.full((fan_out, GUARD), nan, dtype=x.dtype))
    slots = [(store.add(a, b), a.shape[0]) for a, b in zip(a_list, b_list)]
    store.add(torch.full((GUARD, fan_in), nan, dtype=x.dtype), torch.full((fan_out, GUARD), nan, dtype=x.dtype))
    for start, length in store._free:
        store.A[start:start + length] = nan
        store.Bt[start:start + length] = nan
    table = build_table(bounds, {module: slots}, {module: store}, x.device)
    return store, table


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16),
       segs=st.lists(st.tuples(st.sampled_from([0, 1, 2, 5, BLOCK_M - 1, BLOCK_M + 3]),
                               st.sampled_from([0, 1, 3, BLOCK_R, BLOCK_R + 4])), min_size=1, max_size=6),
       fans=st.sampled_from([(8, 8), (24, 40), (70, 72)]),
       dtype=st.sampled_from(list(TOLERANCE)), variant=st.sampled_from(["split", "fused"]))
def test_kernels_equal_the_reference(seed, segs, fans, dtype, variant):
    """Empty and one-row segments, rank 0, ranks above the rank tile, row and feature tails, all dtypes."""
    rows, ranks = [n for n, _ in segs], [r for _, r in segs]
    x, bounds, a_list, b_list, out = random_case(seed, rows, ranks, *fans, dtype=dtype)
    x, out = x.to(DEVICE), out.to(DEVICE)
    a_list, b_list = [a.to(DEVICE) for a in a_list], [b.to(DEVICE) for b in b_list]
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    x_whole, x_mid = guarded(x, float("nan"))  # a read outside x's rows would give NaN
    out_whole, out_mid = guarded(out, 7.0)  # a write outside out's rows would change the 7s
    _, table = packed_case(x_mid, bounds, a_list, b_list)
    table.workspace[dtype] = torch.full((x.shape[0] + 1, max(max(ranks), 1)), float("nan"), dtype=dtype,
                                        device=DEVICE)
    got = lora_segments_packed(x_mid, out_mid, table, "m", variant=variant)
    assert got.data_ptr() == out_mid.data_ptr()
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)
    assert (out_whole[:GUARD] == 7).all() and (out_whole[-GUARD:] == 7).all()


def test_the_narrow_signature_and_fp32_precision_options():
    x, bounds, a_list, b_list, out = case_on_device(3, [33, 0, 4], [2, 5, 17], 40, 24)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    scale = want.abs().max().item()
    for precision in ("ieee", "tf32"):  # tf32 is the same as ieee in the interpreter; on an H200 it was
        got = lora_segments_triton(x, bounds, a_list, b_list, out.clone(), precision=precision)  # 3e-3 off
        torch.testing.assert_close(got.float(), want, atol=1e-2 * scale if precision == "tf32" else 1e-5, rtol=0)
    with pytest.raises(ValueError, match="variant"):
        lora_segments_triton(x, bounds, a_list, b_list, out.clone(), variant="padded")


def case_on_device(*args, **kwargs):
    x, bounds, a_list, b_list, out = random_case(*args, **kwargs)
    return x.to(DEVICE), bounds, [a.to(DEVICE) for a in a_list], [b.to(DEVICE) for b in b_list], out.to(DEVICE)


def test_wrong_shapes_and_dtypes_are_refused():
    x, bounds, a_list, b_list, out = case_on_device(4, [5], [2], 16, 8)
    _, table = packed_case(x, bounds, a_list, b_list)
    with pytest.raises(ValueError, match="match the factors"):
        lora_segments_packed(x.double(), out, table, "m")
    with pytest.raises(ValueError, match="do not fit"):
        lora_segments_packed(x[:, :8], out, table, "m")
    assert lora_segments_packed(x, out, table, "not-in-the-table") is out  # a module no task adapts


def test_table_pads_tiles_to_a_power_of_two_and_owns_its_device_memory():
    store = PackedFactors(8, 8, DEVICE, torch.float32)
    slots = [(store.add(torch.ones(2, 8), torch.ones(8, 2)), 2), (0, 0)]
    first = build_table([(0, BLOCK_M + 1), (BLOCK_M + 1, BLOCK_M + 3)], {"m": slots}, {"m": store}, DEVICE)
    assert first.tiles.shape == (4, 3)  # three tiles (a segment is cut at BLOCK_M rows), padded to four
    assert first.tiles.tolist() == [[0, 0, BLOCK_M], [0, BLOCK_M, BLOCK_M + 1], [1, BLOCK_M + 1, BLOCK_M + 3],
                                    [0, 0, 0]]
    assert first.meta.tolist() == [[[2, 0], [0, 0]]]  # (rank, offset) per segment
    kept = first.tiles.clone(), first.meta.clone()
    for _ in range(6):  # more tables than the thread has staging buffers
        second = build_table([(0, 3), (3, 5)], {"m": slots}, {"m": store}, DEVICE)
    assert second.tiles.tolist() == [[0, 0, 3], [1, 3, 5]]
    assert torch.equal(first.tiles, kept[0]) and torch.equal(first.meta, kept[1])  # a later table leaves it be
    with pytest.raises(ValueError, match="slots for"):
        build_table([(0, 3)], {"m": slots}, {"m": store}, DEVICE)


def test_no_table_is_built_while_a_cuda_graph_is_captured(monkeypatch):
    """Building copies from host memory and waits on an event, which a capture cannot hold: the
    message says to run the forward once before capturing."""
    store = PackedFactors(8, 8, "cpu", torch.float32)
    slots = [(store.add(torch.ones(2, 8), torch.ones(8, 2)), 2)]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before capturing"):
        build_table([(0, 3)], {"m": slots}, {"m": store}, "cuda")


def test_buffers_made_in_inference_mode_are_refilled_outside_it():
    x, bounds, a_list, b_list, out = case_on_device(6, [4, 2], [2, 3], 16, 8)
    want = lora_segments_reference(x, bounds, a_list, b_list, out)
    with torch.inference_mode():  # as a bank's forward makes them
        store = PackedFactors(16, 8, DEVICE, torch.float32, capacity=0)
        slots = [(store.add(a_list[0], b_list[0]), 2)]
        build_table(bounds[:1], {"m": slots}, {"m": store}, DEVICE)
    slots.append((store.add(a_list[1], b_list[1]), 3))
    table = build_table(bounds, {"m": slots}, {"m": store}, DEVICE)
    torch.testing.assert_close(lora_segments_packed(x, out.clone(), table, "m"), want, atol=1e-5, rtol=0)


def test_the_launch_is_a_registered_custom_op():
    x, bounds, a_list, b_list, out = case_on_device(5, [6, 3], [2, 4], 16, 8)
    _, table = packed_case(x, bounds, a_list, b_list)
    a, bt = table.buffers[0]
    h = table.h(x.shape[0], x.dtype)
    torch.library.opcheck(torch.ops.increlora.lora_segments_triton.default,
                          (x, a, bt, out.clone(), h, table.tiles, table.meta, 0, "split", "ieee"),
                          test_utils=("test_schema", "test_faketensor"))


def test_packed_buffers_reuse_freed_rows_and_keep_contents_when_growing():
    store = PackedFactors(4, 3, "cpu", torch.float32, capacity=8)
    factors = [(torch.randn(r, 4), torch.randn(3, r)) for r in (3, 5, 2, 6)]
    offsets = [store.add(a, b) for a, b in factors[:2]]
    assert offsets == [0, 3] and store.used_rows == 8 and store.capacity == 8
    store.release(0, 3)
    assert store.add(*factors[2]) == 0  # first fit into the freed rows
    old_a = store.A
    late = store.add(*factors[3])  # no room: the buffers grow, the old ones stay as they were
    assert store.capacity >= 14 and store.A is not old_a and late >= 8
    for offset, (a, b) in zip([0, 3, late], [factors[2], factors[1], factors[3]]):
        got_a, got_b = PackedSlot(store, offset, a.shape[0])
        assert torch.equal(got_a, a) and torch.equal(got_b, b)
    store.release(3, 5)
    store.release(0, 2)
    assert store._free[0] == (0, 8)  # neighbours merged
    with pytest.raises(ValueError, match="already free"):
        store.release(1, 1)
    with pytest.raises(ValueError, match="do not fit"):
        store.add(torch.randn(2, 5), torch.randn(3, 2))
    assert store.add(torch.zeros(0, 4), torch.zeros(3, 0)) == 0 and store.used_rows == 6


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.triton_compile", "80", "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(done) == 2 * len(list(variants())) == 24
    assert all(d["cubin_bytes"] > 0 and d["ptx_target"] for d in done)
