#!/usr/bin/env bash
# Compile check of the CUDA kernels without a GPU: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, C++17,
# warnings as errors, and a register/spill report; the CUTLASS kernel csrc/cutlass/*.cu for sm_90a (headers of
# the pinned nvidia-cutlass package, or OPDCORE_CUTLASS_DIR) and its host-side layout check. Optionally
# (OPDCORE_CHECK_GLUE=1, the default when the torch headers are found) the CUDA ATen glue csrc/torch/cuda/*.cpp with the host compiler against the
# installed torch's headers (a CPU wheel ships the c10/cuda and ATen/cuda headers too) and CUDA's includes.
#
#   scripts/check_cuda_compile.sh            # uses nvcc from PATH, python from .venv if present
#   NVCC=/usr/local/cuda/bin/nvcc PYTHON=python3 scripts/check_cuda_compile.sh
# Exit status 0 only when everything compiled with no warning.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -x "$NVCC" ] || { echo "nvcc not found (set NVCC=...)"; exit 2; }
echo "nvcc: $NVCC ($("$NVCC" --version | tail -1))"

# --Werror all-warnings turns nvcc's (front end and ptxas) warnings into errors; -Xcompiler passes -Wall -Wextra
# -Werror to the host compiler for the host side of each .cu. ptxas -v reports registers and spills: a few
# bytes of spill in a cold path are fine (ptxas does that on sm_80 for two top-k variants), more than
# MAX_SPILL bytes in a kernel fails the check (it would mean a register array went to local memory).
MAX_SPILL=${MAX_SPILL:-64}
NVFLAGS=(-std=c++17 -O3 -lineinfo -I csrc/include
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
  --Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror
  -Xptxas=-v)
