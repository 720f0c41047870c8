// quick_gemv.cu: batch <= 8 (decode) W4A16 product over the same `quick` layout, built to stream the
// weights at the memory roofline.
//
// No shared-memory pipeline and no barrier in the main loop: every warp owns a contiguous run of k16
// steps of NB n64 blocks and keeps a ring of R steps in flight in registers: the 16-byte weight word of
// each block, the A fragment (two 32-bit loads of x, which is tiny and stays in L2) and the group's
// scales/zeros. Compute is free at this size, so the tensor cores still do the products:
// mma.m16n8k16 with rows 8..15 of A set to zero (a1 = a3 = 0) and rows >= M never loaded or stored.
// The WARPS warps of a CTA split K; their accumulators meet once in shared memory and are summed in a
// fixed order. Splits across CTAs (gridDim.y > 1) write fp32 partials for quick_splitk_reduce.
//
// -D: QK_DTYPE (0 fp16, 1 bf16), QK_WARPS, QK_NB, QK_R (ring depth in k16 steps), QK_GS (k16 steps per
// quantization group when it is < QK_R, which makes the scale ring static; 0 = group >= R steps,
// runtime, per-channel included). Dynamic shared memory: WARPS * NB * 2048 bytes.
#include "quick_common.cuh"
#include "quick_splitk.cuh"

#ifndef QK_WARPS
#define QK_WARPS 8
#endif
#ifndef QK_NB
#define QK_NB 1
#endif
#ifndef QK_R
#define QK_R 8
#endif
#ifndef QK_GS
#define QK_GS 0
#endif

