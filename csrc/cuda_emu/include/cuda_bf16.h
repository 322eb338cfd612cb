// Emulator stand-in for CUDA's cuda_bf16.h: the bfloat16 conversions opdcore's kernels use (round to nearest
// even; NaN stays a quiet NaN, as __float2bfloat16_rn does).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 { unsigned short x; };
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((b >> 16) | 0x40u)};
  b += 0x7fffu + ((b >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(b >> 16)};
}
