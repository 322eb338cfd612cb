// Emulator stand-in for CUDA's cuda_runtime_api.h (see csrc/cuda_emu/emu.h).
#pragma once
#include "../emu.h"
