// Host-side helpers of the CUDA entry points: status word handling, grid planning, workspace carving, and the
// launchers of the streaming kernels (shared by topk_stream.cu and opd_loss.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "opdcore/cuda_kernels.h"
#include "row_stream.cuh"

// A kernel launch: OPDCORE_LAUNCH(grid, block, smem, stream, kernel)(args...). The triple-chevron syntax under
// nvcc; the emulator's launcher when these sources are compiled as C++ (OPDCORE_CUDA_EMU, csrc/cuda_emu).
#ifdef OPDCORE_CUDA_EMU
#define OPDCORE_LAUNCH(grid, block, smem, stream, ...) ::opdcore_emu::launch(__VA_ARGS__, grid, block, smem, stream)
#else
#define OPDCORE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace opdcore {
namespace cuda {
namespace host {

inline Status cuda_error(cudaError_t e) {
  Status st;
  st.code = Status::kCudaError;
  st.row = static_cast<int64_t>(e);
  return st;
}

// Reset the status word (all ones = no failure) before the kernels of a fallible op.
inline cudaError_t begin(const Launch& L) {
  return L.status ? cudaMemsetAsync(L.status, 0xff, sizeof(unsigned long long), L.stream) : cudaSuccess;
}

// After the launches: a launch error, else (if L.status) the recorded first bad row. The 8-byte copy into
// pageable host memory returns once the stream has reached it: the op's one host synchronisation.
inline Status finish(const Launch& L, bool read_status = true) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error(e);
  if (!L.status || !read_status) return Status{};
  unsigned long long word = ~0ULL;
  e = cudaMemcpyAsync(&word, L.status, sizeof(word), cudaMemcpyDeviceToHost, L.stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(L.stream);
  if (e != cudaSuccess) return cuda_error(e);
  Status st;
  if (word != ~0ULL) {
    st.code = static_cast<Status::Code>(word & 0xffULL);
    st.row = static_cast<int64_t>(word >> 8);
  }
  return st;
}

inline int sms(const Launch& L) { return L.num_sms > 0 ? L.num_sms : 132; }

// Blocks per row for the streaming kernels: one, unless there are too few rows to fill the device and the rows
// are long; then up to 8 column ranges per row (K2 merges their partial states).
inline int row_splits(int64_t rows, int64_t n, int num_sms) {
  const int64_t want = 4LL * num_sms;  // blocks to keep every SM busy
  if (rows >= want || n < 16384) return 1;
  int64_t s = (want + rows - 1) / rows;
  s = s < n / 8192 ? s : n / 8192;
  s = s < 8 ? s : 8;
  return s < 1 ? 1 : int(s);
}

inline int64_t cols_per_split(int64_t n, int splits) {
  const int64_t c = (n + splits - 1) / splits;
  return (c + 255) / 256 * 256;  // split boundaries on 256-column steps keep 16-byte alignment in common cases
}

inline size_t align_up(size_t b) { return (b + 255) / 256 * 256; }

// Partial states of R = rows * splits (row, split) pairs, carved out of one workspace:
// max, sumexp, ent [R], heap_vals [R, k], target_vals [R, m] (A), heap_ids [R, k] (int64).
template <typename A>
inline size_t partial_bytes(int64_t R, int64_t k, int64_t m) {
  return 3 * align_up(size_t(R) * sizeof(A)) + align_up(size_t(R * k) * sizeof(A)) +
         align_up(size_t(R * m) * sizeof(A)) + align_up(size_t(R * k) * sizeof(int64_t));
}

template <typename A>
inline StreamState<A> carve_partial(void* ws, int64_t R, int64_t k, int64_t m) {
  char* p = static_cast<char*>(ws);
  auto take = [&p](size_t bytes) { char* q = p; p += align_up(bytes); return q; };
  StreamState<A> st;
  st.rows = R;
  st.max = reinterpret_cast<A*>(take(size_t(R) * sizeof(A)));
  st.sumexp = reinterpret_cast<A*>(take(size_t(R) * sizeof(A)));
  st.ent = reinterpret_cast<A*>(take(size_t(R) * sizeof(A)));
  st.k = k;
  st.heap_vals = reinterpret_cast<A*>(take(size_t(R * k) * sizeof(A)));
  st.m = m;
  st.target_vals = reinterpret_cast<A*>(take(size_t(R * m) * sizeof(A)));
  st.heap_ids = reinterpret_cast<int64_t*>(take(size_t(R * k) * sizeof(int64_t)));
  return st;
}

// K1 with the variant for k (0, <= 64, <= 128) and entropy on/off.
// kTopK = false: only the k = 0 variants get instantiated (the loss forward).
template <typename T, bool kTopK = true>
inline void launch_rows(const T* logits, int64_t rows, const dev::RowArgs<acc_t<T>>& a, bool entropy,
                        cudaStream_t stream) {
  using A = acc_t<T>;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(a.splits));
  const dim3 block(dev::kThreads);
  if (!kTopK || a.k == 0) {
    if (entropy) OPDCORE_LAUNCH(grid, block, 0, stream, dev::row_stream_kernel<T, A, 0, true>)(logits, a);
    else OPDCORE_LAUNCH(grid, block, 0, stream, dev::row_stream_kernel<T, A, 0, false>)(logits, a);
  } else if constexpr (kTopK) {
    if (a.k <= 64) OPDCORE_LAUNCH(grid, block, 0, stream, dev::row_stream_kernel<T, A, 128, true>)(logits, a);
    else OPDCORE_LAUNCH(grid, block, 0, stream, dev::row_stream_kernel<T, A, 256, true>)(logits, a);
  }
}

// K2: one block per row; dynamic shared memory for the heap pool (<= 16 sources x 128 slots).
template <typename A>
inline void launch_combine(int64_t rows, const dev::CombineArgs<A>& c, cudaStream_t stream) {
  size_t smem = 0;
  if (c.k > 0 && c.sort_topk)
    smem = size_t(dev::next_pow2(int(c.has_a) + c.parts)) * size_t(dev::next_pow2(c.k)) * sizeof(dev::GKey<A>);
  OPDCORE_LAUNCH(static_cast<unsigned>(rows), dev::kThreads, smem, stream, dev::combine_kernel<A>)(c);
}

// K2 over the partial states of `parts` blocks per row, writing the final results (rows a block rejected are skipped).
template <typename A>
inline void combine_parts_final(int64_t rows, int k, int64_t m, int parts, const StreamState<A>& part,
                                const dev::FinalArgs<A>& fin, unsigned long long* status, cudaStream_t stream) {
  dev::CombineArgs<A> c;
  c.k = k;
  c.m = m;
  c.parts = parts;
  c.part = part;
  c.poison_check = true;
  c.final = true;
  c.fin = fin;
  c.status = status;
  launch_combine(rows, c, stream);
}

}  // namespace host
}  // namespace cuda
}  // namespace opdcore
