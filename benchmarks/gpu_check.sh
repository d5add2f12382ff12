#!/usr/bin/env bash
# The serving runtime's GPU checks in one script, for a machine with a CUDA GPU. Each step stops at its
# own time limit (150 + 120 + 2 x 100 s), so the whole script ends within 8 minutes:
#   1. the serving correctness tests, every AdapterBank on the GPU (a bank takes the GPU and the Triton
#      kernels by default), the kernels compiled for this GPU against the reference in three dtypes;
#   2. kernel_timings.py: per-module timings of the torch loop, the Triton kernels, padded grouped_mm and
#      PEFT's mixed batch, launches per call and GB/s;
#   3. serve_throughput.py on the GPU, float32 (with PEFT) and bfloat16: the whole bank against the
#      base model, with and without CUDA graphs (a capture fails if a forward reads a device value).
# It installs nothing: python3 must hold torch with CUDA (which brings triton), transformers, peft,
# safetensors, pytest and hypothesis (the HTTP tests, which need fastapi, are left out).
# Logs go to $OUT (default /tmp/gpu_check).
#
#     bash benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root
#     DEVICE=cpu TRITON_INTERPRET=1 BENCH_ARGS="--k 1 4 --reps 2" bash benchmarks/gpu_check.sh   # a dry run
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:---reps 10}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/increlora_gpu_work}  # generated adapters, outside $OUT
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

$PYTHON - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/env.txt"
import sys, torch, transformers
device = sys.argv[1]
name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}: {name}")
assert not device.startswith("cuda") or torch.cuda.is_available(), "no CUDA device visible"
EOF

status=0
timeout 150 $PYTHON -m pytest -q -p no:cacheprovider tests/test_multi_lora_segments.py \
    tests/test_serving_property.py tests/test_serving_bank.py tests/test_triton_kernels.py \
    tests/test_serving_triton_bank.py 2>&1 | tee "$OUT/tests.log" || status=1

if [ -z "${KERNEL_ARGS:-}" ]; then
    KERNEL_ARGS="--reps 30"
    [ "$DEVICE" = cpu ] && KERNEL_ARGS="--k 1 4 --rows 64 --reps 2"
fi
timeout 120 $PYTHON benchmarks/kernel_timings.py --device "$DEVICE" $KERNEL_ARGS 2>&1 | grep -v "Warning" \
    | tee "$OUT/kernels.log" || status=1

# random MiniLM-shaped weights: the model hub is not reachable from such machines
for dtype in float32 bfloat16; do
    extra=()
    [ "$dtype" = bfloat16 ] && extra=(--skip-peft)
    timeout 100 $PYTHON benchmarks/serve_throughput.py --device "$DEVICE" --dtype "$dtype" --random-weights --load-n 0 \
        --work "$WORK" $BENCH_ARGS "${extra[@]}" 2>&1 | grep -v "Warning" | tee "$OUT/bench_$dtype.log" \
        || status=1
done
exit $status
