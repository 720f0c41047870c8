// QUICK on Hopper, W4A8: wgmma s8 with the interleaved signed-int4 weight as the REGISTER A operand.
//
// y[M, N] = s_x[m] * s_ch[n] * sum_k x_q[m, k] * q[n, k] (* s_g[k / 128, n]) (+ bias[n]), number format in
// quick/formats/w4a8.py. Transposed product out^T[N, M] = Q[N, K] x X_q^T[K, M]: output channels on wgmma's
// M = 64 side (one consumer warpgroup = 64 channels), tokens on wgmma's N side (QW_NT = 8..256 per tile).
//
//  * Weights (layout 'w4a8_sm90', quick/formats/layouts.py): per k128 row-block and n16 block, lane l of a warp
//    reads 32 contiguous bytes (two LDG.128; 1 KB per warp); words 2j and 2j+1 are the A fragment of k32 step j
//    (wgmma m64nNk32 .s8: register r holds row lane/4 + 8(r%2), k 4(lane%4) + 16(r/2) + byte). Nibbles are
//    two's complement; byte e of a word holds nibbles 2e (low) and 2e+1 (high). In registers:
//    (w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0 are four int8 values 16*q each (a register of rows lane/4 and
//    lane/4 + 8): two logic ops per register, no lookup. The int32 sums are 16x the exact integer sums
//    (|16 q| <= 128 fits int8; 16 * 127 * 128 * K < 2^31 for K <= 65536); the factor goes in the epilogue (an
//    exact power of two) or, per group, as an exact arithmetic shift of each group's partial.
//  * Activations x_q[M, K] (int8 row-major = wgmma B in K-major, the only major for 8-bit) by TMA, boxes of
//    128 k x QW_NT tokens with 128-byte swizzle (rows past M zero-filled) into QW_STAGES stages; one producer
//    thread, mbarriers full/empty. The smem descriptor is the same K-major SW128 one as for 16-bit data (the
//    layout is defined in bytes): +32 B per k32 step.
//  * Per group (G = 128 = one k128 stage): each stage's four wgmmas accumulate into a partial P (scale-d = 0 on
//    the first: no zeroing), which is folded exactly after the stage's wait, T += s_g * (P >> 4).
//  * Persistent grid over (channel tile, token tile, k split) units; split-k partials are int32 (exact), summed
//    by the last CTA to arrive on a tile in split order (deterministic either way), counters reset by it.
//  * Epilogue: float(T) * s_x[token] * s_ch[channel] (/16 per-channel) (+ bias) -> 16-bit, staged transposed in
//    shared memory, 16-byte coalesced stores of out[M, N], tokens >= M masked.
//
// Activations are quantized by quick_actquant.cu (shared with the sm_80 W4A8 kernel).
//
// Compile-time variant (-D): QW_NT, QW_NWG (consumer warpgroups: 1, 2 or 4), QW_STAGES, QW_PREF (ring depth in
// k128 steps; per load group for QW_PIPE 1/2), QW_GROUP (0 per-channel, 1 group size 128), QW_BF16 (output / x
// dtype), QW_PIPE (weight pipeline: 0 ring, 1 ping-pong groups, 2 the same with ld.relaxed.gpu loads, 3 bulk
// copies into the shared-memory stages next to x), QW_ORDER (two consumer warpgroups issue their wgmmas in turn),
// QW_Q1 (per group: int8 weights q instead of 16 q, no shift in the fold), QW_WIDEN (per group with every group
// scale <= 16: the weights are widened to the int8 q * s_g in registers and all groups share one int32
// accumulator, QQQ's design: no per-group partials, no fold, no wgmma drain per k128 step).

#include <cstdint>

#include "quick_wgmma_pipeline.cuh"

#pragma nv_diag_suppress 177  // the helpers a variant does not use

