#!/usr/bin/env bash
# The serving runtime's GPU checks in one script, for a machine with a CUDA GPU:
#   1. the serving correctness tests, every AdapterBank on the GPU (a bank takes the GPU by default)
#      and lora_segments on it in float32, bfloat16 and float16;
#   2. serve_throughput.py on the GPU, float32 (with PEFT) and bfloat16.
# It installs nothing: python3 must hold torch with CUDA, transformers, peft, safetensors, pytest and
# hypothesis (the HTTP tests, which need fastapi, are left out). Logs go to $OUT (default /tmp/gpu_check).
#
#     bash benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root
#     DEVICE=cpu BENCH_ARGS="--k 1 4 --reps 2" bash benchmarks/gpu_check.sh   # a dry run of the script
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:---reps 20}
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
$PYTHON -m pytest -q -p no:cacheprovider tests/test_multi_lora_segments.py tests/test_serving_property.py \
    tests/test_serving_bank.py 2>&1 | tee "$OUT/tests.log" || status=1

# random MiniLM-shaped weights: the model hub is not reachable from such machines
for dtype in float32 bfloat16; do
    extra=()
    [ "$dtype" = bfloat16 ] && extra=(--skip-peft)
    $PYTHON benchmarks/serve_throughput.py --device "$DEVICE" --dtype "$dtype" --random-weights --load-n 0 \
        --work "$WORK" $BENCH_ARGS "${extra[@]}" 2>&1 | grep -v "Warning" | tee "$OUT/bench_$dtype.log" \
        || status=1
done
exit $status
