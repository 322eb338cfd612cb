// Fused LM-head top-k: the entry point, and its SIMT mainloop (any GPU, and the CPU emulator) that feeds the
// tile epilogue of head_epilogue.cuh exactly as CUTLASS's wgmma mainloop does in csrc/cutlass/head_topk_sm90.cu.
#include "head_epilogue.cuh"
#include "launch.cuh"

namespace opdcore {
namespace cuda {

#ifdef OPDCORE_WITH_CUTLASS
// csrc/cutlass/head_topk_sm90.cu: the partial states of every (row block, split) from the wgmma mainloop.
template <typename T>
cudaError_t head_topk_sm90_partials(const T* hidden, const T* weight, const dev::HeadArgs& a,
                                    const host::HeadPlan& plan, cudaStream_t stream);
#endif

namespace dev {

// Block (row block, split): 256 threads, each computes its accumulator fragment of each column tile of the split
// with plain FMAs, row by row of hidden and weight (slow: the epilogue's test bench and a portable fallback).
template <typename T>
__global__ void __launch_bounds__(kHeadThreads) head_topk_simt_kernel(const T* __restrict__ hidden,
                                                                      const T* __restrict__ weight, const HeadArgs a) {
  using Epi = HeadEpilogue<kHeadTileN, kHeadKCap>;
  OPDCORE_DYNAMIC_SMEM(smem);
  HeadTopK<kHeadKCap>& sh = *reinterpret_cast<HeadTopK<kHeadKCap>*>(smem);
  const int t = threadIdx.x;
  Epi::init(sh, t, kHeadThreads);
  __syncthreads();
  const int64_t row0 = int64_t(blockIdx.x) * kHeadTileM;
  const int split = blockIdx.y;
  const int64_t tiles = (a.V + kHeadTileN - 1) / kHeadTileN;
  const int64_t tile0 = int64_t(split) * a.tiles_per_split;
  const int64_t tile1 = min(tiles, tile0 + a.tiles_per_split);
  Epi epi;
  for (int64_t tn = tile0; tn < tile1; ++tn) {
    const int64_t n0 = tn * kHeadTileN;
    float x[2][Epi::P];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + head_row(t, h);
      for (int p = 0; p < Epi::P; ++p) {
        const int64_t col = n0 + head_col(t, p);
        float acc = 0;
        if (row < a.rows && col < a.V) {
          const T* hr = hidden + row * a.H;
          const T* wr = weight + col * a.H;
          for (int64_t j = 0; j < a.H; ++j) acc = fmaf(to_acc(hr[j]), to_acc(wr[j]), acc);
        }
        x[h][p] = acc;
      }
    }
    epi.tile(x, t, row0, n0, a, sh);
  }
  epi.finish(t, row0, split, a, sh);
}

}  // namespace dev

size_t head_topk_workspace_bytes(int64_t rows, int64_t V, int64_t k, int num_sms) {
  const host::HeadPlan p = host::head_plan(rows, V, num_sms > 0 ? num_sms : 132);
  return host::partial_bytes<float>(rows * p.splits, k, 0);
}

bool head_topk_sm90_compiled() {
#ifdef OPDCORE_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

template <typename T>
Status head_topk(const T* hidden, const T* weight, int64_t rows, int64_t V, int64_t H, double temperature,
                 int64_t k, HeadKernel kernel, const StreamResult<float>& out, const Launch& L) {
  if (k < 1 || k > kHeadMaxTopK || rows <= 0 || V <= 0 || V > kMaxColumns || H <= 0)
    return host::cuda_error(cudaErrorInvalidValue);
  const host::HeadPlan plan = host::head_plan(rows, V, host::sms(L));
  if (L.workspace_bytes < host::partial_bytes<float>(rows * plan.splits, k, 0))
    return host::cuda_error(cudaErrorInvalidValue);
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  dev::HeadArgs a;
  a.rows = rows;
  a.V = V;
  a.H = H;
  a.k = int(k);
  a.inv_t = float(1.0 / temperature);
  a.splits = plan.splits;
  a.tiles_per_split = plan.tiles_per_split;
  a.part = host::carve_partial<float>(L.workspace, rows * plan.splits, k, 0);
  a.status = L.status;
  if (kernel == HeadKernel::kSimt) {
    const dim3 grid(unsigned(plan.row_blocks), unsigned(plan.splits));
    OPDCORE_LAUNCH(grid, dev::kHeadThreads, sizeof(dev::HeadTopK<dev::kHeadKCap>), L.stream,
                   dev::head_topk_simt_kernel<T>)(hidden, weight, a);
  } else {
#ifdef OPDCORE_WITH_CUTLASS
    e = head_topk_sm90_partials<T>(hidden, weight, a, plan, L.stream);
    if (e != cudaSuccess) return host::cuda_error(e);
#else
    return host::cuda_error(cudaErrorNotSupported);
#endif
  }
  dev::FinalArgs<float> fin;
  fin.out = out;
  host::combine_parts_final(rows, int(k), 0, plan.splits, a.part, fin, L.status, L.stream);  // K2: merge the splits
  return host::finish(L);
}

#define OPDCORE_HEAD_T(T)                                                                                      \
  template Status head_topk<T>(const T*, const T*, int64_t, int64_t, int64_t, double, int64_t, HeadKernel,     \
                               const StreamResult<float>&, const Launch&);
OPDCORE_HEAD_T(float)
OPDCORE_HEAD_T(bfloat16)
OPDCORE_HEAD_T(float16)

}  // namespace cuda
}  // namespace opdcore
