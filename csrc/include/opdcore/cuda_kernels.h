// CUDA twins of the kernel interfaces in topk_stream.h and opd_loss.h: the same raw pointers, sizes, strides
// and semantics (temperature as y = float(x) * float(1/T), top-k value descending with ties to the lower id,
// the same Status codes for the same bad rows), all pointers on the current CUDA device.
//
// Plain C++: includable from a .cpp built by the host compiler (it needs only cuda_runtime_api.h for
// cudaStream_t). The implementations in csrc/cuda/*.cu include no torch header.
//
// Launching and host synchronisation. Every entry point enqueues its kernels on `Launch::stream` and returns:
//  - ops that can reject a row (topk_logprobs, stream_update, stream_finalize, opd_rewards,
//    opd_topk_loss_forward, renorm_kl_forward) reset an 8-byte device status word, let the kernels record the
//    first bad row into it (atomicMin over (row << 8 | code)), and read it back: one device-to-host copy of
//    8 bytes, which waits for the stream. That is the only host sync. With Launch::status == nullptr they skip
//    the check and do not sync at all (the glue does this while a CUDA graph is being captured).
//  - stream_merge, opd_topk_loss_backward and renorm_kl_backward cannot fail on data: they never sync and only
//    report launch errors.
// A CUDA runtime error comes back as Status::kCudaError with the cudaError_t value in Status::row.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "opdcore/common.h"
#include "opdcore/dense_div.h"
#include "opdcore/opd_loss.h"
#include "opdcore/topk_stream.h"