namespace {
constexpr int DT = QK_DTYPE;
constexpr int WARPS = QK_WARPS, NB = QK_NB, R = QK_R, GS = QK_GS;
constexpr int THREADS = 32 * WARPS;
constexpr int NSLOT = GS > 0 ? R / GS : 1;  // scale ring slots
static_assert(GS == 0 || (GS < R && R % GS == 0), "QK_GS must divide QK_R (or be 0)");
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) quick_gemv(
    const void* __restrict__ xp, const uint4* __restrict__ qweight, const void* __restrict__ scalesp,
    const void* __restrict__ zerosp, const void* __restrict__ bias, void* __restrict__ out, float* __restrict__ ws,
    int M, int N, int K, int group_size, int steps_per_warp) {
  using namespace quick;
  extern __shared__ __align__(16) unsigned char smem[];
  const char* x = static_cast<const char*>(xp);
  const char* scales = static_cast<const char*>(scalesp);
  const char* zeros = static_cast<const char*>(zerosp);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // A row / B column inside a tile
  const int c = lane & 3;
  const int ksteps = K / 16;
  const int tb = (blockIdx.y * WARPS + warp) * steps_per_warp;  // this warp's k16 steps [tb, te)
  const int te = min(tb + steps_per_warp, ksteps);
  const int gsteps = group_size / 16;
  const int half_n = N / 2;

  int nblk[NB];
  bool nvalid[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    nblk[nb] = blockIdx.x * NB + nb;
    nvalid[nb] = nblk[nb] < N / 64;
  }
  const bool xrow = g < M;
  const char* xr = x + (static_cast<size_t>(xrow ? g : 0) * K + 2 * c) * 2;

  auto load_w = [&](int step, int nb) {
    return ldg_stream128(qweight + (static_cast<size_t>(step) * half_n + nblk[nb] * 32 + lane));
  };
  auto load_x = [&](int step) {
    uint2 v = make_uint2(0, 0);
    if (xrow) {
      v.x = ldg32(xr + step * 32);
      v.y = ldg32(xr + step * 32 + 16);
    }
    return v;
  };
  // this lane's 8 scales (or zeros) of group `grp`: one 16-byte load
  auto load_s = [&](const char* base, int grp, int nb) {
    return ldg128(base + (static_cast<size_t>(grp) * N + nblk[nb] * 64 + 8 * g) * 2);
  };

  uint4 wr[R][NB];
  uint2 xv[R];
  uint4 sr[NSLOT][NB], zr[NSLOT][NB];  // GS > 0: static scale ring; GS == 0: the current group
  uint4 sn[NB], zn[NB];                // GS == 0: the next group
  float acc[NB][8][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nb][t][e] = 0.f;
    sn[nb] = zn[nb] = make_uint4(0, 0, 0, 0);
  }

  // ---- prologue: R steps of weights and activations, the scales they need
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool ok = tb + i < te;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      wr[i][nb] = make_uint4(0, 0, 0, 0);
      if (ok && nvalid[nb]) wr[i][nb] = load_w(tb + i, nb);
    }
    xv[i] = ok ? load_x(tb + i) : make_uint2(0, 0);
  }
  int next_start = 0, next_load = 0;  // GS == 0 bookkeeping (steps)
  if constexpr (GS > 0) {
#pragma unroll
    for (int j = 0; j < NSLOT; ++j)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        sr[j][nb] = zr[j][nb] = make_uint4(0, 0, 0, 0);
        if (tb + j * GS < te && nvalid[nb]) {
          sr[j][nb] = load_s(scales, (tb + j * GS) / GS, nb);
          zr[j][nb] = load_s(zeros, (tb + j * GS) / GS, nb);
        }
      }
  } else {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      sr[0][nb] = zr[0][nb] = make_uint4(0, 0, 0, 0);
      if (tb < te && nvalid[nb]) {
        sr[0][nb] = load_s(scales, tb / gsteps, nb);
        zr[0][nb] = load_s(zeros, tb / gsteps, nb);
      }
    }
    next_start = (tb / gsteps + 1) * gsteps;
    next_load = next_start;
    if (next_load < min(te, tb + R)) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
        if (nvalid[nb]) {
          sn[nb] = load_s(scales, next_load / gsteps, nb);
          zn[nb] = load_s(zeros, next_load / gsteps, nb);
        }
      next_load += gsteps;
    }
  }

  // ---- main loop: consume ring slot i, refill it with step t + R
  for (int t0 = tb; t0 < te; t0 += R) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int t = t0 + i;
      if (t < te) {
        if constexpr (GS == 0) {
          if (t == next_start) {
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
              sr[0][nb] = sn[nb];
              zr[0][nb] = zn[nb];
            }
            next_start += gsteps;
          }
        }
        const int js = GS > 0 ? i / (GS > 0 ? GS : 1) : 0;  // compile-time after unrolling
        const uint32_t a[4] = {xv[i].x, 0u, xv[i].y, 0u};
        const bool refill = t + R < te;
        if (refill) xv[i] = load_x(t + R);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          const uint4 wv = wr[i][nb];
          const uint4 sv = sr[js][nb], zv = zr[js][nb];
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            uint32_t b[4];
            dequant_word<DT>(u4_get(wv, w), u4_get(sv, w), neg_magic_zero<DT>(u4_get(zv, w)), b);
            mma_16816<DT>(acc[nb][2 * w], a, b[0], b[1]);
            mma_16816<DT>(acc[nb][2 * w + 1], a, b[2], b[3]);
          }
          if (refill && nvalid[nb]) wr[i][nb] = load_w(t + R, nb);
        }
        if constexpr (GS > 0) {
          if (i % GS == GS - 1) {
            const int u = t + 1 - GS + R;  // first step of the group that reuses slot js
            if (u < te) {
#pragma unroll
              for (int nb = 0; nb < NB; ++nb)
                if (nvalid[nb]) {
                  sr[js][nb] = load_s(scales, u / GS, nb);
                  zr[js][nb] = load_s(zeros, u / GS, nb);
                }
            }
          }
        } else {
          const int u = t + R;
          if (u < te && u == next_load) {
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
              if (nvalid[nb]) {
                sn[nb] = load_s(scales, u / gsteps, nb);
                zn[nb] = load_s(zeros, u / gsteps, nb);
              }
            next_load += gsteps;
          }
        }
      }
    }
  }

  // ---- the WARPS k-slices meet in shared memory; rows 0..7 only (c0, c1 of each tile)
  float2* red = reinterpret_cast<float2*>(smem);  // [WARPS][NB * 8][32]
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int t = 0; t < 8; ++t) red[(warp * NB * 8 + nb * 8 + t) * 32 + lane] = make_float2(acc[nb][t][0], acc[nb][t][1]);
  __syncthreads();
  const bool split = gridDim.y > 1;
  for (int idx = threadIdx.x; idx < NB * 8 * 32; idx += THREADS) {
    const int l = idx & 31;
    const int row = l >> 2;
    const int nb = idx / 256;
    const int t = (idx / 32) % 8;
    const int blk = blockIdx.x * NB + nb;
    if (row >= M || blk >= N / 64) continue;
    float2 v = red[idx];
#pragma unroll 4
    for (int w = 1; w < WARPS; ++w) {
      const float2 u = red[w * NB * 8 * 32 + idx];
      v.x += u.x;
      v.y += u.y;
    }
    const int col = blk * 64 + t * 8 + 2 * (l & 3);
    if (split) {
      *reinterpret_cast<float2*>(ws + (static_cast<size_t>(blockIdx.y) * M + row) * N + col) = v;
    } else {
      if (bias != nullptr) {
        const float2 b = unpack2<DT>(*reinterpret_cast<const uint32_t*>(static_cast<const char*>(bias) + col * 2));
        v.x += b.x;
        v.y += b.y;
      }
      *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + (static_cast<size_t>(row) * N + col) * 2) =
          pack2<DT>(v.x, v.y);
    }
  }
}
