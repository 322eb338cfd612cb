// A C entry point to the CPU extraction kernel, so tests/test_cpu_portable.py can build the kernel with other
// compiler flags (the portable loops as well as the AVX-512 ones) and compare them through ctypes.
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
