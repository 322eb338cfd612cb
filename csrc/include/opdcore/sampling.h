// Sampling one token per row from softmax(x / T): the rollout's next-token draw, fused with the sampled token's
// log-prob, in two streaming passes over the row (max, then block sums of exp) and one short scan of the block
// the draw lands in. No [rows, V] probabilities, cumulative sums or random numbers per column are formed: the
// draw is by inverse CDF from one uniform number per row.
#pragma once
#include <cstdint>

#include "opdcore/common.h"

namespace opdcore {

// Row r (x[r*rs + j], unit column stride) gets ids[r] = the smallest j whose cumulative probability exceeds
// u[r] * (total), u[r] in [0, 1): token j is drawn with probability p_j (-inf columns have p_j = 0 and are never
// drawn), and logprobs[r] = log p_ids[r]. temperature == 0 is greedy: the first column of the row's maximum
// (u unused), its log-prob under softmax(x). NaN or +inf in a row is kNonFinite, an all -inf row kAllNegInf
// (first bad row).
template <typename T>
Status sample_rows(const T* x, int64_t rs, int64_t rows, int64_t V, double temperature, const double* u,
                   int64_t* ids, acc_t<T>* logprobs);

}  // namespace opdcore