namespace opdcore {
namespace cuda {

// Largest k the CUDA top-k selection handles in-kernel (per-warp candidate buffers in shared memory). The ATen
// glue does larger k with a stable sort (rare: OPD uses k <= 64).
constexpr int64_t kMaxTopK = 128;

// Columns of one logits chunk are 32-bit inside the kernels (vocabulary ids up to 2^31 - 2).
constexpr int64_t kMaxColumns = 2147483646;

struct Launch {
  cudaStream_t stream = nullptr;
  int num_sms = 0;                       // multiprocessors of the current device (grid sizing); from device_sm_count()
  unsigned long long* status = nullptr;  // 8 bytes of device memory for the status word; null: no check, no sync
  void* workspace = nullptr;             // device scratch of at least the *_workspace_bytes asked for
  size_t workspace_bytes = 0;
};

// Multiprocessor count of the current device (cached per device).
int device_sm_count();

// Device scratch (bytes) that topk_logprobs / opd_topk_loss_forward need for `rows` rows of `n` columns: 0 when
// every row is done by one block, else room for per-block partial states (few rows, long rows).
template <typename A>
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, int64_t m, int num_sms);

// Device scratch that stream_update needs (it always goes through partial states, then merges them in).
template <typename A>
size_t stream_update_workspace_bytes(int64_t rows, int64_t n, int64_t k, int64_t m, int num_sms);

// ---- streaming top-k / log-sum-exp / entropy (topk_stream.h) ----------------------------------------------

// k <= kMaxTopK, V <= kMaxColumns. target_ids (m per row, may be null) are checked to lie in [0, V).
template <typename T>
Status topk_logprobs(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                     double temperature, int64_t k, const int64_t* target_ids, int64_t m,
                     const StreamResult<acc_t<T>>& out, const Launch& launch);

// The state layout is the CPU one; heaps are written back sorted worst-first (a valid min-heap for the CPU code).
// With st.k > kMaxTopK the heap is left untouched (the glue merges it) and only max/sumexp/ent/targets update.
// vocab_offset + n must stay below 2^31 - 1. A row with a NaN/+inf logit is reported and its state left as it was.
template <typename T>
Status stream_update(const StreamState<acc_t<T>>& st, const T* logits, int64_t n, int64_t row_stride,
                     int64_t col_stride, int64_t vocab_offset, double temperature, const Launch& launch);

// a <- merge(a, b). With a.k > kMaxTopK only max/sumexp/ent/targets merge (the glue merges the heaps).
template <typename A>
Status stream_merge(const StreamState<A>& a, const StreamState<A>& b, const Launch& launch);

// With st.k > kMaxTopK the top-k outputs are not written (the glue sorts the heap); every check still runs.
template <typename A>
Status stream_finalize(const StreamState<A>& st, const StreamResult<A>& out, const Launch& launch);

// ---- fused LM-head top-k (head_epilogue.cuh) -----------------------------------------------------------
// topk_logprobs of hidden [rows, H] @ weight [V, H]^T / temperature (both row-major, contiguous) without the
// logits in memory: column tiles of 128 x 128 are formed in registers and reduced there (online log-sum-exp,
// entropy, the best k in shared memory); per-split partial states are merged by the streaming kernels' K2.
//   kSimt: a plain-FMA product (any GPU; the emulator's test bench of the epilogue).
//   kSm90: CUTLASS's TMA + wgmma mainloop (sm_90a; only when built with CUTLASS: head_topk_sm90_compiled()).
// Products accumulate in float32 (no rounding of the logits to the input dtype). 1 <= k <= kHeadMaxTopK.
enum class HeadKernel : int { kSimt = 0, kSm90 = 1 };
constexpr int64_t kHeadMaxTopK = 32;
bool head_topk_sm90_compiled();
size_t head_topk_workspace_bytes(int64_t rows, int64_t V, int64_t k, int num_sms);
template <typename T>
Status head_topk(const T* hidden, const T* weight, int64_t rows, int64_t V, int64_t H, double temperature,
                 int64_t k, HeadKernel kernel, const StreamResult<float>& out, const Launch& launch);

// ---- sparse top-k OPD loss (opd_loss.h) ------------------------------------------------------------------

template <typename A>
Status opd_rewards(int64_t rows, int64_t K, const A* student_lp, const A* teacher_lp, const bool* valid,
                   WeightMode mode, double clip, A* rewards, A* loss, const Launch& launch);

template <typename T>
Status opd_topk_loss_forward(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                             double temperature, const int64_t* ids, const acc_t<T>* teacher_lp,
                             const bool* valid, int64_t K, WeightMode mode, double clip, acc_t<T>* loss,
                             acc_t<T>* rewards, acc_t<T>* student_lp, acc_t<T>* lse, const Launch& launch);

// grad has unit column stride; it may alias logits (then with the same strides).
template <typename T>
Status opd_topk_loss_backward(const T* logits, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                              int64_t vocab_offset, double temperature, const acc_t<T>* lse, const int64_t* ids,
                              const acc_t<T>* rewards, int64_t K, const acc_t<T>* grad_loss, T* grad,
                              int64_t grad_row_stride, const Launch& launch);

template <typename A>
Status renorm_kl_forward(int64_t rows, int64_t K, const A* set_logits, const A* teacher_lp, const bool* valid,
                         double temperature, A* loss, A* pbar, A* log_ratio, const Launch& launch);

template <typename A>
Status renorm_kl_backward(int64_t rows, int64_t K, const A* pbar, const A* log_ratio, const A* loss,
                          const A* grad_loss, double temperature, A* grad_set_logits, const Launch& launch);

// ---- dense divergences (dense_div.h) ------------------------------------------------------------------
// The forward can reject a row (one status read, which syncs); the backward cannot.
template <typename T>
Status dense_divergence_forward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                Divergence kind, double beta, double temperature, acc_t<T>* loss, acc_t<T>* lse_s,
                                acc_t<T>* lse_t, acc_t<T>* aux, const acc_t<T>* given_lse_s,
                                const acc_t<T>* given_lse_t, const Launch& launch);
template <typename T>
Status dense_divergence_backward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                 Divergence kind, double beta, double temperature, const acc_t<T>* lse_s,
                                 const acc_t<T>* lse_t, const acc_t<T>* aux, const acc_t<T>* grad_loss, T* grad,
                                 int64_t g_rs, const Launch& launch);

// ---- packed sequences (packing.h) ----------------------------------------------------------------------

// The byte copies of pad_packed / unpad_packed; cu_seqlens [B+1] on the device, already checked on the host
// (check_cu_seqlens, longest <= T); N = cu_seqlens[B]. elem_size in {1, 2, 4, 8, 16}; pad: elem_size bytes.
// Neither can fail on data: no host sync.
Status pad_packed(const void* packed, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                  const void* pad, void* padded, const Launch& launch);
Status unpad_packed(const void* padded, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                    int64_t N, void* packed, const Launch& launch);

}  // namespace cuda
}  // namespace opdcore
