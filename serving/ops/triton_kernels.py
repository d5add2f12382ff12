"""Triton kernels of the segmented multi-adapter product: one launch per module for every task of a batch.

Each program takes one tile of rows of one task (tiles [T, 3]) and that task's rank and offset in the
module's packed factors (meta [modules, segments, 2]), and loops only up to the task's true rank:
shrink h = x A^T, expand out += h Bt, or both fused. Products accumulate in float32; UPCAST (set in
Triton's interpreter, chosen by TRITON_INTERPRET=1 before import) casts tiles to float32 before tl.dot.
The layout, grids and the reasons: docs/design/gpu-kernels.md.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile(tiles_ptr, meta_ptr, module, n_segments):
    t = tl.program_id(0)
    seg = tl.load(tiles_ptr + 3 * t)
    row0 = tl.load(tiles_ptr + 3 * t + 1)
    row1 = tl.load(tiles_ptr + 3 * t + 2)
    slot = meta_ptr + (module * n_segments + seg) * 2
    rank = tl.load(slot)
    off = tl.load(slot + 1)
    return row0, row1, rank, off


@triton.jit
def _out_block(row0, row1, fan_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows of the tile and its block of output features, with their masks."""
    rm = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rm < row1, rn, rn < fan_out


@triton.jit
def _add_to_out(out_ptr, rm, mask_m, rn, mask_n, acc, stride_out):
    """out[rm, rn] += acc, in out's dtype (each element belongs to one program: no atomics)."""
    ptrs = out_ptr + rm[:, None] * stride_out + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    total = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plus_h_times_bt(acc, h, bt_ptr, rows, mask_r, rn, mask_n, stride_b,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + h [BLOCK_M, BLOCK_R] times rows `rows`, columns rn of Bt."""
    bt = tl.load(bt_ptr + rows[:, None] * stride_b + rn[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if UPCAST:
        h = h.to(tl.float32)
        bt = bt.to(tl.float32)
    return acc + tl.dot(h, bt, input_precision=PRECISION)


@triton.jit
def _x_times_a(x_ptr, a_ptr, rm, mask_m, rr, mask_r, fan_in, stride_x, stride_a,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_R] float32: rows rm of x times rows rr of A, transposed."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, fan_in, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < fan_in
        xt = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptr + rr[None, :] * stride_a + rk[:, None], mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)
    return acc


@triton.jit
def shrink_kernel(x_ptr, a_ptr, h_ptr, tiles_ptr, meta_ptr, module, n_segments, fan_in,
                  stride_x, stride_a, stride_h,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    row0, row1, rank, off = _tile(tiles_ptr, meta_ptr, module, n_segments)
    if row1 <= row0 or rank == 0:
        return
    rm = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rm < row1
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        acc = _x_times_a(x_ptr, a_ptr, rm, mask_m, (off + rr).to(tl.int64), mask_r, fan_in, stride_x, stride_a,
                         BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, UPCAST)
        tl.store(h_ptr + rm[:, None] * stride_h + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def expand_kernel(h_ptr, bt_ptr, out_ptr, tiles_ptr, meta_ptr, module, n_segments, fan_out,
                  stride_h, stride_b, stride_out,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    row0, row1, rank, off = _tile(tiles_ptr, meta_ptr, module, n_segments)
    if row1 <= row0 or rank == 0:
        return
    rm, mask_m, rn, mask_n = _out_block(row0, row1, fan_out, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        ht = tl.load(h_ptr + rm[:, None] * stride_h + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = _plus_h_times_bt(acc, ht, bt_ptr, (off + rr).to(tl.int64), mask_r, rn, mask_n, stride_b,
                               PRECISION, UPCAST)
    _add_to_out(out_ptr, rm, mask_m, rn, mask_n, acc, stride_out)


@triton.jit
def fused_kernel(x_ptr, a_ptr, bt_ptr, out_ptr, tiles_ptr, meta_ptr, module, n_segments, fan_in, fan_out,
                 stride_x, stride_a, stride_b, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    row0, row1, rank, off = _tile(tiles_ptr, meta_ptr, module, n_segments)
    if row1 <= row0 or rank == 0:
        return
    rm, mask_m, rn, mask_n = _out_block(row0, row1, fan_out, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        rows = (off + rr).to(tl.int64)
        h = _x_times_a(x_ptr, a_ptr, rm, mask_m, rows, mask_r, fan_in, stride_x, stride_a,
                       BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, UPCAST)
        # h rounded to the activations' dtype, as the two-kernel path stores it
        acc = _plus_h_times_bt(acc, h.to(x_ptr.dtype.element_ty), bt_ptr, rows, mask_r, rn, mask_n, stride_b,
                               PRECISION, UPCAST)
    _add_to_out(out_ptr, rm, mask_m, rn, mask_n, acc, stride_out)


def grid_n(fan_out: int, block_n: int) -> int:
    return triton.cdiv(fan_out, block_n)
