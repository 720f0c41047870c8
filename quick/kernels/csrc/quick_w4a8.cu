// quick_w4a8.cu: the W4A8 GEMM on the int8 tensor cores (sm_80+), mma.sync.m16n8k32.s32.s8.s8.s32.
//
//   out[m, n] = s_x[m] * s_ch[n] * sum_k x_q[m, k] * q[n, k] * s_g[k / 128, n]  (+ bias[n])
//
// x_q/s_x come from quick_actquant.cu; the weights are packed in layout `w4a8` (quick/formats/layouts.py):
// blocks of k32 x n32, one 16-byte load per lane = the B registers of 4 n8k32 tiles. Each int32 word of
// 8 nibbles (4-bit two's complement) becomes the two B registers of one tile with shift + mask:
// b0 = (w << 4) & 0xF0F0F0F0, b1 = w & 0xF0F0F0F0, every byte = 16 * q (exact). The int32 sums are
// therefore 16x the true sums and are divided by 16 with an exact arithmetic shift.
//
// The weights never touch shared memory: each warp streams its blocks from global memory into a register
// ring PF stages ahead. Activations (int8) go through a STAGES-deep cp.async pipeline; A fragments come from
// ldmatrix.x4 (an m16 x k32 int8 tile is an m16 x k16 b16 tile; rows padded by 16 bytes: no bank conflicts).
//
// Per-group (QW_GROUP = 128): the mma accumulates into a per-run partial `part`; at the end of every run of
// steps inside one group the partial is shifted (/16) and multiplied by the integer group scale into the
// int32 total (exact integer arithmetic: scaling any sub-sum of a group by s_g is the same as scaling the
// group's sum). Per-channel (QW_GROUP = 0): one accumulator, shifted once at the end.
//
// CTA = WARPS_M x WARPS_N x WARPS_K warps. A warp owns WM = BM / WARPS_M rows, NB n32 blocks and SW k32
// steps of every stage (a stage = BKS = 32 * SW * WARPS_K columns of K). k-slices are added in shared memory
// (int32: exact, order-free); split-k CTAs (gridDim.z > 1) write int32 partials that quick_w4a8_reduce sums.
// All of it is integer until the epilogue, whose float formula is the same in both kernels
// (((float)v * s_x) * s_ch + bias, explicit rn operations): split and unsplit results agree bit for bit.
//
// Compile-time configuration (-D): QW_DTYPE (0 fp16, 1 bf16 output), QW_GROUP (0 or 128), QW_BM, QW_WM,
// QW_WN, QW_WK, QW_NB, QW_SW, QW_STAGES, QW_PF, QW_MINB. Shared memory: quick_w4a8.py:W4A8Config.smem_bytes.
// QW_U8 = 1 (per-group only): the weights go in as unsigned q + 8 (mma .s8.u8: lop3 (w ^ 0x88..) & 0x0F..), so the
// sums need no /16; the zero point is folded into the first mma of each run, whose C operand is
// -8 * sum(x_q over the run's group) (per row, from quick_actquant's xsum), and the fold is one
// multiply-add: total += part * s_g. Exact for the same reason as above.
// QW_INRED = 1: split-k partials are summed by the last CTA to finish a tile (atomic arrival counter per tile,
// reset by that CTA), so no reduce launch; same bits as quick_w4a8_reduce (integer sums, same epilogue).
#include "quick_common.cuh"

#ifndef QW_DTYPE
#define QW_DTYPE 0
#endif
#ifndef QW_GROUP
#define QW_GROUP 0
#endif
#ifndef QW_BM
#define QW_BM 16
#endif
#ifndef QW_WM
#define QW_WM 1
#endif
#ifndef QW_WN
#define QW_WN 1
#endif
#ifndef QW_WK
#define QW_WK 4
#endif
#ifndef QW_NB
#define QW_NB 2
#endif
#ifndef QW_SW
#define QW_SW 4
#endif
#ifndef QW_STAGES
#define QW_STAGES 3
#endif
#ifndef QW_PF
#define QW_PF 2
#endif
#ifndef QW_MINB
#define QW_MINB 1
#endif
#ifndef QW_INRED
#define QW_INRED 0
#endif
#ifndef QW_U8
#define QW_U8 0
#endif

