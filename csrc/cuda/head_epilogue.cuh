// The epilogue of the fused LM-head top-k kernels: logits = hidden @ weight^T / T are formed one [128, BN] tile
// at a time in registers and never written to memory. Two mainloops feed it:
//   - head_topk_sm90.cu (csrc/cutlass): CUTLASS's TMA + wgmma warp-specialised mainloop (Hopper, sm_90a);
//   - head_topk.cu: a SIMT product in the same register layout, for any GPU and for the CPU emulator, so this
//     epilogue, the partial states and their merge are tested where no Hopper GPU is.
// Register layout: wgmma's m64nNk16 accumulator, two consumer warpgroups stacked in M (CUTLASS's cooperative
// kernel). Consumer thread t holds rows  r(t, h) = 64 (t / 128) + 16 ((t % 128) / 32) + (t % 32) / 4 + 8 h,
// h in {0, 1}, and for each row BN / 4 columns  c(t, p) = 8 (p / 2) + 2 (t % 4) + p % 2,  p < BN / 4: the four
// lanes of a quad share their rows. scripts/check_cuda_compile.sh checks this layout against CuTe's own
// partitioning of the sm_90 TiledMma on the host (csrc/cutlass/layout_check.cu).
//
// Per row: an online (max, sumexp, ent) per lane, merged across the quad at the end; the best k in shared
// memory (sorted, best first), touched only by the row's quad, one lane at a time. A lane offers its values
// only when its tile maximum reaches the row's current k-th best, which after the first tiles is rare.
// A CTA covers 128 rows and a range of column tiles (one split); it writes one partial StreamState per
// (row, split), and K2 (combine_kernel of row_stream.cuh) merges the splits into the final results.
#pragma once
#include "opdcore/cuda_kernels.h"
#include "row_stream.cuh"

namespace opdcore {
namespace cuda {
namespace dev {

constexpr int kHeadTileM = 128;     // rows of a CTA tile
constexpr int kHeadThreads = 256;   // consumer threads (two warpgroups)
constexpr int kHeadTileN = 128;     // columns of a tile
constexpr int kHeadKCap = int(kHeadMaxTopK);  // top-k slots per row in shared memory
constexpr int32_t kHeadEmpty = 0x7fffffff;  // an empty top-k slot's id (sorts after any column)

__host__ __device__ __forceinline__ int head_row(int t, int h) {
  return 64 * (t >> 7) + 16 * ((t & 127) >> 5) + ((t & 31) >> 2) + 8 * h;
}
__host__ __device__ __forceinline__ int head_col(int t, int p) { return 8 * (p >> 1) + 2 * (t & 3) + (p & 1); }

// Shared memory of the epilogue: per tile row the best k (value, column), sorted best first.
template <int KCAP>
struct HeadTopK {
  float v[kHeadTileM][KCAP];
  int32_t id[kHeadTileM][KCAP];
};

struct HeadArgs {
  int64_t rows = 0, V = 0, H = 0;
  int k = 0;                  // 1 <= k <= KCAP
  float inv_t = 1;
  int splits = 1;             // column ranges per row block (gridDim.y)
  int tiles_per_split = 1;    // column tiles of kHeadTileN per split
  StreamState<float> part;    // [rows * splits] partial states (k = k, m = 0)
  unsigned long long* status = nullptr;
};

__device__ __forceinline__ bool head_better(float v, int32_t id, float wv, int32_t wid) {
  return v > wv || (v == wv && id < wid);
}

template <int BN, int KCAP>
struct HeadEpilogue {
  static constexpr int P = BN / 4;  // values per row per thread and tile
  ThreadStream<float, true> ts[2];

  // All threads of the block, before any tile; the caller's barrier follows.
  __device__ __forceinline__ static void init(HeadTopK<KCAP>& sh, int tid, int nthreads) {
    for (int i = tid; i < kHeadTileM * KCAP; i += nthreads) {
      (&sh.v[0][0])[i] = neg_inf<float>();
      (&sh.id[0][0])[i] = kHeadEmpty;
    }
  }

