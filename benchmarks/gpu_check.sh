#!/usr/bin/env bash
# The one GPU check, at most 5 minutes (each part has its own timeout; the benchmark prints and saves each
# row as it is measured). Runs from the repository root on a bare GPU machine with torch, triton and
# transformers but not this package: GPU tests, kernel micro-benchmarks and the end-to-end table.
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest -q -m gpu tests/test_triton_sampler.py tests/test_triton_attention.py \
    tests/test_triton_layers.py tests/test_flash_attention.py tests/test_gpu_engine.py 2>&1 | tee "$out/gpu_tests.log"
timeout 175 python3 benchmarks/gpu_bench.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