namespace {

constexpr int DT = QW_DTYPE;
constexpr int GROUP = QW_GROUP;
constexpr bool U8 = GROUP != 0 && QW_U8 != 0;
constexpr int BM = QW_BM, WARPS_M = QW_WM, WARPS_N = QW_WN, WARPS_K = QW_WK;
constexpr int NB = QW_NB, SW = QW_SW, STAGES = QW_STAGES, PF = QW_PF;
constexpr int NWARPS = WARPS_M * WARPS_N * WARPS_K;
constexpr int THREADS = 32 * NWARPS;
constexpr int WM = BM / WARPS_M;
constexpr int MT = WM / 16;
constexpr int BN = 32 * NB * WARPS_N;
constexpr int BKS = 32 * SW * WARPS_K;  // bytes = columns of K per stage
constexpr int A_STRIDE = BKS + 16;      // bytes; +16 per row: ldmatrix rows fall in distinct banks
constexpr int A_STAGE_BYTES = BM * A_STRIDE;
constexpr int A_CHUNKS = BM * BKS / 16;  // 16-byte pieces of one A stage
// Per-group: a run of RUN k32 steps of one warp lies inside one group; NRUN runs per stage and warp.
constexpr int RUN = GROUP ? (SW < GROUP / 32 ? SW : GROUP / 32) : SW;
constexpr int NRUN = SW / RUN;

static_assert(MT >= 1 && WM % 16 == 0, "BM / WARPS_M must be a multiple of 16");
static_assert(STAGES >= 2, "need at least two pipeline stages");
static_assert(A_STAGE_BYTES % 16 == 0, "stages must stay 16-byte aligned");
static_assert(GROUP == 0 || (GROUP % 32 == 0 && (SW % RUN == 0) && ((GROUP / 32) % RUN == 0)),
              "per-group: a warp's k32 runs must tile the group");
static_assert(!U8 || RUN * 32 == GROUP, "unsigned variant: each run must cover a whole group (SW % (G/32) == 0)");

__device__ __forceinline__ void mma_s8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d = a * b (+ 0): the first step of a per-group run starts from zero without zeroing registers.
__device__ __forceinline__ void mma_s8_zero(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

// Unsigned-weight variant: B = q + 8 (u8), with C = (c0, c0, c1, c1) for the first step of a run.
__device__ __forceinline__ void mma_u8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_u8_init(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, int c0, int c1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%11,%11};"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c0), "r"(c1));
}

// One int32 word of 8 int4 -> the two u8 B registers of one n8k32 tile (bytes = q + 8 = (nibble ^ 8)).
__device__ __forceinline__ void int4_to_u8(uint32_t w, uint32_t& b0, uint32_t& b1) {
  // lop3 immLut 0x28 = (a ^ b) & c
  asm("lop3.b32 %0, %1, %2, %3, 0x28;" : "=r"(b0) : "r"(w), "r"(0x88888888u), "r"(0x0F0F0F0Fu));
  asm("lop3.b32 %0, %1, %2, %3, 0x28;" : "=r"(b1) : "r"(w >> 4), "r"(0x08080808u), "r"(0x0F0F0F0Fu));
}

// One int32 word of 8 int4 -> the two int8 B registers of one n8k32 tile (bytes = 16 * q).
__device__ __forceinline__ void int4_to_int8x16(uint32_t w, uint32_t& b0, uint32_t& b1) {
  b0 = (w << 4) & 0xF0F0F0F0u;
  b1 = w & 0xF0F0F0F0u;
}

// The float epilogue shared by both kernels (explicit rounding steps, no contraction).
__device__ __forceinline__ float w4a8_scale(int v, float sx, float sch, float b) {
  return __fadd_rn(__fmul_rn(__fmul_rn(static_cast<float>(v), sx), sch), b);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, QW_MINB) quick_w4a8_gemm(
    const int8_t* __restrict__ xq, const float* __restrict__ sx, const uint4* __restrict__ qweight,
    const float* __restrict__ chscale, const int8_t* __restrict__ gscale, const void* __restrict__ bias,
    void* __restrict__ out, int* __restrict__ ws, int* __restrict__ counters, const int* __restrict__ xsum, int M,
    int N, int K, int tiles_per_split) {
  using namespace quick;
  extern __shared__ __align__(16) unsigned char smem[];

  const CtaPos pos = cta_pos<WARPS_M, WARPS_N, BM, BN, BKS>(K, tiles_per_split);
  const int tid = pos.tid, lane = pos.lane, wm = pos.wm, wn = pos.wn, wk = pos.wk;
  const int n0 = pos.n0, m0 = pos.m0, tile_begin = pos.tile_begin, ntiles = pos.ntiles;

  const uint32_t smem_base = smem_u32(smem);

  // ---- cp.async producer: A tile [BM x BKS] int8 of one stage
  auto load_stage = [&](int slot, int tile) {
    const int k0 = (tile_begin + tile) * BKS;
    const uint32_t sa = smem_base + slot * A_STAGE_BYTES;
#pragma unroll
    for (int i = tid; i < A_CHUNKS; i += THREADS) {
      const int row = i / (BKS / 16);
      const int c = i % (BKS / 16);
      const int m = m0 + row;
      const bool ok = m < M;
      const int8_t* src = xq + (static_cast<size_t>(ok ? m : 0) * K + k0 + c * 16);
      cp_async16(sa + row * A_STRIDE + c * 16, src, ok);
    }
  };

  // ---- per-warp weight stream: qweight uint4 index of (k32 step, n32 block, lane) = step * N + block * 32 + lane
  int nblk[NB];
  bool nvalid[NB];
  warp_nblocks<NB, 32>(n0, wn, N, nblk, nvalid);
  auto wptr = [&](int tile, int j, int nb) {
    const int step = (tile_begin + tile) * (BKS / 32) + wk * SW + j;
    return qweight + (static_cast<size_t>(step) * N + nblk[nb] * 32 + lane);
  };
  // group-scale bytes of (tile, run r, block nb): 8 columns of this lane, one 8-byte load
  auto gptr = [&](int tile, int r, int nb) {
    const int k = (tile_begin + tile) * BKS + (wk * SW + r * RUN) * 32;
    const int g = GROUP ? k / (GROUP ? GROUP : 1) : 0;
    return reinterpret_cast<const uint2*>(gscale + static_cast<size_t>(g) * N + nblk[nb] * 32 + 8 * (lane & 3));
  };

  uint4 wring[PF][SW][NB];
  uint2 sring[PF][GROUP ? NRUN : 1][NB];
  int xring[PF][U8 ? NRUN : 1][MT][2];  // U8: -8 * the group sums of x_q of this lane's rows
  int acc[MT][NB][4][4];
  int part[MT][NB][4][4];
  zero_acc(acc);

  auto fetch = [&](int p, int tile) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      if (!nvalid[nb]) continue;
#pragma unroll
      for (int j = 0; j < SW; ++j) wring[p][j][nb] = ldg_stream128(wptr(tile, j, nb));
      if constexpr (GROUP != 0) {
#pragma unroll
        for (int r = 0; r < NRUN; ++r) sring[p][r][nb] = *gptr(tile, r, nb);
      }
    }
    if constexpr (U8) {
      const int ngroups = K / (GROUP ? GROUP : 1);
#pragma unroll
      for (int r = 0; r < NRUN; ++r) {
        const int g = ((tile_begin + tile) * BKS + (wk * SW + r * RUN) * 32) / (GROUP ? GROUP : 1);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm * WM + mt * 16 + (lane >> 2) + 8 * h;
            xring[p][r][mt][h] = row < M ? -8 * xsum[static_cast<size_t>(row) * ngroups + g] : 0;
          }
      }
    }
  };

  // ---- prologue: weights for the first PF stages, activations for the first STAGES - 1
