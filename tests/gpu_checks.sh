#!/usr/bin/env bash
# The GPU checks of issue 15 as one prepared script for a machine with CUDA (a few minutes):
#   bash tests/gpu_checks.sh [OUT_DIR]
# Runs `pytest -m gpu` (the tensor multi-crop and nvJPEG on the device, mixed-precision steps, the fp16 clip, k-NN on the GPU vs the CPU, NCCL at
# world size 1, compile vs eager, bench train of the DINO ViT-S/16 recipe in bf16) and leaves the
# bench JSON record and the test log under OUT_DIR (default results/bench/gpu), with the GPU named.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/bench/gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
if ! "$python" -c "import ssl_bench, pytest" 2>/dev/null; then
  "$python" -m pip install -q -e '.[dev]'
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} | tee "$out/gpu.txt"
SSL_BENCH_GPU_OUT="$out" "$python" -m pytest -m gpu -v -rs -s tests/test_gpu.py tests/data/ 2>&1 | tee "$out/pytest-gpu.log"
