#!/usr/bin/env bash
# The emulator's memcheck: tests/test_cuda.py with the CUDA kernels built under AddressSanitizer (and UBSan), so
# any out-of-bounds read or write of a kernel into a tensor, or a misaligned vector access, aborts with a report.
# The ASan runtime (and libstdc++, whose __cxa_throw ASan wraps) must be preloaded into Python.
#
#   scripts/cuda_emu_memcheck.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
ASAN_LIB=$(${CXX:-g++} -print-file-name=libasan.so)
STDCXX_LIB=$(${CXX:-g++} -print-file-name=libstdc++.so)
[ -f "$ASAN_LIB" ] || { echo "no ASan runtime for ${CXX:-g++} (libasan.so not found)"; exit 2; }
OPDCORE_EMU_ASAN=1 PYTHON="$PYTHON" bash scripts/build_cuda_emu.sh >/dev/null
# -s: a sanitizer report ends the process, and pytest's output capture would swallow it
LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" ASAN_OPTIONS=detect_leaks=0 OPDCORE_EMU_ASAN=1 \
  "$PYTHON" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py "$@"