#pragma unroll
  for (int p = 0; p < PF; ++p) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int j = 0; j < SW; ++j) wring[p][j][nb] = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < (GROUP ? NRUN : 1); ++r) sring[p][r][nb] = make_uint2(0, 0);
    }
#pragma unroll
    for (int r = 0; r < (U8 ? NRUN : 1); ++r)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xring[p][r][mt][0] = xring[p][r][mt][1] = 0;
    if (p < ntiles) fetch(p, p);
  }
  pipeline_prologue<STAGES>(ntiles, load_stage);

  // ---- main loop, unrolled by PF so that every ring slot has a compile-time index
  const int a_row = wm * WM + (lane & 15);
  const int a_col = (lane >> 4) * 16;
  for (int t0 = 0; t0 < ntiles; t0 += PF) {
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      const int tile = t0 + p;
      if (tile < ntiles) {
        pipeline_advance<STAGES>(tile, ntiles, load_stage);
        const uint32_t sa = smem_base + (tile % STAGES) * A_STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < SW; ++j) {
          const int kl = (wk * SW + j) * 32;
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sa + (a_row + mt * 16) * A_STRIDE + kl + a_col);
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            const uint4 wv = wring[p][j][nb];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              uint32_t b0, b1;
              if constexpr (U8) {
                int4_to_u8(u4_get(wv, t), b0, b1);
              } else {
                int4_to_int8x16(u4_get(wv, t), b0, b1);
              }
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                if constexpr (U8) {
                  if (j % RUN == 0) {
                    const int* xr = xring[p][j / RUN][mt];
                    mma_u8_init(part[mt][nb][t], a[mt], b0, b1, xr[0], xr[1]);
                  } else {
                    mma_u8(part[mt][nb][t], a[mt], b0, b1);
                  }
                } else if constexpr (GROUP != 0) {
                  if (j % RUN == 0) {
                    mma_s8_zero(part[mt][nb][t], a[mt], b0, b1);
                  } else {
                    mma_s8(part[mt][nb][t], a[mt], b0, b1);
                  }
                } else {
                  mma_s8(acc[mt][nb][t], a[mt], b0, b1);
                }
              }
            }
          }
          if constexpr (GROUP != 0) {
            if ((j + 1) % RUN == 0) {
              const int r = j / RUN;
#pragma unroll
              for (int nb = 0; nb < NB; ++nb) {
                const uint2 sv = sring[p][r][nb];
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                  const uint32_t word = t < 2 ? sv.x : sv.y;
                  const int s0 = static_cast<int>((word >> (16 * (t & 1))) & 0xFFu);
                  const int s1 = static_cast<int>((word >> (16 * (t & 1) + 8)) & 0xFFu);
#pragma unroll
                  for (int mt = 0; mt < MT; ++mt) {
                    constexpr int SH = U8 ? 0 : 4;  // signed variant: every product was 16 * x * q
                    acc[mt][nb][t][0] += (part[mt][nb][t][0] >> SH) * s0;
                    acc[mt][nb][t][1] += (part[mt][nb][t][1] >> SH) * s1;
                    acc[mt][nb][t][2] += (part[mt][nb][t][2] >> SH) * s0;
                    acc[mt][nb][t][3] += (part[mt][nb][t][3] >> SH) * s1;
                  }
                }
              }
            }
          }
        }
        if (tile + PF < ntiles) fetch(p, tile + PF);
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (GROUP == 0) {
    for_each_tile<MT, NB, 4>([&](int mt, int nb, int t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nb][t][e] >>= 4;  // exact: every product was 16 * x * q
    });
  }

  // ---- add the WARPS_K k-slices (int32: exact in any order)
  if constexpr (WARPS_K > 1) reduce_kslices<WARPS_K>(acc, smem, wm + WARPS_M * wn, wk, lane);
  if (wk != 0) return;

  // ---- epilogue: scales (+ bias) straight from the accumulators, or int32 partials for split-k
  const bool split = gridDim.z > 1;
  const int row0 = m0 + wm * WM;
  struct ColOps {
    float2 cs, bv;  // channel scales, bias
  };
  auto col_ops = [&](bool use, int col) {
    ColOps c{make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
    if (use) {
      c.cs = *reinterpret_cast<const float2*>(chscale + col);
      if (bias != nullptr) c.bv = load_pair<DT>(bias, col);
    }
    return c;
  };
  for_each_out_pair<MT, NB, 4, 32>(
      nblk, nvalid, row0, M, lane, [&](int col) { return col_ops(!split, col); },
      [&](const ColOps& c, int row, int col, int mt, int nb, int t, int h) {
        const int v0 = acc[mt][nb][t][2 * h], v1 = acc[mt][nb][t][2 * h + 1];
        if (split) {
          store_partial(ws, blockIdx.z, M, N, row, col, v0, v1);
        } else {
          const float s = sx[row];
          const size_t o = static_cast<size_t>(row) * N + col;
          *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + o * 2) =
              pack2<DT>(w4a8_scale(v0, s, c.cs.x, c.bv.x), w4a8_scale(v1, s, c.cs.y, c.bv.y));
        }
      });
