// C entry points to the CPU extraction kernel and the loss backward, so tests/test_cpu_portable.py can build them
// with other compiler flags (the portable loops as well as the AVX-512 ones) and compare them through ctypes.
#include "opdcore/topk_stream.h"

using namespace opdcore;

template <typename T>
static int run(const void* x, int64_t rows, int64_t V, double temperature, int64_t k, int64_t* ids, float* lp,
               float* lse, float* ent) {
  const StreamResult<float> out{ids, lp, lse, ent, nullptr};
  return int(topk_logprobs<T>(static_cast<const T*>(x), rows, V, V, 1, temperature, k, nullptr, 0, out).code);
}

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns the Status code (0: ok).
extern "C" int opdcore_test_topk(int dtype, const void* x, int64_t rows, int64_t V, double temperature, int64_t k,
                                 int64_t* ids, float* lp, float* lse, float* ent) {
  if (dtype == 0) return run<float>(x, rows, V, temperature, k, ids, lp, lse, ent);
  if (dtype == 1) return run<bfloat16>(x, rows, V, temperature, k, ids, lp, lse, ent);
  return run<float16>(x, rows, V, temperature, k, ids, lp, lse, ent);
}

// The loss backward (opd_loss.cpp) on contiguous rows: grad [rows, V] in the logits' dtype.
#include "opdcore/opd_loss.h"

template <typename T>
static void run_bwd(const void* x, int64_t rows, int64_t V, double temperature, const float* lse, const int64_t* ids,
                    const float* rewards, int64_t K, const float* grad_loss, void* grad) {
  opd_topk_loss_backward<T>(static_cast<const T*>(x), rows, V, V, 1, 0, temperature, lse, ids, rewards, K, grad_loss,
                            static_cast<T*>(grad), V);
}

extern "C" void opdcore_test_loss_backward(int dtype, const void* x, int64_t rows, int64_t V, double temperature,
                                           const float* lse, const int64_t* ids, const float* rewards, int64_t K,
                                           const float* grad_loss, void* grad) {
  if (dtype == 0) return run_bwd<float>(x, rows, V, temperature, lse, ids, rewards, K, grad_loss, grad);
  if (dtype == 1) return run_bwd<bfloat16>(x, rows, V, temperature, lse, ids, rewards, K, grad_loss, grad);
  return run_bwd<float16>(x, rows, V, temperature, lse, ids, rewards, K, grad_loss, grad);
}
