#!/usr/bin/env bash
# A GPU session's checks as one run (the device tool: `bash bench/device_check.sh`, carry [".dev"]):
# the environment, tests/test_cuda_*.py on the real GPU, then bench/gpu.py against llama.cpp built with CUDA,
# the build running beside the tests. .dev/ (git-ignored) holds what the device cannot fetch:
#   .dev/llama-src.tar.gz  llama.cpp's C/C++ tree from the llama-cpp-python sdist (vendor/llama.cpp, a
#                          folder llama.cpp/ inside; its models/, docs/, tests/ and other backends may be left out)
#   .dev/*.whl             wheels the device's Python lacks (gguf)
# Knobs: DEADLINE (seconds for the whole script, default 430), TEST_LIMIT (200), GB (2), DECODE (48),
# LLAMA_FA (off). Everything is logged to $OUT/log.txt.
set -u
OUT=${OUT:-$(mktemp -d)}
DEADLINE=${DEADLINE:-430}; TEST_LIMIT=${TEST_LIMIT:-200}; GB=${GB:-2}; DECODE=${DECODE:-48}; LLAMA_FA=${LLAMA_FA:-off}
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s); left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || exit 1
# editable, as here: its finder maps hotcold.engine to engine/ even where the repo's hotcold/ is on the path
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export PYTHONPATH=/tmp/site
python3 - <<'EOF'
import importlib.metadata as md
for p in ("numpy", "numba", "numba-cuda", "llvmlite", "gguf", "cuda-bindings", "cuda-python"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "-")
from numba import cuda
print("cuda available:", cuda.is_available(), "simulator:", cuda.config.ENABLE_CUDASIM if hasattr(cuda, "config") else "?")
try:
    cuda.detect()
except Exception as e:  # noqa: BLE001
    print("cuda.detect:", str(e).splitlines()[0] if str(e) else type(e).__name__)
EOF

echo "== llama.cpp build (background, log in build.log)"
mkdir -p /tmp/llama && tar xzf .dev/llama-src.tar.gz -C /tmp/llama
( python3 bench/gpu.py --build-only --llama-src /tmp/llama/llama.cpp --build /tmp/llama-build --llama-fa "$LLAMA_FA" \
    > "$OUT/build.log" 2>&1; echo "build rc $? after $(( $(date +%s) - start )) s" >> "$OUT/build.log" ) &
build=$!

echo "== tests/test_cuda_*.py on the GPU (limit ${TEST_LIMIT} s)"
per_test=(); python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
timeout "$TEST_LIMIT" python3 -m pytest -v --tb=short -p no:cacheprovider --durations=10 "${per_test[@]}" \
    tests/test_cuda_kernels.py tests/test_cuda_tier.py tests/test_cuda_model.py
echo "tests rc $? after $(( $(date +%s) - start )) s"

echo "== bench/gpu.py"
while kill -0 $build 2>/dev/null && [ "$(left)" -gt 150 ]; do sleep 5; done
tail -3 "$OUT/build.log"
llama=(--llama-src /tmp/llama/llama.cpp --build /tmp/llama-build)
[ -x /tmp/llama-build/bin/llama-bench ] || llama=(--no-llama)
kill $build 2>/dev/null; pkill -f "cmake --build" 2>/dev/null; pkill nvcc 2>/dev/null
timeout "$(( $(left) > 30 ? $(left) : 30 ))" python3 bench/gpu.py --gb "$GB" --decode "$DECODE" --prompt 32 \
    --work /tmp/gpu-work "${llama[@]}"
echo "bench rc $? after $(( $(date +%s) - start )) s"