#if QW_INRED
  // ---- split-k in the kernel: the last CTA of this (n, m) tile sums every split's int32 partial
  if (!split) return;
  constexpr int RT = 32 * WARPS_M * WARPS_N;  // the wk == 0 threads (tid < RT), still running here
  const int tile_id = blockIdx.y * gridDim.x + blockIdx.x;
  if (!splitk_last_cta<RT>(counters, tile_id, tid)) return;
  const int nz = gridDim.z;
  const size_t mn = static_cast<size_t>(M) * N;
  for_each_out_pair<MT, NB, 4, 32>(
      nblk, nvalid, row0, M, lane, [&](int col) { return col_ops(true, col); },
      [&](const ColOps& c, int row, int col, int, int, int, int) {
        const size_t o = static_cast<size_t>(row) * N + col;
        const int2 v = sum_splits2(ws, o, mn, nz);
        const float s = sx[row];
        *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + o * 2) =
            pack2<DT>(w4a8_scale(v.x, s, c.cs.x, c.bv.x), w4a8_scale(v.y, s, c.cs.y, c.bv.y));
      });
  splitk_done(counters, tile_id, tid);
#endif
}

// Split-k: sum the int32 partials ws[z][M][N] (exact), then the same float epilogue as the GEMM.
extern "C" __global__ void __launch_bounds__(256) quick_w4a8_reduce(const int* __restrict__ ws,
                                                                    const float* __restrict__ sx,
                                                                    const float* __restrict__ chscale,
                                                                    const void* __restrict__ bias,
                                                                    void* __restrict__ out, int M, int N, int splits) {
  using namespace quick;
  const size_t total4 = static_cast<size_t>(M) * N / 4;  // N % 32 == 0
  const size_t mn = static_cast<size_t>(M) * N;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total4;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int4 acc = sum_splits4(ws, i, mn, splits);
    const int row = static_cast<int>((i * 4) / N);
    const int col = static_cast<int>((i * 4) % N);
    const float s = sx[row];
    const float4 cs = *reinterpret_cast<const float4*>(chscale + col);
    float2 b01 = make_float2(0.f, 0.f), b23 = make_float2(0.f, 0.f);
    if (bias != nullptr) load_quad<DT>(bias, col, b01, b23);
    uint2 o;
    o.x = pack2<DT>(w4a8_scale(acc.x, s, cs.x, b01.x), w4a8_scale(acc.y, s, cs.y, b01.y));
    o.y = pack2<DT>(w4a8_scale(acc.z, s, cs.z, b23.x), w4a8_scale(acc.w, s, cs.w, b23.y));
    reinterpret_cast<uint2*>(out)[i] = o;
  }
}