  // One tile: x[h][p] = the raw product at (row0 + head_row(t, h), n0 + head_col(t, p)). Warp-collective.
  __device__ __forceinline__ void tile(float (&x)[2][P], int t, int64_t row0, int64_t n0, const HeadArgs& a,
                                       HeadTopK<KCAP>& sh) {
    const int lane = t & 31;
    float tmax[2];
    bool offer[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_ok = row0 + head_row(t, h) < a.rows;
#pragma unroll
      for (int p = 0; p < P; ++p)
        x[h][p] = n0 + head_col(t, p) < a.V ? scale(x[h][p], a.inv_t) : neg_inf<float>();
      tmax[h] = ts[h].template feed<P>(x[h], row_ok);
      const int r = head_row(t, h);
      offer[h] = row_ok && tmax[h] >= sh.v[r][a.k - 1];  // >=: a tie may still win on the lower id
    }
    if (!__any_sync(kFullMask, offer[0] || offer[1])) return;
    // The quad's lanes insert one after the other; the quad owns its rows, so a warp barrier orders them.
    for (int q = 0; q < 4; ++q) {
      if ((lane & 3) == q) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!offer[h]) continue;
          const int r = head_row(t, h);
#pragma unroll
          for (int p = 0; p < P; ++p) insert(sh, r, a.k, x[h][p], int32_t(n0 + head_col(t, p)));
        }
      }
      __syncwarp();
    }
  }

  __device__ __forceinline__ static void insert(HeadTopK<KCAP>& sh, int r, int k, float v, int32_t id) {
    if (!head_better(v, id, sh.v[r][k - 1], sh.id[r][k - 1])) return;
    int j = k - 1;
    while (j > 0 && head_better(v, id, sh.v[r][j - 1], sh.id[r][j - 1])) {
      sh.v[r][j] = sh.v[r][j - 1];
      sh.id[r][j] = sh.id[r][j - 1];
      --j;
    }
    sh.v[r][j] = v;
    sh.id[r][j] = id;
  }

  // After the last tile: merge the quad's states and write this split's partial state of each valid row.
  // Warp-collective; the last tile() ended with a warp barrier, so the quad sees its rows' final lists.
  __device__ __forceinline__ void finish(int t, int64_t row0, int split, const HeadArgs& a, const HeadTopK<KCAP>& sh) {
    const int lane = t & 31;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = ts[h].m, s = ts[h].s, e = ts[h].t;
      bool bad = ts[h].bad;
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o),
                    e2 = __shfl_xor_sync(kFullMask, e, o);
        bad |= __shfl_xor_sync(kFullMask, int(bad), o) != 0;
        merge_mst(m, s, e, m2, s2, e2);
      }
      const int r = head_row(t, h);
      const int64_t row = row0 + r;
      if (row >= a.rows) continue;
      const int64_t pr = row * a.splits + split;
      if (bad) {
        if ((lane & 3) == 0) {
          record_status(a.status, Status::kNonFinite, row);
          a.part.max[pr] = qnan<float>();  // poison: K2 skips the row
        }
        continue;
      }
      if ((lane & 3) == 0) { a.part.max[pr] = m; a.part.sumexp[pr] = s; a.part.ent[pr] = e; }
      for (int j = lane & 3; j < a.k; j += 4) {
        const int32_t id = sh.id[r][j];
        a.part.heap_vals[pr * a.k + j] = sh.v[r][j];
        a.part.heap_ids[pr * a.k + j] = id == kHeadEmpty ? kEmptyId : int64_t(id);
      }
    }
  }
};

}  // namespace dev

namespace host {

// Column tiles per split and splits per row block: enough CTAs for every multiprocessor when the row blocks are
// few, at most 16 splits (K2 merges them), whole tiles per split.
struct HeadPlan {
  int64_t row_blocks = 0, tiles = 0;
  int splits = 1, tiles_per_split = 1;
};
inline HeadPlan head_plan(int64_t rows, int64_t V, int num_sms) {
  HeadPlan p;
  p.row_blocks = (rows + dev::kHeadTileM - 1) / dev::kHeadTileM;
  p.tiles = (V + dev::kHeadTileN - 1) / dev::kHeadTileN;
  int64_t s = (int64_t(num_sms) + p.row_blocks - 1) / p.row_blocks;
  s = s < 16 ? s : 16;
  s = s < p.tiles ? s : p.tiles;
  s = s < 1 ? 1 : s;
  p.tiles_per_split = int((p.tiles + s - 1) / s);
  p.splits = int((p.tiles + p.tiles_per_split - 1) / p.tiles_per_split);  // no empty split
  return p;
}

}  // namespace host
}  // namespace cuda
}  // namespace opdcore