status=0
for f in csrc/cuda/*.cu; do
  o="$OUT/$(basename "$f").o"
  log="$OUT/$(basename "$f").log"
  echo "== nvcc $f"
  if ! "$NVCC" "${NVFLAGS[@]}" -c "$f" -o "$o" >"$log" 2>&1; then
    cat "$log"; echo "FAILED: $f"; status=1; continue
  fi
  # ptxas -v: "N bytes stack frame, S bytes spill stores, L bytes spill loads" after each entry function.
  worst=$(grep -oE "[0-9]+ bytes spill stores" "$log" | awk '{ if ($1 > m) m = $1 } END { print m + 0 }')
  if [ "$worst" -gt "$MAX_SPILL" ]; then
    echo "FAILED: a kernel in $f spills $worst bytes (> $MAX_SPILL)"; status=1
  fi
  if grep -iE "warning" "$log" >/dev/null; then grep -iE "warning" "$log"; echo "FAILED: warnings in $f"; status=1; fi
  echo "   $(grep -c 'Compiling entry function' "$log") kernel compilations (sm_80 + sm_90), no warnings, largest spill ${worst} bytes"
done

# The CUTLASS sm_90a kernel (csrc/cutlass), as CMake builds it: wgmma needs the arch-specific target; CUTLASS's
# headers are system headers (their warnings are not ours), ours stay under -Werror. Then the host program
# layout_check.cu checks the accumulator layout the epilogue assumes against CuTe's, and runs here (no GPU).
FIND_CUTLASS="import importlib.util as u, os; s = u.find_spec('cutlass_library')
print(os.path.join(s.submodule_search_locations[0], 'source', 'include') if s else '')"
CUTLASS_DIR=${OPDCORE_CUTLASS_DIR:-$("$PYTHON" -c "$FIND_CUTLASS" 2>/dev/null || true)}
if [ -n "$CUTLASS_DIR" ] && [ -f "$CUTLASS_DIR/cute/tensor.hpp" ]; then
  CUTFLAGS=(-std=c++17 -O3 -DNDEBUG -lineinfo -I csrc/include -isystem "$CUTLASS_DIR" --expt-relaxed-constexpr
            -DOPDCORE_WITH_CUTLASS=1 -gencode=arch=compute_90a,code=sm_90a
            --Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror)
  for f in csrc/cutlass/*.cu; do
    [ "$(basename "$f")" = layout_check.cu ] && continue
    log="$OUT/$(basename "$f").log"
    echo "== nvcc $f (CUTLASS $CUTLASS_DIR, sm_90a)"
    if ! "$NVCC" "${CUTFLAGS[@]}" -Xptxas=-v -c "$f" -o "$OUT/$(basename "$f").o" >"$log" 2>&1; then
      cat "$log"; echo "FAILED: $f"; status=1; continue
    fi
    worst=$(grep -oE "[0-9]+ bytes spill stores" "$log" | awk '{ if ($1 > m) m = $1 } END { print m + 0 }')
    # C7510: a call inside the wgmma pipeline serialises it (an assert, a non-inlined epilogue function).
    if grep -iE "warning|C7510" "$log" >/dev/null; then
      grep -iE "warning|C7510" "$log"; echo "FAILED: warnings in $f"; status=1
    fi
    [ "$worst" -gt 0 ] && { echo "FAILED: a kernel in $f spills $worst bytes"; status=1; }
    regs=$(grep -oE 'Used [0-9]+ registers' "$log" | sort -u | tr '\n' ' ')
    echo "   $(grep -c 'Compiling entry function' "$log") kernel compilations, ${regs}no spills"
  done
  echo "== nvcc csrc/cutlass/layout_check.cu (host program) and run"
  if "$NVCC" "${CUTFLAGS[@]}" -O1 -o "$OUT/layout_check" csrc/cutlass/layout_check.cu >"$OUT/layout.log" 2>&1
  then
    "$OUT/layout_check" | sed 's/^/   /' ||
      { echo "FAILED: the fused-head epilogue's register layout is not CuTe's"; status=1; }
  else
    cat "$OUT/layout.log"; echo "FAILED: csrc/cutlass/layout_check.cu"; status=1
  fi
else
  echo "== csrc/cutlass: FAILED, CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0, or OPDCORE_CUTLASS_DIR=...)"
  status=1
fi

# The glue: host compiler, torch headers (as system headers: their own warnings are not ours), CUDA includes.
# A CPU wheel of torch ships c10/cuda and ATen/cuda headers but not the one generated by its CUDA build,
# c10/cuda/impl/cuda_cmake_macros.h (a single macro); a stub with that macro stands in for it when it is missing.
if [ "${OPDCORE_CHECK_GLUE:-1}" = "1" ] && ls csrc/torch/cuda/*.cpp >/dev/null 2>&1; then
  TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem '+p for p in c.include_paths()))" 2>/dev/null || true)
  if [ -z "$TORCH_INC" ]; then
    echo "== glue: skipped (no torch importable from $PYTHON)"
  else
    ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
    CUDA_INC=$(dirname "$(readlink -f "$NVCC")")/../include
    [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
    PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    STUB=()
    if ! "$PYTHON" -c "import os, sys, torch.utils.cpp_extension as c; sys.exit(0 if any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in c.include_paths()) else 1)"; then
      mkdir -p "$OUT/stub/c10/cuda/impl"
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
      STUB=(-isystem "$OUT/stub")
      echo "   (torch has no c10/cuda/impl/cuda_cmake_macros.h: a CPU wheel; using a stub)"
    fi
    for f in csrc/torch/cuda/*.cpp; do
      echo "== ${CXX:-g++} $f (torch headers from $PYTHON, CUDA includes $CUDA_INC)"
      # shellcheck disable=SC2086
      if ! ${CXX:-g++} -std=c++17 -O0 -c -o "$OUT/$(basename "$f").o" -Wall -Wextra -Werror \
          -DOPDCORE_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_API_INCLUDE_EXTENSION_H \
          -I csrc/include -I csrc/torch $TORCH_INC "${STUB[@]}" -isystem "$CUDA_INC" -isystem "$PY_INC" "$f"; then
        echo "FAILED: $f"; status=1
      else
        echo "   ok"
      fi
    done
  fi
fi
[ $status -eq 0 ] && echo "CUDA compile check passed" || echo "CUDA compile check FAILED"
exit $status
