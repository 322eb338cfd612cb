// The CUTLASS configuration of the sm_90a fused LM-head kernel (head_topk_sm90.cu), shared with its host-side
// layout check (layout_check.cu): the mainloop, the tile, and where each accumulator of a thread's fragment sits
// in the epilogue's x[h][p] (head_epilogue.cuh: row head_row(t, h), column head_col(t, p)).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/numeric_types.h>

#include "opdcore/common.h"

namespace opdcore {
namespace cuda {
namespace sm90 {

template <typename T> struct CutlassElement;
template <> struct CutlassElement<bfloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<float16> { using type = cutlass::half_t; };

using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
constexpr int kStages = 4;          // 4 x 32 KiB of hidden + weight tiles, + 32 KiB of top-k lists
constexpr int kMmaThreads = 256;    // two consumer warpgroups
constexpr int kThreads = 384;       // + the producer warpgroup

template <typename T>
struct Mainloop {
  using Element = typename CutlassElement<T>::type;
  // hidden [N, H] row-major is A (M x K, K-major); weight [V, H] row-major is B as K x N column-major (K-major).
  using Collective = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8, Element,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCount<kStages>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
};

// CuTe's wgmma accumulator (64 x N per warpgroup): value i = v0 + 2 v1 + 4 v2 sits at row + 8 v1, column
// v0 + 8 v2 of the thread's base: h = v1, p = 2 v2 + v0.
CUTE_HOST_DEVICE constexpr int frag_h(int i) { return (i >> 1) & 1; }
CUTE_HOST_DEVICE constexpr int frag_p(int i) { return 2 * (i >> 2) + (i & 1); }

}  // namespace sm90
}  // namespace cuda
}  // namespace opdcore