#ifndef QW_NT
#define QW_NT 64
#endif
#ifndef QW_NWG
#define QW_NWG 2
#endif
#ifndef QW_STAGES
#define QW_STAGES 6
#endif
#ifndef QW_PREF
#define QW_PREF 4
#endif
#ifndef QW_GROUP
#define QW_GROUP 0
#endif
#ifndef QW_BF16
#define QW_BF16 0
#endif
#ifndef QW_PIPE
#define QW_PIPE 0
#endif
#ifndef QW_ORDER
#define QW_ORDER 0
#endif
#ifndef QW_Q1
#define QW_Q1 0
#endif
#ifndef QW_WIDEN
#define QW_WIDEN 0
#endif
#if QW_PIPE == 2
// ld.relaxed.gpu: ptxas keeps these loads in program order (at the group boundary); with .nc it sinks them
// towards their first use (docs/kernels.md).
#define QW_LDW "ld.relaxed.gpu.global.v4.u32"
#define QW_LD16 "ld.relaxed.gpu.global.u16"
#else
#define QW_LDW "ld.global.nc.L1::no_allocate.v4.u32"
#define QW_LD16 "ld.global.nc.u16"
#endif

namespace {

constexpr int NT = QW_NT;
constexpr int NWG = QW_NWG;
constexpr int STAGES = QW_STAGES;
constexpr int PREF = QW_PREF;
constexpr bool GROUP = QW_GROUP != 0;
constexpr bool BF16 = QW_BF16 != 0;
constexpr int THREADS = 128 * (NWG + 1);
constexpr int UNR = (PREF % 2 == 0) ? PREF : 2 * PREF;  // ring slot and buffer parity are compile-time constants
constexpr int STAGE_BYTES = NT * 128;                   // NT token rows x 128 k x 1 byte
constexpr int EPI_STRIDE = 72;                          // staged row: 64 channels + 8 pad (16-bit units)
constexpr int EPI_BYTES = NT * EPI_STRIDE * 2;
constexpr int ACC = NT / 2;  // int32 accumulators per thread (64 x NT / 128)
// setmaxnreg moves registers inside the CTA's pool: .inc blocks until .dec has released enough. With two consumer
// warpgroups ptxas allocates 168 per thread (65536 / 384): 128 * (168 - 40) = 256 * (232 - 168), balanced. With
// four (96 per thread at launch) 40/112 would need more than the producer releases and .inc would wait forever:
// no reallocation there (the code fits the launch allocation). tests/test_w4a8_sm90_packing.py checks both.
constexpr bool SETMAXNREG = NWG == 2;
constexpr int PRODUCER_REGS = 40;
constexpr int CONSUMER_REGS = 232;
// QW_ORDER (two consumer warpgroups): they issue their wgmmas in turn (named barriers 8 and 9, as CUTLASS's
// ping-pong schedule), so one warpgroup's fold / conversion overlaps the other's tensor-core work instead of
// both waiting on the same stage and then folding in lockstep.
constexpr bool ORDER = QW_ORDER != 0 && NWG == 2;
constexpr bool WIDEN = QW_WIDEN != 0 && GROUP;
constexpr bool FOLD = GROUP && !WIDEN;  // per-group partial sums folded after every k128 step
constexpr bool Q1 = QW_Q1 != 0 && FOLD;
// QW_PIPE 3: the producer also bulk-copies each stage's weights (the CTA's n16 x k128 blocks are one contiguous
// NWG * 4 KB range of a k128 row, already in fragment order) and group scales into shared memory.
constexpr bool SMEM_W = QW_PIPE == 3;
constexpr int W_BYTES = NWG * 4096;
constexpr int G_BYTES = GROUP ? NWG * 64 : 0;
constexpr int WSTAGE_BYTES = SMEM_W ? W_BYTES + G_BYTES : 0;
using Smem = WgmmaSmem<STAGES, STAGE_BYTES, WSTAGE_BYTES, NWG, EPI_BYTES>;
constexpr int SMEM_BYTES = Smem::BYTES;

static_assert(NT == 8 || NT == 16 || NT == 32 || NT == 64 || NT == 128 || NT == 256, "instantiated N");
static_assert(NWG == 1 || NWG == 2 || NWG == 4, "1, 2 or 4 consumer warpgroups");
static_assert(STAGES >= 2 && PREF >= 1, "pipeline depths");
static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");

// ------------------------------------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ void lds128(uint32_t* r, uint32_t addr) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr) : "memory");
  return v;
}

