// quick_mainloop.cuh: the main loop of the W4A16 mma.sync GEMMs (quick_mma.cu, quick_moe.cu), which stream their
// weights from global memory through a register ring of PF tiles.
//
// Public API (namespace quick), all __device__ __forceinline__:
//   pipeline_loop<STAGES, PF>(ntiles, load_stage, body)   the K-tile loop: body(p, tile) once tile's cp.async
//                                                          stage has landed, p = tile % PF (the ring slot)
//   weight_ring_prologue(wring, ntiles, nvalid, load)      ring slots 0 .. PF - 1 <- tiles 0 .. PF - 1
//   w4a16_kstep<DT, ...>(acc, ...)                         one k16 step of a warp
#pragma once

#include "quick_common.cuh"

namespace quick {

// Unrolled by PF so that every ring slot has a compile-time index once body(p, tile) is inlined.
template <int STAGES, int PF, typename LoadFn, typename BodyFn>
__device__ __forceinline__ void pipeline_loop(int ntiles, LoadFn&& load_stage, BodyFn&& body) {
  for (int t0 = 0; t0 < ntiles; t0 += PF) {
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      const int tile = t0 + p;
      if (tile < ntiles) {
        pipeline_advance<STAGES>(tile, ntiles, load_stage);
        body(p, tile);
      }
    }
  }
}

// wring[p][j][nb] = load(p, j, nb) for the first PF tiles; zero past ntiles and for blocks outside N.
template <int PF, int SW, int NB, typename LoadFn>
__device__ __forceinline__ void weight_ring_prologue(uint4 (&wring)[PF][SW][NB], int ntiles, const bool (&nvalid)[NB],
                                                     LoadFn&& load) {
#pragma unroll
  for (int p = 0; p < PF; ++p)
#pragma unroll
    for (int j = 0; j < SW; ++j)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        wring[p][j][nb] = make_uint4(0, 0, 0, 0);
        if (p < ntiles && nvalid[nb]) wring[p][j][nb] = load(p, j, nb);
      }
}

// One k16 step (columns kl .. kl + 15 of the stage at shared address sa) of a warp's MT m16 tiles x NB n64 blocks:
// A fragments by ldmatrix (rows a_row + 16 * mt, padded row stride A_STRIDE elements), then per block nb its group
// row of scales / zeros (at ss, zeros S_BYTES further, BN per row), the weight word weight(nb), dequantized into the
// 8 x MT products; refill(nb) right after block nb, where the ring slot it read can take the next tile.
template <int DT, int MT, int NB, int A_STRIDE, int BN, int S_BYTES, typename WeightFn, typename RefillFn>
__device__ __forceinline__ void w4a16_kstep(float (&acc)[MT][NB][8][4], uint32_t sa, uint32_t ss, int a_row, int a_col,
                                            int s_col, int kl, int gshift, WeightFn&& weight, RefillFn&& refill) {
  uint32_t a[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sa + ((a_row + mt * 16) * A_STRIDE + kl + a_col) * 2);
  const int grow = kl >> gshift;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const uint32_t soff = ss + (grow * BN + s_col + nb * 64) * 2;
    const uint4 sv = lds128(soff);
    const uint4 zv = lds128(soff + S_BYTES);
    const uint4 wv = weight(nb);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t b[4];
      dequant_word<DT>(u4_get(wv, w), u4_get(sv, w), neg_magic_zero<DT>(u4_get(zv, w)), b);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<DT>(acc[mt][nb][2 * w], a[mt], b[0], b[1]);
        mma_16816<DT>(acc[mt][nb][2 * w + 1], a[mt], b[2], b[3]);
      }
    }
    refill(nb);
  }
}

}  // namespace quick
