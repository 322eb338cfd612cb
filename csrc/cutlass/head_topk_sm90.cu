// Fused LM-head top-k on Hopper (sm_90a): CUTLASS's TMA + wgmma warp-specialised mainloop, the cooperative
// schedule (one producer warpgroup, two consumer warpgroups sharing a 128 x 128 tile), with the register epilogue
// of csrc/cuda/head_epilogue.cuh in place of a CUTLASS epilogue: a logits tile never leaves the registers.
//
// Block (row block, split) walks the split's column tiles; the producer warp streams hidden and weight tiles of
// 128 x 64 through a 4-stage shared-memory pipeline (TMA, mbarrier), the consumers run the wgmma k-loop of a
// tile, then its epilogue, while the producer already loads the next tile. Entry point: head_topk (head_topk.cu),
// which also launches K2 over the partial states.
//
// Built only when CMake finds CUTLASS (the pinned nvidia-cutlass package) and sm_90 is a target; compiled in CI
// by scripts/check_cuda_compile.sh, which also checks the register layout the epilogue assumes against CuTe
// (layout_check.cu). Verified numerically only on a GPU (benchmarks/gpu_check.sh): not the default path.
#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/pipeline/pipeline.hpp>

#include "../cuda/head_epilogue.cuh"
#include "head_sm90_config.h"

namespace opdcore {
namespace cuda {
namespace sm90 {

using namespace cute;

template <typename T>
struct SharedStorage {
  using C = typename Mainloop<T>::Collective;
  typename C::TensorStorage tensors;
  alignas(16) typename C::PipelineStorage pipeline;
  alignas(16) dev::HeadTopK<dev::kHeadKCap> topk;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    head_topk_sm90_kernel(const __grid_constant__ typename Mainloop<T>::Collective::Params mp, const dev::HeadArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = typename Mainloop<T>::Collective;
  using Pipeline = typename C::MainloopPipeline;
  using PipelineState = typename C::PipelineState;
  using Epi = dev::HeadEpilogue<dev::kHeadTileN, dev::kHeadKCap>;
  static_assert(size<0>(TileShape{}) == dev::kHeadTileM && size<1>(TileShape{}) == dev::kHeadTileN);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  SharedStorage<T>& ss = *reinterpret_cast<SharedStorage<T>*>(smem_raw);
  const int tid = threadIdx.x, warp_group = tid / 128, warp_in_group = (tid / 32) % 4;
  const int lane_predicate = cute::elect_one_sync();
  if (tid < 32 && lane_predicate) C::prefetch_tma_descriptors(mp);

  typename Pipeline::Params pp;
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  if (warp_group == 0 && warp_in_group != 0) pp.role = Pipeline::ThreadCategory::NonParticipant;
  pp.is_leader = (tid % 128) == 0;
  pp.num_consumers = kMmaThreads;
  pp.transaction_bytes = mp.tma_transaction_bytes;
  Pipeline pipeline(ss.pipeline, pp, ClusterShape{});
  Epi::init(ss.topk, tid, kThreads);
  __syncthreads();  // pipeline barriers and the top-k lists initialised before any use

  C collective;
  const auto problem = make_shape(int(a.rows), int(a.V), int(a.H), 1);
  const auto load_inputs = collective.load_init(problem, mp);
  const int m_blk = blockIdx.x, split = blockIdx.y;
  const int tiles = int((a.V + dev::kHeadTileN - 1) / dev::kHeadTileN);
  const int tile0 = split * a.tiles_per_split, tile1 = min(tiles, tile0 + a.tiles_per_split);
  const int k_tiles = int(size<3>(get<0>(load_inputs)));

  if (warp_group == 0) {  // producer: one warp issues the TMA loads of every tile of the split
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (warp_in_group == 0) {
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int n = tile0; n < tile1; ++n) {
        auto k_iter = cute::make_coord_iterator(shape<3>(get<0>(load_inputs)));
        collective.load(mp, pipeline, write, load_inputs, make_coord(m_blk, n, _, 0), k_iter, k_tiles, tid % 32,
                        0u, ss.tensors);
        write.advance(k_tiles);
      }
      collective.load_tail(pipeline, write);
    }
  } else {  // consumers: the wgmma k-loop of a tile, then its epilogue in registers
    cutlass::arch::warpgroup_reg_alloc<232>();
    const int t = tid % kMmaThreads;  // CUTLASS's mma thread index: the layout head_row / head_col describe
    typename C::TiledMma tiled_mma;
    PipelineState read;
    Epi epi;
    const int64_t row0 = int64_t(m_blk) * dev::kHeadTileM;
    for (int n = tile0; n < tile1; ++n) {
      Tensor acc = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      static_assert(decltype(size(acc))::value == 2 * Epi::P);
      collective.mma(pipeline, read, acc, k_tiles, t, ss.tensors, mp);
      collective.mma_tail(pipeline, read, k_tiles);
      read.advance(k_tiles);
      float x[2][Epi::P];
      CUTE_UNROLL
      for (int i = 0; i < 2 * Epi::P; ++i) x[frag_h(i)][frag_p(i)] = acc(i);  // compile-time indices
      epi.tile(x, t, row0, int64_t(n) * dev::kHeadTileN, a, ss.topk);
    }
    epi.finish(t, row0, split, a, ss.topk);
  }
#endif
}

}  // namespace sm90

template <typename T>
cudaError_t head_topk_sm90_partials(const T* hidden, const T* weight, const dev::HeadArgs& a,
                                    const host::HeadPlan& plan, cudaStream_t stream) {
  using namespace cute;
  using C = typename sm90::Mainloop<T>::Collective;
  using E = typename sm90::Mainloop<T>::Element;
  if (a.rows > INT32_MAX || a.V > INT32_MAX || a.H > INT32_MAX) return cudaErrorInvalidValue;
  typename C::StrideA dA{};  // hidden [rows, H], H-major
  get<0>(dA) = a.H;
  typename C::StrideB dB{};  // weight [V, H], H-major
  get<0>(dB) = a.H;
  typename C::Arguments args{reinterpret_cast<const E*>(hidden), dA, reinterpret_cast<const E*>(weight), dB};
  const auto problem = make_shape(int(a.rows), int(a.V), int(a.H), 1);
  if (!C::can_implement(problem, args)) return cudaErrorInvalidValue;
  const typename C::Params p = C::to_underlying_arguments(problem, args, nullptr);
  const size_t smem = sizeof(sm90::SharedStorage<T>);
  auto kernel = sm90::head_topk_sm90_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(plan.row_blocks), unsigned(plan.splits)), sm90::kThreads, smem, stream>>>(p, a);
  return cudaGetLastError();
}

template cudaError_t head_topk_sm90_partials<bfloat16>(const bfloat16*, const bfloat16*, const dev::HeadArgs&,
                                                       const host::HeadPlan&, cudaStream_t);
template cudaError_t head_topk_sm90_partials<float16>(const float16*, const float16*, const dev::HeadArgs&,
                                                      const host::HeadPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace opdcore
