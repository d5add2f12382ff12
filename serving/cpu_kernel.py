"""A small C++ loop for the CPU: every segment's update of a batch in one call.

On a many-task batch, the torch loop in ``lora_segments`` spends a good part of its time in
Python and in the dispatcher: four tensor operations per segment, for every segment of every
adapted module. This kernel runs the same two products per segment in C++, with the GIL released.
On a 2-core CPU with MiniLM shapes it took a 32-row batch of 27 tasks from about 1.25x to about
1.15x the base model's time (10 tasks: 1.18x to 1.12x).

Running the segments in parallel (``at::parallel_for`` with OpenMP) measured no faster than this
loop, and Python threads were slower, so the loop is serial; each product uses the intra-op
threads as torch decides.

It is compiled with ``torch.utils.cpp_extension`` into ``$INCRELORA_HOME/cpu_kernel`` the first
time a CPU bank is created (about 20 s), or ahead of time by ``main()``, which ``make`` runs when
it sets up ``.venv``. The build holds an OS file lock with a timeout, so a
build killed half-way never blocks later ones. Without a working compiler, when another process's
build takes too long, or with ``INCRELORA_CPU_KERNEL=0``, the torch loop runs instead: it gives
the same values.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "INCRELORA_CPU_KERNEL"
NAME = "increlora_cpu_segments_v2"
BUILD_WAIT_S = 300.0  # how long to wait for another process's build before using the torch loop

SOURCE = r"""
#include <torch/extension.h>

// out[start_i:end_i] += (x[start_i:end_i] A_i^T) B_i^T for every segment i.
void add_segment_updates(const torch::Tensor& x, const std::vector<int64_t>& starts,
                         const std::vector<int64_t>& ends, const std::vector<torch::Tensor>& A,
                         const std::vector<torch::Tensor>& B, torch::Tensor& out) {
  for (size_t i = 0; i < starts.size(); ++i) {
    const int64_t rows = ends[i] - starts[i];
    if (rows <= 0) continue;
    auto h = at::mm(x.narrow(0, starts[i], rows), A[i].t());  // [rows, r_i]
    auto o = out.narrow(0, starts[i], rows);
    o.addmm_(h, B[i].t());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_segment_updates", &add_segment_updates, py::call_guard<py::gil_scoped_release>());
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def build_directory() -> Path:
    from increlora.assets import cache_home

    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return cache_home() / "cpu_kernel" / tag


def _build():
    from filelock import FileLock, Timeout
    from torch.utils.cpp_extension import load_inline

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder / "increlora.lock"), timeout=BUILD_WAIT_S):
            # torch's own build marker is a plain file: one left by a killed build would make
            # load_inline wait forever. Holding the OS lock, no build of ours is running.
            (folder / "lock").unlink(missing_ok=True)
            return load_inline(NAME, cpp_sources=SOURCE, extra_cflags=["-O2"], build_directory=str(folder),
                               verbose=False)
    except Timeout:
        raise RuntimeError(f"another process has held {folder / 'increlora.lock'} for {BUILD_WAIT_S:.0f} s") from None


def kernel():
    """The compiled module, or None (disabled, or it could not be built: logged once)."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                logger.info("compiling the CPU segment kernel (once; cached in %s)", build_directory())
                _module = _build()
            except Exception as exc:  # noqa: BLE001 - no compiler, headers, ninja or lock: the torch loop serves
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                logger.warning("CPU segment kernel unavailable (%s); using the torch loop", first)
                _module = None
            _tried = True
    return _module


def add_segment_updates(x: torch.Tensor, segments: Sequence[tuple[int, int]], A_list: Sequence[torch.Tensor],
                        B_list: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """Add B_i A_i x to out's rows of segment i in place, with the kernel; False when it is not available."""
    module = kernel()
    if module is None:
        return False
    module.add_segment_updates(x, [s for s, _ in segments], [e for _, e in segments], list(A_list),
                               list(B_list), out)
    return True


def main() -> int:
    """Build (or find) the kernel now; 0 when it is usable."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return 0 if kernel() is not None else 1
