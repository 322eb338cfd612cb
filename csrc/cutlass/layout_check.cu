// Host-side check (scripts/check_cuda_compile.sh builds and runs it; no GPU needed) that the register layout the
// fused LM-head epilogue assumes (head_row / head_col of head_epilogue.cuh, frag_h / frag_p of
// head_sm90_config.h) is the one CuTe gives the sm_90 TiledMma's accumulators: for every consumer thread and
// every fragment index, CuTe's coordinate in the 128 x 128 tile equals the epilogue's.
#include <cstdio>

#include "../cuda/head_epilogue.cuh"
#include "head_sm90_config.h"

int main() {
  using namespace cute;
  using namespace opdcore::cuda;
  using C = sm90::Mainloop<opdcore::bfloat16>::Collective;
  typename C::TiledMma mma;
  static_assert(decltype(size(mma))::value == sm90::kMmaThreads, "the consumers are two warpgroups");
  const auto cD = make_identity_tensor(take<0, 2>(sm90::TileShape{}));
  int bad = 0, checked = 0;
  for (int t = 0; t < sm90::kMmaThreads; ++t) {
    const auto tCcD = mma.get_thread_slice(t).partition_C(cD);
    if (int(size(tCcD)) != 2 * dev::kHeadTileN / 4) {
      std::printf("thread %d holds %d accumulators, the epilogue expects %d\n", t, int(size(tCcD)),
                  dev::kHeadTileN / 2);
      return 1;
    }
    for (int i = 0; i < int(size(tCcD)); ++i) {
      const int r = get<0>(tCcD(i)), c = get<1>(tCcD(i));
      const int er = dev::head_row(t, sm90::frag_h(i)), ec = dev::head_col(t, sm90::frag_p(i));
      ++checked;
      if (r != er || c != ec) {
        if (bad++ < 5) std::printf("thread %d value %d: CuTe (%d, %d), epilogue (%d, %d)\n", t, i, r, c, er, ec);
      }
    }
  }
  std::printf("fused-head accumulator layout: %d of %d positions differ\n", bad, checked);
  return bad == 0 ? 0 : 1;
}
