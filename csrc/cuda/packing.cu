// CUDA pad/unpad of packed sequences (the twins of pad_packed / unpad_packed in csrc/cpu/packing.cpp): byte
// copies in the widest unit (1-16 bytes) that divides the row size and both base addresses, one unit per
// thread in a grid-stride loop. cu_seqlens lives on the device and was validated on the host.
#include "launch.cuh"

namespace opdcore {
namespace cuda {
namespace dev {

template <int kBytes> struct Unit;
template <> struct Unit<1> { using type = uint8_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<8> { using type = unsigned long long; };
template <> struct Unit<16> { using type = uint4; };

struct PadArgs {
  const int32_t* cu;
  int64_t B, T, units;  // units per row
  uint4 pattern;        // the pad value's bytes repeated over 16 bytes
};

// padded[b, t, :] = t < len(b) ? packed[cu[b] + t, :] : pad
template <typename E>
__global__ void __launch_bounds__(kThreads) pad_kernel(const E* __restrict__ src, E* __restrict__ dst, const PadArgs p) {
  E pad;
  memcpy(&pad, &p.pattern, sizeof(E));
  const int64_t total = p.B * p.T * p.units;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = u / p.units, j = u - r * p.units, b = r / p.T, t = r - b * p.T;
    const int64_t start = p.cu[b], len = p.cu[b + 1] - start;
    dst[u] = t < len ? src[(start + t) * p.units + j] : pad;
  }
}

// packed[i, :] = padded[b, i - cu[b], :] with cu[b] <= i < cu[b + 1] (binary search; empty sequences skipped)
template <typename E>
__global__ void __launch_bounds__(kThreads) unpad_kernel(const E* __restrict__ src, E* __restrict__ dst, const PadArgs p,
                                                         int64_t N) {
  const int64_t total = N * p.units;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = u / p.units, j = u - i * p.units;
    int64_t lo = 0, hi = p.B;  // the last b with cu[b] <= i
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.cu[mid] <= i) lo = mid;
      else hi = mid;
    }
    dst[u] = src[(lo * p.T + i - p.cu[lo]) * p.units + j];
  }
}

}  // namespace dev

namespace {

// The widest unit that divides the row size and both addresses.
int unit_bytes(const void* a, const void* b, int64_t row_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | uint64_t(row_bytes) | 16u;
  return int(bits & (~bits + 1));  // lowest set bit, at most 16
}

unsigned grid_for_units(int64_t total, const Launch& L) {
  const int64_t blocks = (total + dev::kThreads - 1) / dev::kThreads, cap = int64_t(host::sms(L)) * 16;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <int kBytes>
void launch_copy(bool pad, const void* src, void* dst, const dev::PadArgs& p, int64_t N, int64_t total, const Launch& L) {
  using E = typename dev::Unit<kBytes>::type;
  const unsigned grid = grid_for_units(total, L);
  if (pad)
    OPDCORE_LAUNCH(grid, dev::kThreads, 0, L.stream, dev::pad_kernel<E>)(static_cast<const E*>(src), static_cast<E*>(dst), p);
  else
    OPDCORE_LAUNCH(grid, dev::kThreads, 0, L.stream, dev::unpad_kernel<E>)(static_cast<const E*>(src), static_cast<E*>(dst), p, N);
}

Status copy_rows(bool pad, const void* src, const int32_t* cu, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                 const void* pad_value, int64_t N, void* dst, const Launch& L) {
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8 && elem_size != 16)
    return host::cuda_error(cudaErrorInvalidValue);
  const int64_t row_bytes = w * elem_size, total_bytes = (pad ? B * T : N) * row_bytes;
  if (total_bytes == 0) return Status{};
  const int ub = unit_bytes(src, dst, row_bytes);
  dev::PadArgs p;
  p.cu = cu;
  p.B = B;
  p.T = T;
  p.units = row_bytes / ub;
  unsigned char pattern[16] = {0};
  if (pad_value)
    for (int i = 0; i < 16; i += int(elem_size)) memcpy(pattern + i, pad_value, size_t(elem_size));
  memcpy(&p.pattern, pattern, 16);
  const int64_t total = total_bytes / ub;
  switch (ub) {
    case 16: launch_copy<16>(pad, src, dst, p, N, total, L); break;
    case 8: launch_copy<8>(pad, src, dst, p, N, total, L); break;
    case 4: launch_copy<4>(pad, src, dst, p, N, total, L); break;
    case 2: launch_copy<2>(pad, src, dst, p, N, total, L); break;
    default: launch_copy<1>(pad, src, dst, p, N, total, L); break;
  }
  return host::finish(L, /*read_status=*/false);
}

}  // namespace

Status pad_packed(const void* packed, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                  const void* pad, void* padded, const Launch& L) {
  return copy_rows(true, packed, cu_seqlens, B, T, w, elem_size, pad, 0, padded, L);
}

Status unpad_packed(const void* padded, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                    int64_t N, void* packed, const Launch& L) {
  return copy_rows(false, padded, cu_seqlens, B, T, w, elem_size, nullptr, N, packed, L);
}

}  // namespace cuda
}  // namespace opdcore
