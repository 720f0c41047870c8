// quick_mma.cu: the QUICK W4A16 GEMM, out[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias), mma.sync.m16n8k16.
//
// The weights never touch shared memory: each warp streams its k16 x n64 blocks of the interleaved
// `quick` layout from global memory straight into registers (one 16-byte load per lane and block),
// a ring of PF stages ahead, dequantizes them in registers (lop3 + magic number, subtract the zero,
// multiply the scale) and feeds them to mma.sync as the B operand. Activations and the per-group
// scales/zeros go through a STAGES-deep cp.async pipeline in shared memory; A fragments come from
// ldmatrix.x4 (rows padded by 16 bytes: no bank conflicts). The shared memory the weights do not use
// pays for taller M tiles and deeper activation pipelines.
//
// CTA = WARPS_M x WARPS_N x WARPS_K warps. A warp owns WM = BM / WARPS_M rows, NB n64 blocks, and SW of
// the k16 steps of every stage (stage = BKS = 16 * SW * WARPS_K columns of K). Warps of different k
// slices add their accumulators through shared memory in a fixed order at the end; CTAs of different
// splits (gridDim.z > 1) write fp32 partials that quick_splitk_reduce sums in a fixed order. Both are
// deterministic. Rows >= M are zero-filled by cp.async and never stored; n64 blocks >= N are skipped.
//
// Compile-time configuration (-D): QK_DTYPE (0 fp16, 1 bf16), QK_BM, QK_WM, QK_WN, QK_WK, QK_NB, QK_SW,
// QK_STAGES, QK_PF, QK_MINB. Shared memory size: quick/kernels/mma.py:GemmConfig.smem_bytes.
// Decode options: QK_INRED = 1: split-k partials are summed by the last CTA to finish a tile (an atomic arrival
// counter per tile, reset by that CTA; the sum runs in split order 0..S-1, bitwise the same as
// quick_splitk_reduce), so no second launch. QK_L2PF = D > 0: while tile t is consumed, the CTA asks L2 to
// fetch the weights of tile t + D (bytes in flight beyond the register ring, no registers held). QK_WSMEM = 1:
// the weights travel with the activations in the cp.async stages (global -> shared, 16 bytes per lane and
// block, then one conflict-free 16-byte shared load per lane): STAGES - 1 tiles of weights in flight per CTA,
// waited for precisely by cp.async.wait_group instead of the register scoreboards (QK_PF must be 1). QK_EF = 1:
// every weight access (loads, cp.async, L2 prefetch) carries an L2::evict_first policy: weights are read once, and
// the L2 then replaces these clean lines before anything else (other data, or dirty lines waiting for write-back).
#include "quick_common.cuh"
#include "quick_mainloop.cuh"
#include "quick_splitk.cuh"

#ifndef QK_BM
#define QK_BM 16
#endif
#ifndef QK_WM
#define QK_WM 1
#endif
#ifndef QK_WN
#define QK_WN 1
#endif
#ifndef QK_WK
#define QK_WK 4
#endif
#ifndef QK_NB
#define QK_NB 1
#endif
#ifndef QK_SW
#define QK_SW 4
#endif
#ifndef QK_STAGES
#define QK_STAGES 3
#endif
#ifndef QK_PF
#define QK_PF 1
#endif
#ifndef QK_MINB
#define QK_MINB 1
#endif
#ifndef QK_INRED
#define QK_INRED 0
#endif
#ifndef QK_L2PF
#define QK_L2PF 0
#endif
#ifndef QK_WSMEM
#define QK_WSMEM 0
#endif
#ifndef QK_EF
#define QK_EF 0
#endif

