"""lora_segments through Triton: a per-batch table, then one launch per module (or two: shrink, expand).

The table is made once per batch and row granularity for every module: tiles [T, 3] (segment, first
row, end row; at most BLOCK_M rows each, never across two tasks) and meta [modules, segments, 2] (rank,
offset of the segment's task in the module's packed buffers). Both go to the device in one copy, into
device memory the table owns (two tables never share it, so a batch may hold several and a CUDA graph
may keep one), through pinned staging buffers the calling thread reuses in turn. T is rounded up to a
power of two so the grids of a batch size repeat; padding tiles return at once. Nothing in a forward
reads a device value back (no .item()), and no table is built while a CUDA graph is being captured.

The launch is registered as the custom op increlora::lora_segments_triton (it writes `out` in place),
so torch.compile and CUDA graphs see one opaque call per module.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .packed import PackedFactors

BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K = 32, 64, 16, 64
VARIANTS = ("split", "fused")
PRECISIONS = ("ieee", "tf32")


@dataclass
class SegmentTable:
    """One batch's metadata on the device; module i reads its row of meta and its own buffers."""

    tiles: torch.Tensor  # [T, 3] int64
    meta: torch.Tensor  # [modules, segments, 2] int64
    modules: Mapping[str, int]  # module name -> row of meta
    buffers: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per module: (A, Bt) as they were when the batch began
    max_rank: int
    workspace: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    @property
    def n_segments(self) -> int:
        return self.meta.shape[1]

    def h(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The shrink output [rows, max rank], shared by the modules of the batch one after another."""
        ws = self.workspace.get(dtype)
        if ws is None or ws.shape[0] < rows:
            ws = self.workspace[dtype] = torch.empty(rows, max(self.max_rank, 1), device=self.tiles.device,
                                                     dtype=dtype)
        return ws[:rows]


_staging = threading.local()
STAGING = 4  # pinned buffers per thread and device, used in turn: a batch's tables rarely wait on a copy


class _PinnedRing:
    """One thread's pinned host buffers for copies to one device; a buffer is refilled only once the
    copy out of it has run (its event)."""

    def __init__(self) -> None:
        self.slots: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None] * STAGING
        self.turn = 0

    def stage(self, values: list[int]) -> tuple[torch.Tensor, torch.cuda.Event]:
        i, self.turn = self.turn, (self.turn + 1) % STAGING
        n, slot = len(values), self.slots[i]
        if slot is None or slot[0].numel() < n:  # grown, never shrunk
            slot = self.slots[i] = (torch.empty(max(1024, 1 << (n - 1).bit_length()), dtype=torch.int64,
                                                pin_memory=True), torch.cuda.Event())
        else:
            slot[1].synchronize()  # the last copy out of this buffer has run
        slot[0][:n] = torch.tensor(values, dtype=torch.int64)
        return slot[0][:n], slot[1]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """values as a new int64 tensor on the device; on CUDA copied without blocking through this
    thread's pinned staging buffers."""
    with torch.inference_mode(False):  # normal tensors: a table is used in and out of inference mode
        if device.type != "cuda":
            return torch.tensor(values, dtype=torch.int64, device=device)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a Triton segment table cannot be built while a CUDA graph is captured: run the "
                               "forward once under the same BatchContext before capturing (it keeps its tables)")
        rings = getattr(_staging, "rings", None)
        if rings is None:
            rings = _staging.rings = {}
        ring = rings.get(device)
        if ring is None:
            ring = rings[device] = _PinnedRing()
        host, done = ring.stage(values)
        dev = torch.empty(len(values), dtype=torch.int64, device=device)
        dev.copy_(host, non_blocking=True)
        done.record()
        return dev


