#!/usr/bin/env bash
# GPU session check, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch, and no network:
#   1. build opdcore in place with its CUDA kernels (for this GPU's architecture only, to save time)
#   2. run the cuda-marked tests (CUDA vs CPU kernels and reference.py; on Hopper also the CUTLASS fused-head kernel)
#   3. compute-sanitizer memcheck (and racecheck, synccheck on the shared-memory kernels) on a small case
#   4. the benchmark table (benchmarks/bench_gpu.py; extra arguments are passed to it)
# Logs go to $OUT (or benchmarks/out/) when set. STAGES picks steps (default all: build,test,sanitize,bench),
# so a session with a per-command time limit can run them in two calls on the same machine.
#
#   bash benchmarks/gpu_check.sh [--n 8192 --v 151936 --k 16]
#   OPDCORE_CUTLASS_DIR=<dir with cute/ and cutlass/> bash benchmarks/gpu_check.sh   # CUTLASS headers brought along
#     (a machine without network and without the nvidia-cutlass package: carry the package's source/include, 27 MB)
#   STAGES=build,test bash benchmarks/gpu_check.sh; STAGES=sanitize,bench bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-benchmarks/out}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH
export CUDACXX=${CUDACXX:-$(command -v nvcc)}
STAGES=${STAGES:-build,test,sanitize,bench}
fail=0
step() { echo; echo "=== $*"; }
want() { [[ ",$STAGES," == *",$1,"* ]]; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$CUDACXX" --version | tail -1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")

if want build; then
step "build (CMAKE_CUDA_ARCHITECTURES=$ARCH)"
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
      --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" \
      ${OPDCORE_CUTLASS_DIR:+--config-settings=cmake.define.OPDCORE_CUTLASS_DIR="$OPDCORE_CUTLASS_DIR"} \
      >"$LOG/build.log" 2>&1; then
  tail -60 "$LOG/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -c "import opdcore; i = opdcore.build_info(); print(i); assert i['cuda_compiled'], 'built without CUDA kernels'" || {
  grep -iE "opdcore:|cuda" "$LOG/build.log" | head -20; exit 1; }
fi
# On Hopper the CUTLASS fused-head kernel must be in the build (CMake needs the nvidia-cutlass headers): its tests
# (tests/test_cuda.py, kernel="sm90") and benchmark row (extract_linear) check it against the streamed path.
if [ "$ARCH" = "90" ]; then
  "$PY" -c "import opdcore, sys; sys.exit(0 if opdcore.build_info().get('cutlass_sm90') else 1)" || {
    echo "WARNING: built without the CUTLASS sm_90a kernel (no CUTLASS headers found): its checks will not run"; fail=1; }
fi
"$PY" -c "import opdcore, sys; sys.exit(0 if opdcore.build_info()['cuda_compiled'] else 1)" || {
  echo "opdcore is not installed with CUDA kernels: run the build stage"; exit 1; }

if want test; then
step "cuda tests"
"$PY" -m pytest tests/test_cuda.py -m cuda -q -rf --maxfail=30 -p no:cacheprovider 2>&1 | tee "$LOG/tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
fi

if want sanitize; then
step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    echo "--- $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" benchmarks/sanitizer_case.py >"$LOG/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -5 "$LOG/sanitizer_$tool.log"
    [ $rc -eq 0 ] || { echo "$tool FAILED (rc $rc)"; fail=1; }
  done
else
  echo "compute-sanitizer not found"; fail=1
fi
fi

if want bench; then
step "benchmark"
"$PY" benchmarks/bench_gpu.py --json "$LOG/bench.json" "$@" 2>&1 | tee "$LOG/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
fi

echo
[ $fail -eq 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK FAILED"
exit $fail
