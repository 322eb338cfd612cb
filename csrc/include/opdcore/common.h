// Shared scalar types and helpers for opdcore's CPU kernels. No torch types: the kernels work on raw
// pointers so the same interfaces have a CUDA twin and plain compilers can build them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace opdcore {

// 16-bit storage types with the same bit layout as at::BFloat16 / at::Half.
struct bfloat16 { uint16_t bits; };
struct float16 { uint16_t bits; };

// Accumulator type: float for 16/32-bit inputs, double for double (so float64 gradcheck is exact).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bfloat16 x) { return __builtin_bit_cast(float, uint32_t(x.bits) << 16); }
inline float to_float(float16 x) {
#if defined(__FLT16_MANT_DIG__)
  return float(__builtin_bit_cast(_Float16, x.bits));
#else
  const uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t b;
  if (exp == 0x1f) b = sign | 0x7f800000u | (man << 13);
  else if (exp != 0) b = sign | ((exp + 112) << 23) | (man << 13);
  else if (man == 0) b = sign;
  else {  // subnormal half: renormalise
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while (!(m & 0x400u));
    b = sign | uint32_t(112 - e) << 23 | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

inline void from_float(float v, float* out) { *out = v; }
inline void from_float(double v, double* out) { *out = v; }
inline void from_float(float v, bfloat16* out) {  // round to nearest even, NaN kept quiet
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) { out->bits = 0x7fc0; return; }
  b += 0x7fffu + ((b >> 16) & 1u);
  out->bits = uint16_t(b >> 16);
}
inline void from_float(float v, float16* out) {
#if defined(__FLT16_MANT_DIG__)
  _Float16 h = (_Float16)v;
  std::memcpy(&out->bits, &h, 2);
#else
  // Portable fallback through the bit pattern (round to nearest even).
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  int32_t e = int32_t((b >> 23) & 0xff) - 127 + 15;
  uint32_t m = b & 0x7fffffu;
  if (((b >> 23) & 0xff) == 0xff) { out->bits = uint16_t(sign | 0x7c00u | (m ? 0x200u : 0)); return; }
  if (e >= 31) { out->bits = uint16_t(sign | 0x7c00u); return; }
  if (e <= 0) {
    if (e < -10) { out->bits = uint16_t(sign); return; }
    m |= 0x800000u;
    const int shift = 14 - e;
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    out->bits = uint16_t(sign | r);
    return;
  }
  uint32_t r = (uint32_t(e) << 10) | (m >> 13), rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  out->bits = uint16_t(sign | r);
#endif
}

// exp(x) for x <= 0 (the only range the streaming softmax needs), vectorisable: Cephes-style range
// reduction plus a degree-6 polynomial, about 2 ulp. Returns 0 below -87 (underflow) and for -inf.
inline float exp_nonpos(float x) {
  // Branch-free on purpose: a conditional here becomes a jump and stops gcc vectorising the callers' loops.
  const float keep = x > -87.0f ? 1.0f : 0.0f;
  x = x > -87.0f ? x : -87.0f;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: std::floor does not vectorise under gcc's default
  // -ftrapping-math. Exact for |x / ln 2| < 2^22, far beyond the clamped range.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // __builtin_bit_cast, not memcpy: a memcpy into a local also blocks vectorisation of `omp simd` loops.
  const float scale = __builtin_bit_cast(float, (int32_t(n) + 127) << 23);
  return keep * y * scale;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// log(x) for x in [0, 1] (probabilities), vectorisable like exp_nonpos: Cephes logf (exponent split plus a
// degree-9 polynomial, about 1 ulp for normal x); 0 gives -inf. Subnormal x (< 1.2e-38) is inaccurate, which
// is harmless where it is used: every log here is weighted by a probability of the same size.
inline float log_prob(float x) {
  // Branch-free like exp_nonpos (a conditional would stop the callers' loops vectorising).
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  const float m0 = __builtin_bit_cast(float, (bits & 0x807fffff) | 0x3f000000);  // x = m0 * 2^e, m0 in [0.5, 1)
  const float low = m0 < 0.707106781186547524f ? 1.0f : 0.0f;
  const float fe = float(((bits >> 23) & 0xff) - 126) - low;
  const float m = m0 + low * m0 - 1.0f;  // 2 m0 - 1 or m0 - 1
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float r = m + y + 0.693359375f * fe;
  const float zero_to_neg_inf = x > 0.0f ? 0.0f : -std::numeric_limits<float>::infinity();  // a select of constants
  return r + zero_to_neg_inf;
}
inline double log_prob(double x) { return std::log(x); }

// Why a kernel stopped; row is the first offending row (or -1). kCudaError comes only from the CUDA entry
// points (a launch or runtime failure); its row field holds the cudaError_t value instead of a row.
struct Status {
  enum Code : int { kOk = 0, kNonFinite = 1, kAllNegInf = 2, kHeapNotFull = 3, kTargetUnseen = 4, kBadId = 5,
              kBadStudentLogprob = 6, kBadTeacherLogprob = 7, kCudaError = 8,
              kTeacherNonFinite = 9, kTeacherAllNegInf = 10 };  // the teacher's logits (dense divergences)
  Code code = kOk;
  int64_t row = -1;
  bool ok() const { return code == kOk; }
};

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

}  // namespace opdcore