// 16-byte weight load (read-only path, not allocated in L1), predicated off past the end of the k range.
// "+r": a predicated-off load leaves the register as it was.
__device__ __forceinline__ void ldg_w(uint32_t* r, const void* p, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\n"
      "@p " QW_LDW " {%0, %1, %2, %3}, [%4];\n}\n"
      : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])
      : "l"(p), "r"(static_cast<int>(pred)));
}

// 2-byte load (the two int8 group scales of a lane's rows), zero-extended; predicated like ldg_w.
__device__ __forceinline__ void ldg_u16(uint32_t& r, const void* p, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .u16 t;\nsetp.ne.b32 p, %2, 0;\n"
      "@p " QW_LD16 " t, [%1];\n"
      "@p cvt.u32.u16 %0, t;\n}\n"
      : "+r"(r)
      : "l"(p), "r"(static_cast<int>(pred)));
}

// Two raw words (one k32 step) -> the four A registers of that step: int8 lanes 16*q, rows lane/4 (r even) and
// lane/4 + 8 (r odd), see the header.
__device__ __forceinline__ void convert_step(uint32_t w0, uint32_t w1, uint32_t (&a)[4]) {
  if constexpr (Q1) {
    // int8 q itself: per byte, u = c ^ 8 = q + 8 in [0, 15]; u + 0x78 = q + 128 < 256 (no carry between bytes);
    // ^ 0x80 gives q in two's complement.
    a[0] = (((w0 & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
    a[1] = ((((w0 >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
    a[2] = (((w1 & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
    a[3] = ((((w1 >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
  } else {
    a[0] = (w0 << 4) & 0xF0F0F0F0u;
    a[1] = w0 & 0xF0F0F0F0u;
    a[2] = (w1 << 4) & 0xF0F0F0F0u;
    a[3] = w1 & 0xF0F0F0F0u;
  }
}

// QW_WIDEN: two raw words -> the four A registers as int8 q * s_g (s_g <= 16; s0 for rows lane/4, s1 for
// lane/4 + 8). Per byte u = q + 8 = c ^ 8 in [0, 15]; u * s + (128 - 8 s) = q * s + 128 in [0, 240]: one IMAD
// on the packed word with no carry between bytes; ^ 0x80 gives q * s in two's complement.
__device__ __forceinline__ uint32_t widen_bytes(uint32_t u, uint32_t s, uint32_t c) {
  return (u * s + c) ^ 0x80808080u;
}

__device__ __forceinline__ void convert_step_widen(uint32_t w0, uint32_t w1, uint32_t (&a)[4], uint32_t s0,
                                                   uint32_t c0, uint32_t s1, uint32_t c1) {
  const uint32_t u0 = w0 ^ 0x88888888u, u1 = w1 ^ 0x88888888u;
  a[0] = widen_bytes(u0 & 0x0F0F0F0Fu, s0, c0);
  a[1] = widen_bytes((u0 >> 4) & 0x0F0F0F0Fu, s1, c1);
  a[2] = widen_bytes(u1 & 0x0F0F0F0Fu, s0, c0);
  a[3] = widen_bytes((u1 >> 4) & 0x0F0F0F0Fu, s1, c1);
}

// D (int32) += A (int8, registers) x B (the x_q tile in shared memory), k32 per wgmma.
QH_DEFINE_WGMMA_RS(wgmma_s8, int32_t, "+r", "k32.s32.s8.s8", "")

}  // namespace

// ------------------------------------------------------------------------------------------------ GEMM kernel

// qweight: int32 [K/128, 16N] (layout w4a8_sm90); s_ch: fp32 [N] (natural order); s_g: int8 [K/128, N], columns
// permuted in blocks of 16 (one 2-byte load = rows lane/4 and lane/4 + 8), null per-channel; s_x: fp32 [M];
// bias: [N] 16-bit or null; out: [M, N] 16-bit; ws: int32 split-k workspace; counters: int32, zero between
// launches. Work units = n_tiles * m_tiles * splits; a split covers steps_per_split k128 steps (all non-empty).
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    quick_w4a8_sm90_gemm(const __grid_constant__ TmaDesc tmap_x, const uint4* __restrict__ qweight,
                         const float* __restrict__ s_ch, const int8_t* __restrict__ s_g,
                         const float* __restrict__ s_x, const uint16_t* __restrict__ bias,
                         uint16_t* __restrict__ out, int32_t* __restrict__ ws, int* __restrict__ counters, int M,
                         int N, int K, int splits, int steps_per_split, int n_tiles, int m_tiles) {
  extern __shared__ uint8_t smem_raw[];
  const Smem sm(smem_raw);
  const uint32_t s_xt = sm.x, s_w = sm.w, s_full = sm.full, s_empty = sm.empty;  // s_w: QW_PIPE 3 weight stages

  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32;
  const int lane = tid % 32;
  sm.init_barriers();

  const int nk = K / 128;
  const int units = n_tiles * m_tiles * splits;

  if (wg == 0) {
    // ------------------------------------------------------------------ producer: TMA for x_q
    if constexpr (SETMAXNREG) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (tid == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_x)) : "memory");
      int stage = 0;
      uint32_t phase = 0;
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int split = u % splits;
        const int tile = u / splits;
        const int tm = tile / n_tiles;
        const int s0 = split * steps_per_split;
        const int nsteps = min(nk - s0, steps_per_split);
        const int tn = tile % n_tiles;
        const int valid = min(NWG, N / 64 - tn * NWG);  // channel blocks of this tile that exist
        const uint32_t wbytes = SMEM_W ? valid * 4096 : 0, gbytes = SMEM_W && GROUP ? valid * 64 : 0;
        for (int s = 0; s < nsteps; ++s) {
          mbar_wait(s_empty + 8 * stage, phase ^ 1);
          mbar_expect_tx(s_full + 8 * stage, STAGE_BYTES + wbytes + gbytes);
          tma_load_2d(s_xt + stage * STAGE_BYTES, &tmap_x, (s0 + s) * 128, tm * NT, s_full + 8 * stage);
          if constexpr (SMEM_W) {
            const size_t row = static_cast<size_t>(s0 + s);
            bulk_g2s(s_w + stage * WSTAGE_BYTES,
                      reinterpret_cast<const uint8_t*>(qweight) + row * 64 * N + static_cast<size_t>(tn) * W_BYTES,
                      wbytes, s_full + 8 * stage);
            if constexpr (GROUP) {
              bulk_g2s(s_w + stage * WSTAGE_BYTES + W_BYTES, s_g + row * N + static_cast<size_t>(tn) * NWG * 64,
                        gbytes, s_full + 8 * stage);
            }
          }
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumers: weights + wgmma
  if constexpr (SETMAXNREG) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  if (ORDER && wg == 2) named_bar_arrive(8, 256);  // warpgroup 1 issues first
  const int cw = wg - 1;
  const int n64 = N / 64;
  uint16_t* const epi = reinterpret_cast<uint16_t*>(sm.gbase + sm.epi_off + cw * EPI_BYTES);

  int32_t acc[ACC];
  // Per group: the partial sum of the current stage (= group) and the group scales of the two A buffers.
  int32_t part[FOLD ? ACC : 1];
#pragma unroll
  for (int i = 0; i < (FOLD ? ACC : 1); ++i) part[i] = 0;
  int32_t sgk[2][2] = {};
  uint32_t a_frag[2][4][4];

  int stage = 0;
  uint32_t phase = 0;

  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const WorkUnit wu(u, splits, n_tiles, steps_per_split, nk);
    const int split = wu.split, tile = wu.tile, tm = wu.tm, s0 = wu.s0, nsteps = wu.nsteps;
    const int blk = wu.tn * NWG + cw;

    if (blk >= n64) {  // past the last channel block (N not a multiple of 64 * NWG): keep the pipeline going
      for (int s = 0; s < nsteps; ++s) {
        mbar_wait(s_full + 8 * stage, phase);
        if constexpr (ORDER) {  // take and pass the turn like a computing warpgroup
          named_bar(8 + cw, 256);
          named_bar_arrive(8 + (cw ^ 1), 256);
        }
        release_stage(s_empty + 8 * stage, lane);
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
      continue;
    }
    const int nb = blk * 64;

    // Weight stream of this warp: n16 block (nb/16 + warp), lane's 32 bytes; one k128 row = 4N uint4.
    const uint4* qbase = qweight + static_cast<size_t>(s0) * (4 * N) + (nb / 16 + warp) * 64 + 2 * lane;
    const int8_t* sgbase = GROUP ? s_g + nb + 16 * warp + 2 * (lane / 4) : nullptr;

    auto load_one = [&](uint32_t(&r)[8], uint32_t& rs, const int step, const bool enable, const uint32_t dep) {
      const bool p = enable && step < nsteps;
      const uint4* src = qbase + static_cast<size_t>(step) * (4 * N) + dep;
      ldg_w(r, src, p);
      ldg_w(r + 4, src + 1, p);
      if constexpr (GROUP) ldg_u16(rs, sgbase + static_cast<size_t>(s0 + step) * N + dep, p);
    };
    auto convert = [&](const uint32_t(&r)[8], const uint32_t rs, uint32_t(&a)[4][4], int32_t(&sg)[2]) {
      if constexpr (GROUP) {
        sg[0] = static_cast<int8_t>(rs & 0xFFu);
        sg[1] = static_cast<int8_t>((rs >> 8) & 0xFFu);
      }
      const uint32_t s0 = static_cast<uint32_t>(sg[0]), s1 = static_cast<uint32_t>(sg[1]);
      const uint32_t c0 = (128u - 8u * s0) * 0x01010101u, c1 = (128u - 8u * s1) * 0x01010101u;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (WIDEN) {
          convert_step_widen(r[2 * j], r[2 * j + 1], a[j], s0, c0, s1, c1);
        } else {
          convert_step(r[2 * j], r[2 * j + 1], a[j]);
        }
        // Materialize here: NVVM would otherwise sink the masks past the next wgmma.fence (C7519).
#pragma unroll
        for (int i = 0; i < 4; ++i) fence_reg(a[j][i]);
      }
    };
    // Fold one finished partial set: T += s_g * (P >> 4) (P is 16x an exact integer: the shift is exact), or
    // T += s_g * P with QW_Q1 (weights converted to q, not 16 q: four more logic ops per register, one less per
    // accumulator, which is what the fold is made of).
    auto fold = [&](int32_t(&pp)[FOLD ? ACC : 1], const int32_t(&sg)[2]) {
      if constexpr (FOLD) {
#pragma unroll
        for (int i = 0; i < ACC; ++i) {
          fence_reg(pp[i]);
          acc[i] += sg[(i >> 1) & 1] * (Q1 ? pp[i] : pp[i] >> 4);
        }
      }
    };
    int prev_stage = 0;
    // The four wgmmas of one k128 stage on A buffer `buf`, then the wait that frees the other A buffer (and,
    // per group, the fold of this stage's partial), and the release of the previous stage.
    auto mma_stage = [&](const int buf, const int s) {
      mbar_wait(s_full + 8 * stage, phase);
      const uint64_t desc = make_desc(s_xt + stage * STAGE_BYTES);
      if constexpr (ORDER) named_bar(8 + cw, 256);  // my turn
      wgmma_fence();
      if constexpr (FOLD) {
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_s8<NT>(part, a_frag[buf][j], desc + 2 * j, j > 0);
        wgmma_commit();
        if constexpr (ORDER) named_bar_arrive(8 + (cw ^ 1), 256);  // the other warpgroup's turn
        // ptxas serializes every wgmma (C7514) if any accumulator is read while a wgmma is in flight, even one
        // of another register set: the group's partial is folded after a full wait (the other consumer
        // warpgroups keep the tensor cores busy meanwhile).
        wgmma_wait<0>();
        fold(part, sgk[buf]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_s8<NT>(acc, a_frag[buf][j], desc + 2 * j, 1);  // +32 B per k32
        wgmma_commit();
        if constexpr (ORDER) named_bar_arrive(8 + (cw ^ 1), 256);
        wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and A registers are free
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) fence_reg(a_frag[buf ^ 1][j][i]);
      if (s > 0) release_stage(s_empty + 8 * prev_stage, lane);
    };
    auto next_stage = [&]() {
      prev_stage = stage;
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      phase ^= stage == 0 ? 1u : 0u;
    };
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0;

#if QW_PIPE == 3
    // Weights from the shared-memory stage that also holds x: two LDS.128 per lane (1 KB contiguous per warp, no
    // bank conflicts), converted while the previous stage's wgmmas run.
    const uint32_t w_lane = s_w + cw * 4096 + warp * 1024 + lane * 32;
    const uint32_t g_lane = s_w + W_BYTES + cw * 64 + 16 * warp + 2 * (lane / 4);
    for (int sb = 0; sb < nsteps; sb += 2) {
#pragma unroll
      for (int uu = 0; uu < 2; ++uu) {
        const int s = sb + uu;
        if (s < nsteps) {
          mbar_wait(s_full + 8 * stage, phase);
          uint32_t r[8];
          lds128(r, w_lane + stage * WSTAGE_BYTES);
          lds128(r + 4, w_lane + stage * WSTAGE_BYTES + 16);
          const uint32_t rs = GROUP ? lds_u16(g_lane + stage * WSTAGE_BYTES) : 0u;
          convert(r, rs, a_frag[uu], sgk[uu]);
          mma_stage(uu, s);
          next_stage();
        }
      }
    }
#elif QW_PIPE == 0
    // Ring of PREF k128 steps: the loads for step s + PREF are issued as step s + 1 is converted. ptxas tracks
    // all of them on one scoreboard, so converting a step waits for every load in flight (latency-bound at
    // decode sizes; see docs/kernels.md).
    uint32_t ring[PREF][8], ring_s[PREF];
#pragma unroll
    for (int p = 0; p < PREF; ++p) {
#pragma unroll
      for (int i = 0; i < 8; ++i) ring[p][i] = 0;
      ring_s[p] = 0;
    }
#pragma unroll
    for (int p = 0; p < PREF; ++p) load_one(ring[p], ring_s[p], p, true, 0u);
    convert(ring[0], ring_s[0], a_frag[0], sgk[0]);
    load_one(ring[0], ring_s[0], PREF, true, 0u);
    int ld_next = PREF + 1;
    for (int sb = 0; sb < nsteps; sb += UNR) {
#pragma unroll
      for (int uu = 0; uu < UNR; ++uu) {
        const int s = sb + uu;
        if (s < nsteps) {
          mma_stage(uu & 1, s);
          if (s + 1 < nsteps) {
            const int slot = (uu + 1) % PREF;
            convert(ring[slot], ring_s[slot], a_frag[(uu + 1) & 1], sgk[(uu + 1) & 1]);
            load_one(ring[slot], ring_s[slot], ld_next, true, 0u);
            ++ld_next;
          }
          next_stage();
        }
      }
    }
#else
    // Ping-pong groups of PREF k128 steps (the sm90 W4A16 kernel's pipeline 1/2): two register sets, one consumed
    // while the other is in flight, one scoreboard wait per group at its boundary (a fold of all its registers
    // in volatile asm); the next group's addresses depend on that fold times a run-time zero so no load is
    // hoisted above it, and no load is in flight across the loop's back edge.
    uint32_t grp[2][PREF][8] = {}, grp_s[2][PREF] = {};
    uint32_t dep = 0;
    const uint32_t rt_zero = static_cast<uint32_t>(M) >> 31;  // 0 for any valid M, unknown to the compilers
    auto load_group = [&](const int set, const int g, const bool enable) {
#pragma unroll
      for (int j = 0; j < PREF; ++j) load_one(grp[set][j], grp_s[set][j], g * PREF + j, enable, dep);
    };
    auto wait_group = [&](const int set) {
      uint32_t t = 0;
#pragma unroll
      for (int j = 0; j < PREF; ++j) {
#pragma unroll
        for (int i = 0; i < 8; ++i) xor_acc(t, grp[set][j][i]);
        if constexpr (GROUP) xor_acc(t, grp_s[set][j]);
      }
      dep = t & rt_zero;
    };
    load_group(0, 0, true);
    load_group(1, 1, true);
    wait_group(0);
    convert(grp[0][0], grp_s[0][0], a_frag[0], sgk[0]);
    int it = 0;  // 2*PREF-step iteration: set 0 holds group 2*it, set 1 group 2*it + 1
    auto step = [&](const int uu, const int s, const bool has_next) {
      mma_stage(uu & 1, s);
      if (has_next) {
        const int nx = uu + 1;
        const int set = (nx / PREF) % 2;
        const int j = nx % PREF;
        if (nx == PREF) {
          wait_group(1);
          load_group(0, 2 * it + 2, true);
        } else if (nx == 2 * PREF) {
          wait_group(0);
        }
        convert(grp[set][j], grp_s[set][j], a_frag[nx & 1], sgk[nx & 1]);
      }
      next_stage();
    };
    const int n_main = nsteps - 1;
    int sb = 0;
    for (; sb + 2 * PREF <= n_main; sb += 2 * PREF, ++it) {
      load_group(1, 2 * it + 1, it > 0);  // iteration 0: loaded by the prologue
#pragma unroll
      for (int uu = 0; uu < 2 * PREF; ++uu) step(uu, sb + uu, true);
    }
    load_group(1, 2 * it + 1, it > 0);
#pragma unroll
    for (int uu = 0; uu < 2 * PREF; ++uu) {  // tail: < 2*PREF steps with a successor, then the last step
      if (sb + uu < n_main) {
        step(uu, sb + uu, true);
      } else if (sb + uu == n_main) {
        step(uu, sb + uu, false);
      }
    }
#endif
    wgmma_drain(acc, a_frag);
    release_stage(s_empty + 8 * prev_stage, lane);

    // ------------------------------------------------------------------ split-k: exact int32 reduction
    if (splits > 1 &&
        !splitk_reduce<NT, NWG, ACC, int32_t, int4>(acc, ws, counters, sm.flag, tile, split, splits, cw, tid))
      continue;

    // ------------------------------------------------------------------ epilogue
    // D fragment: acc[4j + 2v1 + v0] = out^T[channel 16*warp + lane/4 + 8*v1][token 8j + 2*(lane%4) + v0].
    const int ch0 = 16 * warp + lane / 4;
    const float unit = GROUP ? 1.f : 0.0625f;  // per-channel sums carry the 16 of the int8 weights
    const float c0 = s_ch[nb + ch0] * unit, c1 = s_ch[nb + ch0 + 8] * unit;
    float b0, b1;
    bias_pair<BF16>(bias, nb, ch0, b0, b1);
    const int row0 = tm * NT;
#pragma unroll
    for (int i = 0; i < ACC; ++i) {
      const int j = i / 4, v1 = (i / 2) & 1, v0 = i & 1;
      const int t = 8 * j + 2 * (lane % 4) + v0;
      const float sx = row0 + t < M ? __ldg(s_x + row0 + t) : 0.f;
      epi[t * EPI_STRIDE + ch0 + 8 * v1] = f_to_h16<BF16>(static_cast<float>(acc[i]) * (sx * (v1 ? c1 : c0)) + (v1 ? b1 : b0));
    }
    store_staged<NT, EPI_STRIDE>(out, epi, tm, M, N, nb, tid, 1 + cw);
  }
  if (ORDER && wg == 1) named_bar(8, 256);  // the last turn passed by warpgroup 2
}