namespace {

constexpr int DT = QK_DTYPE;
constexpr int BM = QK_BM, WARPS_M = QK_WM, WARPS_N = QK_WN, WARPS_K = QK_WK;
constexpr int NB = QK_NB, SW = QK_SW, STAGES = QK_STAGES, PF = QK_PF;
constexpr int NWARPS = WARPS_M * WARPS_N * WARPS_K;
constexpr int THREADS = 32 * NWARPS;
constexpr int WM = BM / WARPS_M;
constexpr int MT = WM / 16;
constexpr int BN = 64 * NB * WARPS_N;
constexpr int BKS = 16 * SW * WARPS_K;
constexpr int A_STRIDE = BKS + 8;  // elements; +16 bytes per row: ldmatrix rows fall in distinct banks
constexpr int A_STAGE_BYTES = BM * A_STRIDE * 2;
constexpr int S_ROWS = BKS >= 32 ? BKS / 32 : 1;  // group rows one stage can span (G >= 32)
constexpr int S_BYTES = S_ROWS * BN * 2;          // scales; zeros follow
constexpr int W_ROW_BYTES = BN * 8;                 // one k16 row of the CTA's n64 blocks (512 B per block)
constexpr int W_STAGE_BYTES = QK_WSMEM ? (BKS / 16) * W_ROW_BYTES : 0;
constexpr int W_OFF = A_STAGE_BYTES + 2 * S_BYTES;  // weights of a stage follow its scales and zeros
constexpr int STAGE_BYTES = A_STAGE_BYTES + 2 * S_BYTES + W_STAGE_BYTES;
constexpr int A_CHUNKS = BM * BKS / 8;  // 16-byte pieces of one A stage

static_assert(MT >= 1 && WM % 16 == 0, "BM / WARPS_M must be a multiple of 16");
static_assert(STAGES >= 2, "need at least two pipeline stages");
static_assert(BKS % 64 == 0, "a stage must cover a multiple of 64 columns of K");
static_assert(STAGE_BYTES % 16 == 0, "stages must stay 16-byte aligned");
static_assert(!QK_WSMEM || PF == 1, "weights through shared memory: no register ring (QK_PF = 1)");

// Weight accesses with an optional L2 cache policy (QK_EF: evict_first).
__device__ __forceinline__ uint64_t weight_policy() {
  uint64_t pol = 0;
#if QK_EF
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
  return pol;
}

__device__ __forceinline__ uint4 ldg_weight(const uint4* p, uint64_t pol) {
#if QK_EF
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
  return v;
#else
  (void)pol;
  return quick::ldg_stream128(p);
#endif
}

__device__ __forceinline__ void cp_async16_weight(uint32_t dst, const void* src, bool valid, uint64_t pol) {
#if QK_EF
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(dst), "l"(src), "r"(n),
               "l"(pol));
#else
  (void)pol;
  quick::cp_async16(dst, src, valid);
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, QK_MINB) quick_gemm(
    const void* __restrict__ xp, const uint4* __restrict__ qweight, const void* __restrict__ scalesp,
    const void* __restrict__ zerosp, const void* __restrict__ bias, void* __restrict__ out, float* __restrict__ ws,
    int* __restrict__ counters, int M, int N, int K, int group_size, int gshift, int tiles_per_split) {
  using namespace quick;
  extern __shared__ __align__(16) unsigned char smem[];
  const char* x = static_cast<const char*>(xp);
  const char* scales = static_cast<const char*>(scalesp);
  const char* zeros = static_cast<const char*>(zerosp);

  const CtaPos pos = cta_pos<WARPS_M, WARPS_N, BM, BN, BKS>(K, tiles_per_split);
  const int tid = pos.tid, lane = pos.lane, wm = pos.wm, wn = pos.wn, wk = pos.wk;
  const int n0 = pos.n0, m0 = pos.m0, tile_begin = pos.tile_begin, ntiles = pos.ntiles;
  const int srows = group_size < BKS ? BKS / group_size : 1;
  const int half_n = N / 2;  // uint4 per k16 row of qweight (2N int32)

  const uint32_t smem_base = smem_u32(smem);
  const uint64_t wpol = weight_policy();

  // ---- cp.async producer: A tile [BM x BKS] and the scale/zero rows of one stage
  auto load_stage = [&](int slot, int tile) {
    const int k0 = (tile_begin + tile) * BKS;
    const uint32_t sa = smem_base + slot * STAGE_BYTES;
#pragma unroll
    for (int i = tid; i < A_CHUNKS; i += THREADS) {
      const int row = i / (BKS / 8);
      const int c = i % (BKS / 8);
      const int m = m0 + row;
      const bool ok = m < M;
      const char* src = x + ((static_cast<size_t>(ok ? m : 0) * K + k0 + c * 8) * 2);
      cp_async16(sa + (row * A_STRIDE + c * 8) * 2, src, ok);
    }
    const int g0 = k0 / group_size;
    const int per = srows * (BN / 8);
    for (int i = tid; i < 2 * per; i += THREADS) {
      const int which = i / per;
      const int r = (i % per) / (BN / 8);
      const int c = i % (BN / 8);
      const int col = n0 + c * 8;
      const bool ok = col < N;
      const char* base = which ? zeros : scales;
      const char* src = base + (static_cast<size_t>(g0 + r) * N + (ok ? col : 0)) * 2;
      cp_async16(sa + A_STAGE_BYTES + which * S_BYTES + (r * BN + c * 8) * 2, src, ok);
    }
#if QK_WSMEM
    // weights: BKS/16 k16 rows x BN*8 contiguous bytes each; blocks past N are zero-filled
    const int step0 = (tile_begin + tile) * (BKS / 16);
    constexpr int CPR = W_ROW_BYTES / 16;  // 16-byte chunks per row
    for (int i = tid; i < (BKS / 16) * CPR; i += THREADS) {
      const int j = i / CPR, c = i % CPR;
      const bool ok = n0 / 64 + c / 32 < N / 64;
      const uint4* src = qweight + (static_cast<size_t>(step0 + j) * half_n + (ok ? (n0 / 64) * 32 + c : 0));
      cp_async16_weight(sa + W_OFF + i * 16, src, ok, wpol);
    }
#endif
  };

  // ---- per-warp weight stream
  int nblk[NB];
  bool nvalid[NB];
  warp_nblocks<NB, 64>(n0, wn, N, nblk, nvalid);
  // qweight uint4 index of (k16 step, n64 block, lane): step * N/2 + block * 32 + lane
  auto wptr = [&](int tile, int j, int nb) {
    const int step = (tile_begin + tile) * (BKS / 16) + wk * SW + j;
    return qweight + (static_cast<size_t>(step) * half_n + nblk[nb] * 32 + lane);
  };

#if QK_L2PF > 0
  // The CTA's weights of one tile: BKS/16 k16 rows, each BN * 8 contiguous bytes (clipped at N).
  auto prefetch_w = [&](int tile) {
    if (tile >= ntiles) return;
    const int row_bytes = min(BN, N - n0) * 8;
    const int step0 = (tile_begin + tile) * (BKS / 16);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int j = tid; j < BKS / 16; j += THREADS) {
      const uint4* p = qweight + (static_cast<size_t>(step0 + j) * half_n + (n0 / 64) * 32);
#if QK_EF
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p), "r"(row_bytes), "l"(wpol)
                   : "memory");
