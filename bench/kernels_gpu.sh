#!/usr/bin/env bash
# One device call: install, GPU kernel tests, kernel benchmark, TTFT benchmark; all lands in $OUT.
# Usage (repo root, on the GPU machine): bash bench/kernels_gpu.sh
# Env: SKIP_TESTS=1, SKIP_KERNELS=1, SKIP_TTFT=1, TTFT_ARGS="...", KERNEL_ARGS="..."
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/env.txt" 2>&1 \
  || { mkdir -p /tmp/shim && cp -r blend /tmp/shim/ && ln -sfn "$PWD/triton_kernels" /tmp/shim/blend/triton_kernels \
       && export PYTHONPATH=/tmp/shim; echo "pip -e failed; using shim" | tee -a "$OUT/env.txt"; }
python3 -c "import blend.triton_kernels.attention as a, torch, triton, transformers; print(a.__file__, torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/env.txt"
python3 -c "import xformers.ops" >>"$OUT/env.txt" 2>&1; echo "xformers import rc=$?" >>"$OUT/env.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_deviation.py \
    tests/test_kernels_rope.py tests/test_kernels_fusion.py tests/test_layer_graphs.py 2>&1 | tee "$OUT/kernels_gpu_tests.txt" | tail -5
fi
if [ -z "${SKIP_KERNELS:-}" ]; then
  python3 -m bench.kernels --out "$OUT/kernels.json" ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernels_bench.txt"
fi
if [ -z "${SKIP_TTFT:-}" ]; then
  mkdir -p /tmp/prof
  python3 -m bench.ttft_gpu --out "$OUT/ttft_gpu.json" --profile-dir /tmp/prof ${TTFT_ARGS:-} 2>&1 | tee "$OUT/ttft_bench.txt"
  for f in /tmp/prof/*.txt; do echo "=== $f"; cat "$f"; done > "$OUT/ttft_profiles.txt" 2>/dev/null
fi
