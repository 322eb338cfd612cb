// AVX-512 versions of the two per-block passes of the streaming softmax (row_stream.h), for float accumulators
// and contiguous rows, and of the loss backward's exp pass (opd_loss.cpp). gcc's auto-vectorised loops spend
// about twice the instructions of these: the exp is 2^round(z) * 2^f with vrndscaleps / vscalefps instead of
// integer bit tricks, the NaN / +inf and heap-threshold tests are mask compares, and the next block is
// prefetched while this one's exps are computed, so the memory read overlaps the arithmetic. Built only where
// the compiler targets AVX-512 (-march=native on such a CPU); elsewhere row_stream.h and opd_loss.cpp keep their
// portable loops (tests/test_cpu_portable.py checks both agree).
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define OPDCORE_ROW_SIMD 1
// gcc 12 warns that the _mm512_reduce_* intrinsics' own _mm512_undefined_ps() operands may be uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "opdcore/common.h"

namespace opdcore {
namespace cpu {
namespace simd {

inline __m512 load16(const float* p, __mmask16 m, __m512 fill) { return _mm512_mask_loadu_ps(fill, m, p); }
inline __m512 load16(const bfloat16* p, __mmask16 m, __m512 fill) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));  // AVX-512BW
  return _mm512_mask_mov_ps(fill, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
}
inline __m512 load16(const float16* p, __mmask16 m, __m512 fill) {
  return _mm512_mask_mov_ps(fill, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)));
}
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// exp(d) for d <= 0, d >= -104 (callers clamp): 2^n * p(f), z = d log2 e, n = round(z), f = z - n in
// [-0.5, 0.5], p a degree-6 fit of 2^f (1e-7 relative in float). Exactly 0 at d = -104 (2^-150 rounds to 0).
inline __m512 exp16(__m512 d) {
  const __m512 z = _mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(z, n);
  __m512 p = _mm512_set1_ps(1.5345806605182588e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930903688073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Pass 1 over nb contiguous values: buf = x * inv_t (tail lanes of the last 16 -inf), the block max, a lower
// bound on the block's 16th largest value (the smallest of the 16 lanes' maxima: 16 distinct values reach it,
// so no value below it is among the block's top 16), and whether a NaN or +inf was seen.
template <typename T>
inline bool convert_max(const T* x, int64_t nb, float inv_t, float* buf, float* bmax, float* top16_bound) {
  const __m512 scale = _mm512_set1_ps(inv_t), ninf = _mm512_set1_ps(-__builtin_inff()),
               pinf = _mm512_set1_ps(__builtin_inff());
  __m512 vmax = ninf;
  __mmask16 bad = 0;
  for (int64_t j = 0; j < nb; j += 16) {
    const __mmask16 m = tail_mask(nb - j);
    const __m512 y = _mm512_mask_mul_ps(ninf, m, load16(x + j, m, ninf), scale);
    _mm512_storeu_ps(buf + j, y);  // whole 16s: kBlock is a multiple of 16
    vmax = _mm512_max_ps(vmax, y);
    bad |= _mm512_cmp_ps_mask(y, pinf, _CMP_NLT_UQ);  // NaN or +inf
  }
  *bmax = _mm512_reduce_max_ps(vmax);
  *top16_bound = _mm512_reduce_min_ps(vmax);  // -inf while a lane has seen nothing
  return bad == 0;
}

// Pass 2: s = sum exp(buf - mx), t = sum exp(buf - mx) * (buf - mx) (0 where buf is -inf); offer(j) for every
// j whose value reaches max(*thr, bound) (*thr re-read after each offer: the heap's root rises; a NaN *thr
// offers nothing); a cache line of `next` (the next block's raw values, next_bytes of them) is prefetched per
// 16 values so the memory read overlaps the arithmetic.
template <bool kEntropy, typename Offer>
inline void sums_offer(const float* buf, int64_t nb, float mx, const float* thr, float bound, const char* next,
                       int64_t next_bytes, float* s_out, float* t_out, Offer offer) {
  const __m512 vmx = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-104.0f), vbound = _mm512_set1_ps(bound);
  __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
  __m512 vthr = _mm512_max_ps(_mm512_set1_ps(*thr), vbound);  // NaN *thr: max returns its second operand...
  if (*thr != *thr) vthr = _mm512_set1_ps(__builtin_nanf(""));  // ... so keep the NaN explicitly
  for (int64_t j = 0; j < nb; j += 16) {
    if (j * 4 < next_bytes) _mm_prefetch(next + j * 4, _MM_HINT_T0);
    const __m512 y = _mm512_loadu_ps(buf + j);  // tail lanes are -inf: they add 0 (and are masked off below)
    const __m512 d = _mm512_max_ps(_mm512_sub_ps(y, vmx), lo);
    const __m512 e = exp16(d);
    s = _mm512_add_ps(s, e);
    if (kEntropy) t = _mm512_fmadd_ps(e, d, t);
    __mmask16 c = _mm512_mask_cmp_ps_mask(tail_mask(nb - j), y, vthr, _CMP_GE_OQ);
    if (c) {
      while (c) {
        const int q = __builtin_ctz(c);
        c &= c - 1;
        offer(j + q);
      }
      vthr = _mm512_max_ps(_mm512_set1_ps(*thr), vbound);
    }
  }
  *s_out = _mm512_reduce_add_ps(s);
  *t_out = kEntropy ? _mm512_reduce_add_ps(t) : 0.0f;
}

// The loss backward's dense part over nb contiguous values (opd_loss.cpp): buf = dense * exp(x * inv_t - l), with
// l the row's log-sum-exp; 0 where the exponent is below -104 or NaN (max returns its second operand).
template <typename T>
inline void dense_grad(const T* x, int64_t nb, float inv_t, float l, float dense, float* buf) {
  const __m512 scale = _mm512_set1_ps(inv_t), vl = _mm512_set1_ps(l), lo = _mm512_set1_ps(-104.0f),
               vd = _mm512_set1_ps(dense), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j += 16) {
    const __mmask16 m = tail_mask(nb - j);
    const __m512 d = _mm512_max_ps(_mm512_sub_ps(_mm512_mul_ps(load16(x + j, m, zero), scale), vl), lo);
    _mm512_mask_storeu_ps(buf + j, m, _mm512_mul_ps(vd, exp16(d)));
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace opdcore

#pragma GCC diagnostic pop
#endif