#else
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(row_bytes) : "memory");
#endif
    }
#else
    constexpr int LPS = BN / 16;  // 128-byte lines per k16 row
    for (int i = tid; i < (BKS / 16) * LPS; i += THREADS) {
      const int j = i / LPS, l = i % LPS;
      if (l * 128 < row_bytes) {
        const char* p = reinterpret_cast<const char*>(qweight + (static_cast<size_t>(step0 + j) * half_n + (n0 / 64) * 32));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + l * 128));
      }
    }
#endif
  };
#endif

  uint4 wring[PF][SW][NB];
  float acc[MT][NB][8][4];
  zero_acc(acc);

  // ---- prologue: weights for the first PF stages, activations for the first STAGES - 1
  if constexpr (!QK_WSMEM) {
    weight_ring_prologue(wring, ntiles, nvalid, [&](int p, int j, int nb) { return ldg_weight(wptr(p, j, nb), wpol); });
  }
  pipeline_prologue<STAGES>(ntiles, load_stage);
#if QK_L2PF > 0
  for (int t = PF; t < QK_L2PF; ++t) prefetch_w(t);  // tiles < PF are already being loaded into registers
#endif

  // ---- main loop, unrolled by PF so that every ring slot has a compile-time index
  const int a_row = wm * WM + (lane & 15);
  const int a_col = (lane >> 4) * 8;
  const int s_col = (wn * NB) * 64 + 8 * (lane >> 2);
  pipeline_loop<STAGES, PF>(ntiles, load_stage, [&](int p, int tile) {
#if QK_L2PF > 0
    prefetch_w(tile + QK_L2PF);
#endif
    const uint32_t sa = smem_base + (tile % STAGES) * STAGE_BYTES;
#pragma unroll
    for (int j = 0; j < SW; ++j) {
      w4a16_kstep<DT, MT, NB, A_STRIDE, BN, S_BYTES>(
          acc, sa, sa + A_STAGE_BYTES, a_row, a_col, s_col, (wk * SW + j) * 16, gshift,
          [&](int nb) {
#if QK_WSMEM
            return lds128(sa + W_OFF + (((wk * SW + j) * (BN / 64) + wn * NB + nb) * 32 + lane) * 16);
#else
            return wring[p][j][nb];
#endif
          },
          [&](int nb) {
            if (!QK_WSMEM && tile + PF < ntiles && nvalid[nb])
              wring[p][j][nb] = ldg_weight(wptr(tile + PF, j, nb), wpol);
          });
    }
  });
  cp_async_wait<0>();

  // ---- reduce the WARPS_K k-slices in a fixed order: acc(wk=0) += acc(1); += acc(2); ...
  if constexpr (WARPS_K > 1) reduce_kslices<WARPS_K>(acc, smem, wm + WARPS_M * wn, wk, lane);
  if (wk != 0) return;

  // ---- epilogue: bf16/fp16 (+ bias) straight from the accumulators, or fp32 partials for split-k
  const bool split = gridDim.z > 1;
  const int row0 = m0 + wm * WM;
  auto bias_of = [&](bool use, int col) {
    return use && bias != nullptr ? load_pair<DT>(bias, col) : make_float2(0.f, 0.f);
  };
  for_each_out_pair<MT, NB, 8, 64>(
      nblk, nvalid, row0, M, lane, [&](int col) { return bias_of(!split, col); },
      [&](float2 bv, int row, int col, int mt, int nb, int t, int h) {
        const float v0 = acc[mt][nb][t][2 * h], v1 = acc[mt][nb][t][2 * h + 1];
        if (split) {
          store_partial(ws, blockIdx.z, M, N, row, col, v0, v1);
        } else {
          const size_t o = static_cast<size_t>(row) * N + col;
          *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + o * 2) = pack2<DT>(v0 + bv.x, v1 + bv.y);
        }
      });
#if QK_INRED
  // ---- split-k in the kernel: the last CTA of this (n, m) tile sums every split's partial in split order
  if (!split) return;
  constexpr int RT = 32 * WARPS_M * WARPS_N;  // the wk == 0 threads (tid < RT), still running here
  const int tile_id = blockIdx.y * gridDim.x + blockIdx.x;
  if (!splitk_last_cta<RT>(counters, tile_id, tid)) return;
  const int nz = gridDim.z;
  const size_t mn = static_cast<size_t>(M) * N;
  for_each_out_pair<MT, NB, 8, 64>(
      nblk, nvalid, row0, M, lane, [&](int col) { return bias_of(true, col); },
      [&](float2 bv, int row, int col, int, int, int, int) {
        const size_t o = static_cast<size_t>(row) * N + col;
        const float2 v = sum_splits2(ws, o, mn, nz);
        *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + o * 2) = pack2<DT>(v.x + bv.x, v.y + bv.y);
      });
  splitk_done(counters, tile_id, tid);
#endif
}
