// A CUDA execution emulator for opdcore's kernels: csrc/cuda/*.cu compiled as plain C++ (-DOPDCORE_CUDA_EMU,
// with csrc/cuda_emu/include ahead of CUDA's headers) and run on the CPU, so the kernels' logic is tested on
// machines without a GPU (tests/test_cuda.py in emulated mode).
//
// What it models: every CUDA thread of a block is a fiber with its own stack; __shared__ variables are shared
// by the fibers of one block; __syncthreads / __syncthreads_or and the warp collectives (__syncwarp,
// __ballot_sync, __any_sync, __shfl_xor_sync) are real barriers between those fibers. Blocks of a grid run on a
// small pool of host threads, each block on a fresh one, so static __shared__ variables start zeroed (never the
// previous block's values). It checks what a GPU would leave undefined: a barrier or warp collective that not
// every thread (lane) reaches, lanes of one warp in different collectives, a full-mask collective after a lane
// exited, a dynamic shared-memory request over 48 KiB, grid/block limits. Dynamic shared memory starts filled
// with garbage bytes. OPDCORE_EMU_SEED=<n> shuffles the order fibers run between barriers (a missing barrier
// then shows up as a wrong result), OPDCORE_EMU_THREADS=<n> sets the host threads.
//
// Numerics follow nvcc's defaults: FMA contraction on (the _rn intrinsics excepted), __expf with a GPU-sized
// error (a constant one-ulp bias) and flush-to-zero. What it does not model: timing, the memory model beyond
// barriers, warp-synchronous code without a collective. It is a logic test, not a stand-in for a GPU run.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ----------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One host thread runs exactly one block, so a thread_local static is "shared by the block" (and starts zeroed).
#define __shared__ static thread_local

// ---- vector types and launch geometry ---------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- runtime API (host memory stands in for device memory) ------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetDevice(int* dev);
// The multiprocessor count is OPDCORE_EMU_SMS (default 132, an H100 SXM): it decides how rows are split.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

namespace opdcore_emu {

struct ThreadIds {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
const ThreadIds& ids();  // of the fiber running on this host thread

// Block/warp collectives of the running fiber.
void sync_block();
bool sync_block_or(bool pred);
void sync_warp();
uint32_t ballot(bool pred);
uint64_t shfl_xor(uint64_t bits, int lane_mask);
unsigned char* dynamic_smem();

// Runs `body` as every thread of every block (blocks on a host pool, threads as fibers).
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);  // the kernel's by-value parameters
    auto k = kernel;
    run_grid(grid, block, smem, [&params, k] { std::apply(k, params); });
  }
};
template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<P...>{kernel, grid, block, smem};
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace opdcore_emu

// ---- built-in variables -----------------------------------------------------------------------------------
#define threadIdx (::opdcore_emu::ids().thread)
#define blockIdx (::opdcore_emu::ids().block)
#define blockDim (::opdcore_emu::ids().block_dim)
#define gridDim (::opdcore_emu::ids().grid_dim)

// ---- synchronisation and warp collectives -----------------------------------------------------------------
inline void __syncthreads() { opdcore_emu::sync_block(); }
inline int __syncthreads_or(int pred) { return opdcore_emu::sync_block_or(pred != 0) ? 1 : 0; }
inline void __syncwarp(unsigned = 0xffffffffu) { opdcore_emu::sync_warp(); }
inline unsigned __ballot_sync(unsigned, int pred) { return opdcore_emu::ballot(pred != 0); }
inline int __any_sync(unsigned, int pred) { return opdcore_emu::ballot(pred != 0) != 0; }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return opdcore_emu::from_bits<T>(opdcore_emu::shfl_xor(opdcore_emu::to_bits(v), lane_mask));
}

// ---- atomics (GCC builtins: blocks run concurrently on the host pool) -------------------------------------
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return cur;
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

// ---- bit casts, rounding intrinsics, integer intrinsics -----------------------------------------------------
inline float __int_as_float(int v) { return opdcore_emu::from_bits<float>(uint32_t(v)); }
inline float __uint_as_float(unsigned v) { return opdcore_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return uint32_t(opdcore_emu::to_bits(v)); }
inline int __float_as_int(float v) { return int(uint32_t(opdcore_emu::to_bits(v))); }
inline double __longlong_as_double(long long v) { return opdcore_emu::from_bits<double>(uint64_t(v)); }
inline long long __double_as_longlong(double v) { return static_cast<long long>(opdcore_emu::to_bits(v)); }
inline double __hiloint2double(int hi, int lo) {
  return opdcore_emu::from_bits<double>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}
inline int __double2loint(double v) { return int(uint32_t(opdcore_emu::to_bits(v))); }
inline int __double2hiint(double v) { return int(uint32_t(opdcore_emu::to_bits(v) >> 32)); }
// The kernels are built with FMA contraction on, as nvcc builds them (-fmad=true); the _rn intrinsics must round
// the product on its own, so an empty asm statement keeps the compiler from fusing it into a later add.
inline float __fmul_rn(float a, float b) {
  float r = a * b;
  asm volatile("" : "+x"(r));
  return r;
}
inline double __dmul_rn(double a, double b) {
  double r = a * b;
  asm volatile("" : "+x"(r));
  return r;
}
// The SFU's ex2.approx.ftz(x * log2 e): up to ~2 ulp off, subnormal results flushed to zero. The emulator makes
// it err the same way on every call (one ulp high), the adversarial case for long sums: tolerances that hold
// here hold for the GPU's unbiased error.
inline float __expf(float x) {
  const float r = exp2f(x * 1.4426950408889634f);
  return r < 1.17549435e-38f ? 0.0f : r * (1.0f + 1.1920929e-7f);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
using std::isfinite;
using std::isinf;
using std::isnan;
