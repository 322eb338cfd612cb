// CUDA streaming top-k / log-sum-exp / entropy: entry points (kernels in row_stream.cuh).
#include "launch.cuh"

namespace opdcore {
namespace cuda {

int device_sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

template <typename A>
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, int64_t m, int num_sms) {
  const int S = host::row_splits(rows, n, num_sms > 0 ? num_sms : 132);
  return S == 1 ? 0 : host::partial_bytes<A>(rows * S, k, m);
}

template <typename A>
size_t stream_update_workspace_bytes(int64_t rows, int64_t n, int64_t k, int64_t m, int num_sms) {
  const int S = host::row_splits(rows, n, num_sms > 0 ? num_sms : 132);
  return host::partial_bytes<A>(rows * S, k <= kMaxTopK ? k : 0, m);
}

template <typename T>
Status topk_logprobs(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                     double temperature, int64_t k, const int64_t* target_ids, int64_t m,
                     const StreamResult<acc_t<T>>& out, const Launch& L) {
  using A = acc_t<T>;
  if (k < 0 || k > kMaxTopK || V > kMaxColumns || rows <= 0) return host::cuda_error(cudaErrorInvalidValue);
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  dev::RowArgs<A> a;
  a.n = V;
  a.row_stride = row_stride;
  a.col_stride = col_stride;
  a.inv_t = A(1.0 / temperature);
  a.k = int(k);
  a.m = target_ids ? m : 0;
  a.target_ids = target_ids;
  a.check_ids = target_ids != nullptr;
  a.splits = host::row_splits(rows, V, host::sms(L));
  a.cols_per_split = host::cols_per_split(V, a.splits);
  a.status = L.status;
  a.fin.out = out;
  const bool entropy = out.entropy != nullptr || k > 0;
  if (a.splits == 1) {
    host::launch_rows(logits, rows, a, entropy, L.stream);
  } else {
    if (L.workspace_bytes < host::partial_bytes<A>(rows * a.splits, k, a.m))
      return host::cuda_error(cudaErrorInvalidValue);
    a.partial = true;
    a.part = host::carve_partial<A>(L.workspace, rows * a.splits, k, a.m);
    host::launch_rows(logits, rows, a, entropy, L.stream);
    host::combine_parts_final(rows, int(k), a.m, a.splits, a.part, a.fin, L.status, L.stream);
  }
  return host::finish(L);
}

template <typename T>
Status stream_update(const StreamState<acc_t<T>>& st, const T* logits, int64_t n, int64_t row_stride,
                     int64_t col_stride, int64_t vocab_offset, double temperature, const Launch& L) {
  using A = acc_t<T>;
  if (st.rows <= 0 || vocab_offset < 0 || n > kMaxColumns || vocab_offset + n > kMaxColumns)
    return host::cuda_error(cudaErrorInvalidValue);
  const bool sort = st.k <= kMaxTopK;
  const int64_t k_part = sort ? st.k : 0;
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  dev::RowArgs<A> a;
  a.n = n;
  a.row_stride = row_stride;
  a.col_stride = col_stride;
  a.vocab_offset = vocab_offset;
  a.inv_t = A(1.0 / temperature);
  a.k = int(k_part);
  a.m = st.m;
  a.target_ids = st.target_ids;
  a.splits = host::row_splits(st.rows, n, host::sms(L));
  a.cols_per_split = host::cols_per_split(n, a.splits);
  a.status = L.status;
  if (L.workspace_bytes < host::partial_bytes<A>(st.rows * a.splits, k_part, st.m))
    return host::cuda_error(cudaErrorInvalidValue);
  a.partial = true;
  a.part = host::carve_partial<A>(L.workspace, st.rows * a.splits, k_part, st.m);
  host::launch_rows(logits, st.rows, a, true, L.stream);
  dev::CombineArgs<A> c;
  c.k = int(st.k);
  c.m = st.m;
  c.has_a = true;
  c.a = st;
  c.parts = a.splits;
  c.part = a.part;
  c.poison_check = true;  // a row with NaN/+inf keeps its old state
  c.sort_topk = sort;
  c.parts_targets_first = true;  // like the CPU, a target seen in this chunk overwrites the stored value
  c.status = L.status;
  host::launch_combine(st.rows, c, L.stream);
  return host::finish(L);
}

template <typename A>
Status stream_merge(const StreamState<A>& a, const StreamState<A>& b, const Launch& L) {
  if (a.rows <= 0) return Status{};
  dev::CombineArgs<A> c;
  c.k = int(a.k);
  c.m = a.m;
  c.has_a = true;
  c.a = a;
  c.parts = 1;
  c.part = b;  // [rows * 1] rows: the state layout is the partial layout with one part
  c.sort_topk = a.k <= kMaxTopK;
  c.poison_check = true;  // a state that an unchecked update rejected (NaN max) poisons the merged one
  host::launch_combine(a.rows, c, L.stream);
  return host::finish(L, /*read_status=*/false);  // nothing to reject: no sync
}

template <typename A>
Status stream_finalize(const StreamState<A>& st, const StreamResult<A>& out, const Launch& L) {
  if (st.rows <= 0) return Status{};
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  dev::CombineArgs<A> c;
  c.k = int(st.k);
  c.m = st.m;
  c.has_a = true;
  c.a = st;
  c.sort_topk = st.k <= kMaxTopK;
  c.final = true;
  c.fin.out = out;
  c.fin.check_heap_full = true;
  c.fin.check_targets_seen = true;
  c.status = L.status;
  host::launch_combine(st.rows, c, L.stream);
  return host::finish(L);
}

#define OPDCORE_CUDA_ACC(A)                                                                                     \
  template size_t topk_workspace_bytes<A>(int64_t, int64_t, int64_t, int64_t, int);                            \
  template size_t stream_update_workspace_bytes<A>(int64_t, int64_t, int64_t, int64_t, int);                   \
  template Status stream_merge<A>(const StreamState<A>&, const StreamState<A>&, const Launch&);                \
  template Status stream_finalize<A>(const StreamState<A>&, const StreamResult<A>&, const Launch&);
OPDCORE_CUDA_ACC(float)
OPDCORE_CUDA_ACC(double)

#define OPDCORE_CUDA_T(T)                                                                                      \
  template Status stream_update<T>(const StreamState<acc_t<T>>&, const T*, int64_t, int64_t, int64_t, int64_t, \
                                   double, const Launch&);                                                     \
  template Status topk_logprobs<T>(const T*, int64_t, int64_t, int64_t, int64_t, double, int64_t,              \
                                   const int64_t*, int64_t, const StreamResult<acc_t<T>>&, const Launch&);
OPDCORE_CUDA_T(float)
OPDCORE_CUDA_T(double)
OPDCORE_CUDA_T(bfloat16)
OPDCORE_CUDA_T(float16)

}  // namespace cuda
}  // namespace opdcore
