// Emulator stand-in for CUDA's cuda_runtime.h (see csrc/cuda_emu/emu.h): the runtime calls and device
// built-ins that opdcore's kernels use, executed on the host.
#pragma once
#include "../emu.h"