def build_table(segments: Sequence[tuple[int, int]], slots: Mapping[str, Sequence[tuple[int, int]]],
                stores: Mapping[str, PackedFactors], device: torch.device | str,
                block_m: int = BLOCK_M) -> SegmentTable:
    """segments[s] = (start, end) rows; slots[module][s] = (offset, rank) of segment s's task there."""
    device = torch.device(device)
    tiles = [(s, r, min(r + block_m, end))
             for s, (start, end) in enumerate(segments) for r in range(start, end, block_m)]
    padded = 1 << max(len(tiles) - 1, 0).bit_length()
    flat = [v for tile in tiles for v in tile] + [0, 0, 0] * (padded - len(tiles))
    names = list(slots)
    for name in names:
        if len(slots[name]) != len(segments):
            raise ValueError(f"{name}: {len(slots[name])} slots for {len(segments)} segments")
        flat += [v for offset, rank in slots[name] for v in (rank, offset)]
    values = _to_device(flat, device)
    max_rank = max((rank for name in names for _, rank in slots[name]), default=0)
    return SegmentTable(tiles=values[:3 * padded].view(padded, 3),
                        meta=values[3 * padded:].view(len(names), len(segments), 2),
                        modules={n: i for i, n in enumerate(names)},
                        buffers=[(stores[n].A, stores[n].Bt) for n in names], max_rank=max_rank)


def lora_segments_packed(x: torch.Tensor, out: torch.Tensor, table: SegmentTable, module: str, *,
                         variant: str = "split", precision: str = "ieee") -> torch.Tensor:
    """Add every segment's B' A x to out's rows, in place, for one module of the table; returns out.

    x [rows, in], out [rows, out_features], rows as in the table's segments.
    """
    if variant not in VARIANTS or precision not in PRECISIONS:
        raise ValueError(f"variant must be one of {VARIANTS} and precision one of {PRECISIONS}")
    i = table.modules.get(module)
    if i is None:
        return out
    a, bt = table.buffers[i]
    if x.dtype != a.dtype or out.dtype != a.dtype or x.device != a.device:
        raise ValueError(f"{module}: x {x.dtype} on {x.device} and out {out.dtype} must match the factors "
                         f"({a.dtype} on {a.device})")
    if x.shape[1] != a.shape[1] or out.shape[1] != bt.shape[1] or x.shape[0] != out.shape[0]:
        raise ValueError(f"{module}: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit factors of "
                         f"{a.shape[1]} -> {bt.shape[1]} features")
    h = table.h(x.shape[0], x.dtype) if variant == "split" else x.new_empty(0)
    torch.ops.increlora.lora_segments_triton(x.contiguous(), a, bt, out, h, table.tiles, table.meta, i,
                                             variant, precision)
    return out


@torch.library.custom_op("increlora::lora_segments_triton", mutates_args=("out", "h"))
def _launch(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
            tiles: torch.Tensor, meta: torch.Tensor, module: int, variant: str, precision: str) -> None:
    from . import triton_kernels as k

    n_tiles, n_segments = tiles.shape[0], meta.shape[1]
    common = dict(PRECISION=precision, UPCAST=k.INTERPRETED)
    if variant == "fused":
        k.fused_kernel[(n_tiles, k.grid_n(out.shape[1], BLOCK_N))](
            x, a, bt, out, tiles, meta, module, n_segments, x.shape[1], out.shape[1],
            x.stride(0), a.stride(0), bt.stride(0), out.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, **common)
        return
    k.shrink_kernel[(n_tiles,)](x, a, h, tiles, meta, module, n_segments, x.shape[1],
                                x.stride(0), a.stride(0), h.stride(0),
                                BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, **common)
    k.expand_kernel[(n_tiles, k.grid_n(out.shape[1], BLOCK_N))](
        h, bt, out, tiles, meta, module, n_segments, out.shape[1], h.stride(0), bt.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, **common)


@_launch.register_fake
def _(x, a, bt, out, h, tiles, meta, module, variant, precision) -> None:
    return None


def lora_segments_triton(x: torch.Tensor, segments: Sequence[tuple[int, int]], A_list: Sequence[torch.Tensor],
                         B_list: Sequence[torch.Tensor], out: torch.Tensor, *, variant: str = "split",
                         precision: str = "ieee") -> torch.Tensor:
    """lora_segments' signature on the Triton kernels: packs the factors for this one call (for tests and
    comparisons; the bank keeps its factors packed and builds one table per batch)."""
    store = PackedFactors(x.shape[1], out.shape[1], x.device, x.dtype, capacity=0)
    slots = [(store.add(a, b), a.shape[0]) for a, b in zip(A_list, B_list, strict=True)]
    table = build_table(segments, {"m": slots}, {"m": store}, x.device)
    return lora_segments_packed(x, out, table, "m", variant=variant, precision=precision)
