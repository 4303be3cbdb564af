#!/usr/bin/env bash
# One device call: install, GPU kernel tests, kernel benchmark; everything lands in $OUT.
# Usage (repo root, on the GPU machine): bash bench/kernels_gpu.sh [extra bench args]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { mkdir -p /tmp/shim && cp -r blend /tmp/shim/ && ln -sfn "$PWD/triton_kernels" /tmp/shim/blend/triton_kernels \
       && export PYTHONPATH=/tmp/shim; echo "pip -e failed; using shim" | tee -a "$OUT/install.log"; }
python3 -c "import blend.triton_kernels.attention as a, torch, triton; print(a.__file__, torch.__version__, triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import xformers.ops" >"$OUT/xformers.txt" 2>&1; echo "xformers import rc=$?" >>"$OUT/xformers.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_deviation.py \
    tests/test_kernels_rope.py tests/test_kernels_fusion.py 2>&1 | tee "$OUT/kernels_gpu_tests.txt" | tail -5
fi
python3 bench/kernels.py --out "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/kernels_bench.txt"
