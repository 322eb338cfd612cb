// CPU (OpenMP) inverse-CDF sampling of one token per row (opdcore/sampling.h); rows in parallel. The row is
// scaled into a per-thread float buffer once (pass 1, with the max), summed block by block (pass 2), and only
// the block that holds the draw is scanned element by element.
#include "opdcore/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_stream.h"

namespace opdcore {

using cpu::neg_inf;

template <typename T>
Status sample_rows(const T* x, int64_t rs, int64_t rows, int64_t V, double temperature, const double* u,
                   int64_t* ids, acc_t<T>* logprobs) {
  using A = acc_t<T>;
  Status status;
  const bool greedy = temperature == 0;
  const A inv_t = greedy ? A(1) : A(1.0 / temperature), pinf = std::numeric_limits<A>::infinity();
  const int64_t nblocks = (V + cpu::kBlock - 1) / cpu::kBlock;
#pragma omp parallel
  {
    std::vector<A> buf(V);
    std::vector<double> bsum(nblocks);
    A* y = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * rs;
      A mx = neg_inf<A>();
      int bad = 0;
#pragma omp simd reduction(max : mx) reduction(| : bad)
      for (int64_t j = 0; j < V; ++j) {
        const A v = A(to_float(xr[j])) * inv_t;
        y[j] = v;
        mx = v > mx ? v : mx;
        bad |= int(!(v == v)) | int(v == pinf);
      }
      if (bad) { cpu::record_failure(&status, Status::kNonFinite, r); continue; }
      if (mx == neg_inf<A>()) { cpu::record_failure(&status, Status::kAllNegInf, r); continue; }
      double total = 0;
      for (int64_t b = 0; b < nblocks; ++b) {
        const A* yb = y + b * cpu::kBlock;
        const int64_t nb = std::min(cpu::kBlock, V - b * cpu::kBlock);
        A s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < nb; ++j) s += exp_nonpos(yb[j] - mx);
        bsum[b] = s;
        total += s;
      }
      int64_t pick = -1;
      if (greedy) {
        pick = std::find(y, y + V, mx) - y;
      } else {
        // the block where the cumulative sum first exceeds the target; rounding can leave the target at or above
        // the last partial sum, then the last block (and below, the last column) with mass takes it
        const double target = u[r] * total;
        double before = 0;
        int64_t b = 0, last = 0;
        for (; b < nblocks; ++b) {
          if (bsum[b] > 0) last = b;
          if (before + bsum[b] > target) break;
          before += bsum[b];
        }
        if (b == nblocks) { b = last; before = total - bsum[last]; }
        const A* yb = y + b * cpu::kBlock;
        const int64_t nb = std::min(cpu::kBlock, V - b * cpu::kBlock);
        const double rest = target - before;
        double acc = 0;
        for (int64_t j = 0; j < nb; ++j) {
          const A e = exp_nonpos(yb[j] - mx);
          if (e <= 0) continue;
          pick = b * cpu::kBlock + j;
          acc += e;
          if (acc > rest) break;
        }
      }
      ids[r] = pick;
      logprobs[r] = y[pick] - mx - A(std::log(total));
    }
  }
  return status;
}

#define OPDCORE_SAMPLE(T)                                                                                      \
  template Status sample_rows<T>(const T*, int64_t, int64_t, int64_t, double, const double*, int64_t*, acc_t<T>*);
OPDCORE_SAMPLE(float)
OPDCORE_SAMPLE(double)
OPDCORE_SAMPLE(bfloat16)
OPDCORE_SAMPLE(float16)

}  // namespace opdcore
