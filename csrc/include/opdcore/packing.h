// Packed-sequence layout helpers (flash-attn varlen convention). Filled in by the packing work.
#pragma once
#include <cstdint>
