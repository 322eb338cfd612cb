#!/usr/bin/env bash
# Builds the CUDA emulator library: csrc/cuda/*.cu compiled as C++ against csrc/cuda_emu (threads as fibers on
# the CPU), plus the CUDA ATen glue and the operator schemas, registered as torch.ops.opdcore_emu.* on the CPU
# key. tests/test_cuda.py runs against it when no GPU is present (it builds it through this script).
#
#   scripts/build_cuda_emu.sh [OUT_DIR]     # default build/cuda_emu; prints the library's path
#   OPDCORE_EMU_ASAN=1 scripts/build_cuda_emu.sh    # + AddressSanitizer on the kernels, in build/cuda_emu_asan
#
# With ASan the library must run in a process that preloads the ASan runtime: scripts/cuda_emu_memcheck.sh.
#
# Rebuilds only when a source, this script or the torch version changed (a stamp next to the library).
set -euo pipefail
cd "$(dirname "$0")/.."
ASAN=${OPDCORE_EMU_ASAN:-0}
OUT=${1:-$( [ "$ASAN" = "1" ] && echo build/cuda_emu_asan || echo build/cuda_emu )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
CXX=${CXX:-g++}
mkdir -p "$OUT"
LIB="$OUT/libopdcore_cuda_emu.so"

read -r TORCH_VERSION ABI TORCH_LIB < <("$PYTHON" -c "import os, torch; print(torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI), os.path.join(os.path.dirname(torch.__file__), 'lib'))")
TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem '+p for p in c.include_paths()))")
SOURCES=(csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda_emu/*.h csrc/cuda_emu/*.cpp csrc/cuda_emu/include/*.h csrc/torch/*.h
         csrc/cuda_emu/include/cuda/atomic csrc/include/opdcore/*.h csrc/torch/registration.cpp csrc/cpu/packing.cpp
         csrc/torch/cuda/*.h csrc/torch/cuda/*.cpp "$0")
STAMP=$( (echo "$TORCH_VERSION $CXX asan=$ASAN"; cat "${SOURCES[@]}") | sha256sum | cut -c1-16)
if [ -f "$LIB" ] && [ "$(cat "$LIB.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "$LIB"
  exit 0
fi

# The emulator's headers come first, so <cuda_runtime.h> & co. resolve to csrc/cuda_emu/include.
COMMON=(-std=c++17 -fPIC -Wall -Wextra -Wno-unknown-pragmas -DOPDCORE_CUDA_EMU
        -D_GLIBCXX_USE_CXX11_ABI="$ABI" -I csrc/cuda_emu/include -I csrc/include -I csrc/torch)
OBJ=$(mktemp -d)
trap 'rm -rf "$OBJ"' EXIT
pids=()
compile() {  # out, flags...
  local out=$1; shift
  "$CXX" "${COMMON[@]}" "$@" -c -o "$OBJ/$out" >"$OBJ/$out.log" 2>&1 || { cat "$OBJ/$out.log"; echo "FAILED: $*" >&2; return 1; }
}
# The kernels run under UBSan's cheap checks: a misaligned 16-byte vector access (the emulator's uint4 is
# alignas(16), as on the GPU, where it would fault), an out-of-bounds index into a fixed-size array, a bad shift,
# signed overflow, division by zero. Any report aborts the process.
UBSAN=(-fsanitize=alignment,bounds,shift,signed-integer-overflow,integer-divide-by-zero,null
       -fno-sanitize-recover=all)
[ "$ASAN" = "1" ] && UBSAN+=(-fsanitize=address -fno-omit-frame-pointer)
# FMA contraction on, like nvcc's default (-fmad=true), where the host has FMA (-march=native).
for f in csrc/cuda/*.cu; do
  compile "$(basename "$f").o" -O2 -march=native -ffp-contract=fast "${UBSAN[@]}" -x c++ "$f" & pids+=($!)
done
compile emu.o -O2 csrc/cuda_emu/emu.cpp & pids+=($!)
compile cpu_packing.o -O2 csrc/cpu/packing.cpp & pids+=($!)  # check_cu_seqlens, which the packing glue calls
# shellcheck disable=SC2086
compile registration.o -O1 $TORCH_INC -DOPDCORE_LIBRARY=opdcore_emu csrc/torch/registration.cpp & pids+=($!)
# shellcheck disable=SC2086
compile selftest.o -O1 $TORCH_INC csrc/cuda_emu/selftest.cpp & pids+=($!)
for f in csrc/torch/cuda/*.cpp; do
  # shellcheck disable=SC2086
  compile "glue_$(basename "$f").o" -O1 $TORCH_INC "$f" & pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || exit 1
"$CXX" -shared "${UBSAN[@]}" -o "$LIB.tmp" "$OBJ"/*.o -L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -ltorch -ltorch_cpu -lc10 -lpthread
mv "$LIB.tmp" "$LIB"
echo "$STAMP" >"$LIB.stamp"
echo "$LIB"
