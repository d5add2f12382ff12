"""A small C++ kernel for the CPU: the segments of a batch shared out over the intra-op threads.

The torch loop in ``lora_segments`` runs one segment at a time, each product on one thread, so on
many-task batches one core does the work. Splitting the segments over Python threads was slower
(the idle OpenMP threads of the base model's products spin on the other core); this kernel instead
runs the segments inside one ``at::parallel_for``, on the same OpenMP threads, each segment's two
products single-threaded. On a 2-core CPU with MiniLM shapes it took a 32-row batch of 27 tasks
from 1.25x to 1.16x the base model's time (10 tasks: 1.18x to 1.12x).

It is compiled with ``torch.utils.cpp_extension`` the first time a bank is used on the CPU (about
20 s, then cached in torch's extensions folder). Without a working compiler, or with
``INCRELORA_CPU_KERNEL=0`` in the environment, the torch loop is used; both give the same values.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "INCRELORA_CPU_KERNEL"

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// out[start_i:end_i] += (x[start_i:end_i] A_i^T) B_i^T for every segment i, segments in parallel.
void lora_segments_parallel(const torch::Tensor& x, const std::vector<int64_t>& starts,
                            const std::vector<int64_t>& ends, const std::vector<torch::Tensor>& A,
                            const std::vector<torch::Tensor>& B, torch::Tensor& out) {
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t rows = ends[i] - starts[i];
      if (rows <= 0) continue;
      auto h = at::mm(x.narrow(0, starts[i], rows), A[i].t());  // [rows, r_i]
      auto o = out.narrow(0, starts[i], rows);
      o.addmm_(h, B[i].t());
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_segments_parallel", &lora_segments_parallel, py::call_guard<py::gil_scoped_release>());
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel():
    """The compiled module, or None (disabled, or it could not be built: logged once)."""
    global _module, _tried
    if _tried or not enabled():
        return _module if enabled() else None
    with _lock:
        if not _tried:
            try:
                from torch.utils.cpp_extension import load_inline

                logger.info("compiling the CPU segment kernel (once; cached afterwards)")
                _module = load_inline("increlora_cpu_segments_v1", cpp_sources=SOURCE, extra_cflags=["-O2"],
                                      verbose=False)
            except Exception as exc:  # noqa: BLE001 - no compiler, headers or ninja: the torch loop serves
                logger.warning("CPU segment kernel unavailable (%s); using the torch loop",
                               str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                _module = None
            _tried = True
    return _module


def lora_segments_parallel(x: torch.Tensor, segments: Sequence[tuple[int, int]], A_list: Sequence[torch.Tensor],
                           B_list: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """Add B_i A_i x to out's rows of segment i in place, with the kernel; False when it is not available."""
    module = kernel()
    if module is None:
        return False
    module.lora_segments_parallel(x, [s for s, _ in segments], [e for _, e in segments], list(A_list),
                                  list(B_list), out)
    return True
