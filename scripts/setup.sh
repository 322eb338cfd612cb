#!/usr/bin/env bash
# Set up opdcore on a fresh machine: .venv, the CPU torch wheel, build tools, and opdcore in editable mode.
# torch is installed first and pinned: an unpinned or isolated-build torch pulls a multi-GB CUDA build that
# the extension would then be compiled against (or fail to configure with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OPDCORE_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q "$TORCH_SPEC"
.venv/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26" numpy
.venv/bin/pip install -q --no-build-isolation -e '.[test]'
.venv/bin/python -c "import opdcore, json; print('opdcore ready:', json.dumps(opdcore.build_info()))"
