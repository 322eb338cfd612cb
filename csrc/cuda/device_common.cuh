// Device helpers shared by the CUDA kernels: storage conversions, 16-byte vector (un)packing, candidate keys
// with the CPU's top-k order, bitonic sorts, the streaming (max, sumexp, entropy) algebra, status recording,
// and the per-row OPD reward math (opdcore/row_math.h with the device's exp/log).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "opdcore/common.h"
#include "opdcore/opd_loss.h"
#include "opdcore/row_math.h"
#include "opdcore/topk_stream.h"

namespace opdcore {
namespace cuda {
namespace dev {

// Dynamic shared memory. Under OPDCORE_CUDA_EMU (csrc/cuda_emu: these sources compiled as C++ and run on the
// CPU) the emulator hands out the block's buffer.
#ifdef OPDCORE_CUDA_EMU
#define OPDCORE_DYNAMIC_SMEM(name) unsigned char* name = ::opdcore_emu::dynamic_smem()
#else
#define OPDCORE_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kEmptyLocal = 0xffffffffu;  // 32-bit column id of an empty candidate slot

// ---- special values ----------------------------------------------------------------------------------------
template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }
template <typename A> __device__ __forceinline__ A pos_inf() { return -neg_inf<A>(); }
template <typename A> __device__ __forceinline__ A qnan();
template <> __device__ __forceinline__ float qnan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double qnan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }
template <typename A> __device__ __forceinline__ A lowest();  // most negative finite
template <> __device__ __forceinline__ float lowest<float>() { return -3.402823466e+38f; }
template <> __device__ __forceinline__ double lowest<double>() { return -1.7976931348623157e+308; }

// ---- math in the accumulator type ----------------------------------------------------------------------------
// y = x * (1/T) rounded once, never contracted into a later FMA: top-k ties compare these exact values.
__device__ __forceinline__ float scale(float x, float inv_t) { return __fmul_rn(x, inv_t); }
__device__ __forceinline__ double scale(double x, double inv_t) { return __dmul_rn(x, inv_t); }
// exp for the streaming sums (arguments <= 0): the SFU's ex2 for float (about 2 ulp near 0; -inf -> 0).
__device__ __forceinline__ float fast_exp(float d) { return __expf(d); }
__device__ __forceinline__ double fast_exp(double d) { return exp(d); }
// Accurate exp/log for per-row scalars and the reward math (the CPU uses std::exp / std::log there).
__device__ __forceinline__ float acc_exp(float d) { return expf(d); }
__device__ __forceinline__ double acc_exp(double d) { return exp(d); }
__device__ __forceinline__ float acc_log(float d) { return logf(d); }
__device__ __forceinline__ double acc_log(double d) { return log(d); }
template <typename A> __device__ __forceinline__ A amax(A a, A b) { return a < b ? b : a; }  // std::max
template <typename A> __device__ __forceinline__ A amin(A a, A b) { return b < a ? b : a; }  // std::min

// ---- storage <-> accumulator ---------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(bfloat16 x) { return __uint_as_float(uint32_t(x.bits) << 16); }
__device__ __forceinline__ float to_acc(float16 x) { return __half2float(__ushort_as_half(x.bits)); }

__device__ __forceinline__ uint16_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
__device__ __forceinline__ uint16_t f16_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ void from_acc(float v, float* o) { *o = v; }
__device__ __forceinline__ void from_acc(double v, double* o) { *o = v; }
__device__ __forceinline__ void from_acc(float v, bfloat16* o) { o->bits = bf16_bits(v); }  // round to nearest even
__device__ __forceinline__ void from_acc(float v, float16* o) { o->bits = f16_bits(v); }

// 16-byte vectors: W elements of T; element i sits at the lower address for lower i (little endian).
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int W = 4;
  __device__ static void unpack(const uint4& u, float (&y)[W]) {
    y[0] = __uint_as_float(u.x); y[1] = __uint_as_float(u.y); y[2] = __uint_as_float(u.z); y[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&v)[W]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};
template <> struct Vec<double> {
  static constexpr int W = 2;
  __device__ static void unpack(const uint4& u, double (&y)[W]) {
    y[0] = __hiloint2double(int(u.y), int(u.x));
    y[1] = __hiloint2double(int(u.w), int(u.z));
  }
  __device__ static uint4 pack(const double (&v)[W]) {
    return make_uint4(unsigned(__double2loint(v[0])), unsigned(__double2hiint(v[0])), unsigned(__double2loint(v[1])),
                      unsigned(__double2hiint(v[1])));
  }
};
template <> struct Vec<bfloat16> {
  static constexpr int W = 8;
  __device__ static void unpack(const uint4& u, float (&y)[W]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      y[2 * i] = __uint_as_float(w[i] << 16);
      y[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static uint4 pack(const float (&v)[W]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(bf16_bits(v[2 * i])) | (uint32_t(bf16_bits(v[2 * i + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <> struct Vec<float16> {
  static constexpr int W = 8;
  __device__ static void unpack(const uint4& u, float (&y)[W]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      y[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      y[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
  __device__ static uint4 pack(const float (&v)[W]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(f16_bits(v[2 * i])) | (uint32_t(f16_bits(v[2 * i + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// ---- candidate keys: the CPU order (value descending, ties to the lower id) as one comparison ---------------
// Float: a 64-bit key (order-preserving value bits << 32 | ~id): a larger key is a better candidate, so the
// threshold test and every sort step compare one integer. -0 is folded into +0 first (the CPU compares values).
// Double: a (value, id) pair compared like the CPU's `better`.
template <typename A> struct Cand;
template <> struct Cand<float> {
  using Key = unsigned long long;
  using Ord = unsigned int;  // order-preserving image of a value (block-wide threshold hint)
  __device__ static Ord ord(float v) {
    uint32_t u = __float_as_uint(v);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  __device__ static float from_ord(Ord o) { return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o); }
  __device__ static Key make(float v, uint32_t id) { return (Key(ord(v)) << 32) | Key(~id); }
  __device__ static float value(Key k) { return from_ord(Ord(k >> 32)); }
  __device__ static uint32_t id(Key k) { return ~uint32_t(k); }
  __device__ static bool better(Key a, Key b) { return a > b; }
  __device__ static Key empty() { return make(neg_inf<float>(), kEmptyLocal); }
};
template <> struct Cand<double> {
  struct Key { double v; uint32_t id; };
  using Ord = unsigned long long;
  __device__ static Ord ord(double v) {
    unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
    if (u == 0x8000000000000000ULL) u = 0ULL;
    return (u & 0x8000000000000000ULL) ? ~u : (u | 0x8000000000000000ULL);
  }
  __device__ static double from_ord(Ord o) {
    return __longlong_as_double(static_cast<long long>((o & 0x8000000000000000ULL) ? (o & 0x7fffffffffffffffULL) : ~o));
  }
  __device__ static Key make(double v, uint32_t id) { return Key{v, id}; }
  __device__ static double value(const Key& k) { return k.v; }
  __device__ static uint32_t id(const Key& k) { return k.id; }
  __device__ static bool better(const Key& a, const Key& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }
  __device__ static Key empty() { return Key{neg_inf<double>(), kEmptyLocal}; }
};

// (value, vocabulary id) with 64-bit ids: the merge of states (K2). Empty slots are (-inf, kEmptyId).
template <typename A>
struct GKey {
  A v;
  int64_t id;
  __device__ static bool better(const GKey& a, const GKey& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }
};

// ---- bitonic sorts, descending by `better` --------------------------------------------------------------------
// Pair p of a stage with half-distance j compares i = 2p - (p mod j) with i + j; direction from bit `size` of i.
// `at(i)` maps a virtual index to a reference, so a sort can run over scattered slots.
template <typename Key, typename At, typename Better>
__device__ __forceinline__ void bitonic_step(int i, int j, int size, At& at, Better better) {
  Key& a = at(i);
  Key& b = at(i + j);
  const Key ka = a, kb = b;
  const bool swap = (i & size) == 0 ? better(kb, ka) : better(ka, kb);
  if (swap) { a = kb; b = ka; }
}

// All 32 lanes of a warp; n a power of two; contiguous keys. Ends with __syncwarp.
template <typename Key, typename Better>
__device__ void warp_bitonic_sort(Key* keys, int n, int lane, Better better) {
  auto at = [keys](int i) -> Key& { return keys[i]; };
  __syncwarp();
  for (int size = 2; size <= n; size <<= 1)
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int p = lane; p < (n >> 1); p += 32) bitonic_step<Key>(2 * p - (p & (j - 1)), j, size, at, better);
      __syncwarp();
    }
}

// All threads of the block; n a power of two. The caller syncs before; ends with __syncthreads.
template <typename Key, typename At, typename Better>
__device__ void block_bitonic_sort(At at, int n, Better better) {
  for (int size = 2; size <= n; size <<= 1)
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int p = threadIdx.x; p < (n >> 1); p += blockDim.x) bitonic_step<Key>(2 * p - (p & (j - 1)), j, size, at, better);
      __syncthreads();
    }
}

__host__ __device__ __forceinline__ int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---- streaming state algebra (csrc/cpu/row_stream.h) ---------------------------------------------------------
// Rescale (s, t) from reference max m_old to m_new >= m_old.
template <typename A>
__device__ __forceinline__ void rescale(A m_old, A m_new, A& s, A& t) {
  if (m_old == neg_inf<A>()) { s = 0; t = 0; return; }
  const A d = m_old - m_new, f = fast_exp(d);
  t = f * (t + d * s);
  s = f * s;
}

// (m, s, t) <- merge((m, s, t), (m2, s2, t2)), as the CPU stream_merge does it.
template <typename A>
__device__ __forceinline__ void merge_mst(A& m, A& s, A& t, A m2, A s2, A t2) {
  const A mx = amax(m, m2);
  if (mx != neg_inf<A>()) {
    rescale(m, mx, s, t);
    rescale(m2, mx, s2, t2);
    s += s2;
    t += t2;
    m = mx;
  }
}

// ---- status -------------------------------------------------------------------------------------------------
// The host resets the word to all ones; the smallest (row, code) wins, so the glue reports the first bad row
// like the CPU (one code per row: kernels stop a row at its first failing check, in the CPU's order).
__device__ __forceinline__ void record_status(unsigned long long* st, Status::Code code, int64_t row) {
  if (st) atomicMin(st, (static_cast<unsigned long long>(row) << 8) | static_cast<unsigned long long>(code));
}

// ---- the per-row loss math of opdcore/row_math.h, with the device's accurate exp/log --------------------------
struct DevMath {
  template <typename A> __device__ static A neg_inf() { return dev::neg_inf<A>(); }
  template <typename A> __device__ static A exp(A x) { return acc_exp(x); }
  template <typename A> __device__ static A log(A x) { return acc_log(x); }
  template <typename A> __device__ static A max(A a, A b) { return amax(a, b); }
  template <typename A> __device__ static A min(A a, A b) { return amin(a, b); }
  template <typename A> __device__ static bool is_finite(A x) { return isfinite(x); }
  template <typename A> __device__ static bool is_inf(A x) { return isinf(x); }
  template <typename A> __device__ static bool is_nan(A x) { return isnan(x); }
};

// `rew` doubles as the weight scratch (row_math::rewards allows the alias).
template <typename A>
__device__ Status::Code row_rewards(int64_t K, const A* slp, const A* tlp, const bool* valid, WeightMode mode, A clip,
                                    A* rew, A* loss) {
  return row_math::rewards<DevMath>(K, slp, tlp, valid, mode, clip, rew, rew, loss);
}

}  // namespace dev
}  // namespace cuda
}  // namespace opdcore
