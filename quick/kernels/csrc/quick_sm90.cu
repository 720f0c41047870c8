// QUICK on Hopper: W4A16 GEMM with wgmma, the interleaved 4-bit weight as the REGISTER A operand.
//
// Transposed product: out^T[N, M] = W^T[N, K] x X^T[K, M]. Output channels sit on wgmma's M = 64 side
// (one consumer warpgroup = 64 channels), tokens on wgmma's N side (QS_NT = 8..256 per tile).
//
//  * Weights (layout 'quick_sm90', quick/formats/layouts.py): for each k64 row-block and n16 block, the 32
//    lanes of one warp read 16 contiguous bytes each (LDG.128, 512 B per warp, 2 KB per warpgroup); word w of
//    a lane is the wgmma A fragment of k16 step w. They go global -> registers, are dequantized in registers
//    ((q + magic) - (magic + zero)) * scale, and feed wgmma directly: no shared-memory round trip. Raw words
//    are loaded in groups of QS_PREF k64 steps: while one group is consumed the next is in flight, and the
//    wait for it happens once per group at the boundary (ptxas tracks loads with only six scoreboards; a
//    per-step ring made every step wait for all loads in flight). Dequantized fragments are double-buffered
//    (a wgmma reads its A registers asynchronously, so they stay untouched until wait_group says it is done).
//  * Activations X[M, K] (row-major, = wgmma B in K-major) arrive by TMA (cp.async.bulk.tensor, 128-byte
//    swizzle, out-of-bounds token rows zero-filled) into QS_STAGES shared-memory stages, one producer thread
//    (warpgroup 0) and mbarriers full/empty.
//  * Persistent grid: CTA b processes work units b, b + gridDim.x, ...; a unit = (channel tile, token tile,
//    k split). Split-k partials go to an fp32 workspace in the accumulator's own fragment order (coalesced
//    16-byte stores); the last CTA to arrive on a tile (atomic counter) sums the partials in split order
//    0..S-1, so the result does not depend on arrival order (deterministic), and resets the counter.
//  * Epilogue: accumulators (+ bias) -> 16-bit, staged transposed in shared memory, then 16-byte coalesced
//    stores of out[M, N] rows, masking tokens >= M.
//
// Compile-time variant (one cubin each, -D): QS_NT, QS_NWG (consumer warpgroups: 1, 2 or 4), QS_STAGES,
// QS_PREF (weight group / ring depth in k64 steps), QS_G32 (group size 32: two groups per k64 step), QS_BF16,
// QS_PIPE (1: ping-pong load groups, 0: per-step ring), QS_LDREL (weights through ld.relaxed.gpu),
// QS_L2PF (D > 0: the producer thread asks L2 for the weights of k64 step s + D of the unit as it issues the TMA of
// step s: cp.async.bulk.prefetch.L2, NWG x 2 KB contiguous per step; bytes in flight that hold no registers),
// QS_WTMA (1: the weights, scales and zeros of a k64 step travel with its x tile: the producer adds three
// cp.async.bulk copies (NWG x 2 KB of weights, NWG x 128 B of scales and of zeros, all contiguous) on the stage's
// full barrier, and consumers read their 16 bytes from shared memory; QS_STAGES steps in flight per CTA, waited for
// by the mbarrier instead of register scoreboards. Group sizes >= 64 only), QS_EF (1: every weight access carries
// an L2::evict_first policy: weights are read once, and L2 replaces these clean lines before other data or dirty
// lines waiting for write-back), QS_GROUPED (1: the experts of a mixture-of-experts block, below).
//
// QS_GROUPED: qweight / scales / zeros are stacks of E experts' tensors ([E, K/64, 8N], [E, K/G, N]) and the token
// tiles are the blocks of a sorted-token plan (quick/nn/moe.py: build_plan; block size = QS_NT, one expert per block).
// x holds the plan's rows in plan order (row r of block b at b * NT + r, gathered by the launcher or written so by the
// previous product), so TMA loads it as usual. A unit whose block lies past num_padded[0] or has no expert is skipped
// by the producer and the consumers alike (same test, same memory); the others read their expert's weights. Output:
// with sorted_ids null, plan row r goes to out row r (every row of the tile: an intermediate in plan order); else
// to out row sorted_ids[r], times topk_w[slot] in fp32 when topk_w is given, and padding rows (ids >= num_slots) are
// dropped. No bias; the weight pipeline is the register one (no QS_WTMA, no QS_L2PF).

#include <cstdint>

#include "quick_common.cuh"
#include "quick_wgmma_pipeline.cuh"

#pragma nv_diag_suppress 177  // the wgmma_rs specializations a variant does not use

#ifndef QS_NT
#define QS_NT 64
#endif
#ifndef QS_NWG
#define QS_NWG 2
#endif
#ifndef QS_STAGES
#define QS_STAGES 6
#endif
#ifndef QS_PREF
#define QS_PREF 4
#endif
#ifndef QS_G32
#define QS_G32 0
#endif
#ifndef QS_BF16
#define QS_BF16 0
#endif
#ifndef QS_PIPE
#define QS_PIPE 1
#endif
#ifndef QS_LDREL
#define QS_LDREL 0
#endif
#ifndef QS_L2PF
#define QS_L2PF 0
#endif
#ifndef QS_WTMA
#define QS_WTMA 0
#endif
#ifndef QS_EF
#define QS_EF 0
#endif
#ifndef QS_GROUPED
#define QS_GROUPED 0
#endif
#if QS_LDREL
// ld.relaxed.gpu: ptxas keeps these strong loads in program order with the mbarrier operations, so a group's
// loads are issued at its boundary (with .nc it sinks them towards their first use, trusting a cache-hit
// latency); the hardware may order them with the per-step mbarrier arrive, though (measured, not assumed).
#define QS_LDW_BASE "ld.relaxed.gpu.global"
#define QS_LD32 "ld.relaxed.gpu.global.u32"
#else
#define QS_LDW_BASE "ld.global.nc.L1::no_allocate"
#define QS_LD32 "ld.global.nc.u32"
#endif

#if QS_EF
#define QS_LDW QS_LDW_BASE ".L2::cache_hint.v4.u32"
#define QS_LDW_POL ", %6"
#define QS_LDW_POL2 ", %2"
#define QS_HINT ".L2::cache_hint"
#else
#define QS_LDW QS_LDW_BASE ".v4.u32"
#define QS_LDW_POL ""
#define QS_LDW_POL2 ""
#define QS_HINT ""
#endif

#if QS_BF16
#define QS_WG_T "bf16"
#define QS_X2 "bf16x2"
#else
#define QS_WG_T "f16"
#define QS_X2 "f16x2"
#endif

namespace {

constexpr int NT = QS_NT;
constexpr int NWG = QS_NWG;
constexpr int STAGES = QS_STAGES;
constexpr int PREF = QS_PREF;
constexpr bool G32 = QS_G32 != 0;
constexpr bool BF16 = QS_BF16 != 0;
constexpr bool GROUPED = QS_GROUPED != 0;
static_assert(!GROUPED || (!QS_WTMA && QS_L2PF == 0), "QS_GROUPED: the register weight pipeline");
constexpr int THREADS = 128 * (NWG + 1);
constexpr int GRP = PREF;  // QS_PIPE 1: k64 steps per weight load group (one scoreboard wait per group)
constexpr int UNR = (PREF % 2 == 0) ? PREF : 2 * PREF;  // QS_PIPE 0: ring slot and A buffer are constants
constexpr int STAGE_BYTES = NT * 128;                   // NT token rows x 64 k x 2 bytes
constexpr int EPI_STRIDE = 72;                          // staged row: 64 channels + 8 pad (16-bit units)
constexpr int EPI_BYTES = NT * EPI_STRIDE * 2;
constexpr int ACC = NT / 2;                             // f32 accumulators per thread (64 x NT / 128)
constexpr int SW = G32 ? 2 : 1;                         // scale groups per k64 step
constexpr uint32_t MAGIC = BF16 ? 0x43004300u : 0x64006400u;  // bf16 128.0 / fp16 1024.0, both halves
constexpr int PRODUCER_REGS = 40;
// setmaxnreg.inc waits until the CTA's pool has the registers: launch bounds give (65536 / THREADS) rounded down to 8
// per thread (168 for 384 threads, 96 for 640), the producer warpgroup returns its surplus, and the consumers may
// take no more than that: 128 x 40 + 256 x 232 = 384 x 168; 128 x 40 + 512 x 104 <= 640 x 96 (112 deadlocked the
// 4-warpgroup variants).
constexpr int ENTRY_REGS = (65536 / THREADS) / 8 * 8;
constexpr int CONSUMER_REGS = ((ENTRY_REGS * THREADS - PRODUCER_REGS * 128) / (128 * NWG)) / 8 * 8 > 232
                                  ? 232
                                  : ((ENTRY_REGS * THREADS - PRODUCER_REGS * 128) / (128 * NWG)) / 8 * 8;
static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 128 * NWG <= ENTRY_REGS * THREADS, "register pool");
constexpr int WST_BYTES = QS_WTMA ? NWG * (2048 + 2 * 128) : 0;  // per stage: weights, scales, zeros
using Smem = WgmmaSmem<STAGES, STAGE_BYTES, WST_BYTES, NWG, EPI_BYTES>;
constexpr int SMEM_BYTES = Smem::BYTES;
static_assert(!(QS_WTMA && G32), "QS_WTMA: group sizes >= 64");

static_assert(NT % 8 == 0 && NT >= 8 && NT <= 256, "wgmma N must be 8..256 in steps of 8");
static_assert(NT == 8 || NT == 16 || NT == 32 || NT == 64 || NT == 128 || NT == 256, "instantiated N");
static_assert(NWG == 1 || NWG == 2 || NWG == 4, "1, 2 or 4 consumer warpgroups");
static_assert(STAGES >= 2 && PREF >= 1, "pipeline depths");
static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");

// ------------------------------------------------------------------------------------------------ PTX helpers

// The same with an L2 cache policy (QS_EF: the weights, read once).
__device__ __forceinline__ void bulk_g2s_w(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t pol) {
#if QS_EF
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(pol)
      : "memory");
#else
  (void)pol;
  bulk_g2s(dst, src, bytes, bar);
#endif
}

__device__ __forceinline__ uint64_t weight_policy() {
  uint64_t pol = 0;
#if QS_EF
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
#endif
  return pol;
}

// 16-byte weight load (read-only path, not allocated in L1), predicated off past the end of the k range.
// "+r": a predicated-off load leaves the register as it was (with "=r" the compiler may hand the asm a
// different register, and the old value would be lost).
__device__ __forceinline__ void ldg_w(uint32_t (&r)[4], const void* p, bool pred, uint64_t pol) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\n"
      "@p " QS_LDW " {%0, %1, %2, %3}, [%4]" QS_LDW_POL ";\n}\n"
      : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])
      : "l"(p), "r"(static_cast<int>(pred)), "l"(pol));
}

__device__ __forceinline__ void ldg_u32(uint32_t& r, const void* p, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n"
      "@p " QS_LD32 " %0, [%1];\n}\n"
      : "+r"(r)
      : "l"(p), "r"(static_cast<int>(pred)));
}

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {  // (a & b) | c
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t h2_sub(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn." QS_X2 " %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t h2_add(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("add.rn." QS_X2 " %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t h2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn." QS_X2 " %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Per-group constants, each broadcast to both halves of a 16-bit pair: a-register r holds fragment row
// lane/4 + 8*(r%2), so r even uses the low half of the loaded (row, row+8) pair and r odd the high half.
struct GroupConst {
  uint32_t s_lo, s_hi, zm_lo, zm_hi;
};

__device__ __forceinline__ GroupConst group_const(uint32_t s2, uint32_t z2) {
  const uint32_t zm = h2_add(z2, MAGIC);  // magic + zero: exact (small integers)
  return {__byte_perm(s2, 0, 0x1010), __byte_perm(s2, 0, 0x3232), __byte_perm(zm, 0, 0x1010),
          __byte_perm(zm, 0, 0x3232)};
}

// One int32 = one k16 step of the A fragment: pair i = nibbles (i, i+4) -> register a_i.
__device__ __forceinline__ void dequant_word(uint32_t w, const GroupConst& g, uint32_t (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = lop3_and_or(w >> (4 * i), 0x000F000Fu, MAGIC);  // (magic + q_lo, magic + q_hi), exact
    a[i] = h2_mul(h2_sub(v, (i & 1) ? g.zm_hi : g.zm_lo), (i & 1) ? g.s_hi : g.s_lo);
  }
}

// QS_GROUPED: the expert of plan block tm, or -1 where the block lies past the padded total or has none.
__device__ __forceinline__ int tile_expert(const int* block_experts, const int* num_padded, int tm, int num_experts) {
  const int npad = __ldg(num_padded);
  const int ex = __ldg(block_experts + tm);
  return tm * NT < npad && ex >= 0 && ex < num_experts ? ex : -1;
}

// QS_GROUPED: the output row of plan row r (sorted_ids null: r itself), or -1 for a padding row.
__device__ __forceinline__ int plan_row(const int* sorted_ids, int r, int num_slots) {
  if (sorted_ids == nullptr) return r;
  const int slot = __ldg(sorted_ids + r);
  return slot >= 0 && slot < num_slots ? slot : -1;
}

QH_DEFINE_WGMMA_RS(wgmma_rs, float, "+f", "k16.f32." QS_WG_T "." QS_WG_T, ", 1, 1, 0")

}  // namespace

// ------------------------------------------------------------------------------------------------ kernel

// qweight: int32 [K/64, 8N] (layout quick_sm90); scales, zeros: 16-bit [K/G, N], columns permuted in blocks
// of 16; bias: [N] or null; out: [M, N]; ws: fp32 split-k workspace; counters: int32, zero between launches.
// gshift = log2(G / 64), 31 for per-channel (unused when QS_G32). Work units = n_tiles * m_tiles * splits; a split covers
// steps_per_split k64 steps (the host makes every split non-empty).
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    quick_sm90_gemm(const __grid_constant__ TmaDesc tmap_x, const uint4* __restrict__ qweight,
                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                    const uint16_t* __restrict__ bias, uint16_t* __restrict__ out, float* __restrict__ ws,
                    int* __restrict__ counters, int M, int N, int K, int gshift, int splits, int steps_per_split,
                    int n_tiles, int m_tiles
#if QS_GROUPED
                    ,
                    const int* __restrict__ sorted_ids, const int* __restrict__ block_experts,
                    const int* __restrict__ num_padded, const float* __restrict__ topk_w, int num_slots,
                    int num_experts, int expert_srows
#endif
) {
  extern __shared__ uint8_t smem_raw[];
  const Smem sm(smem_raw);
  const uint32_t s_x = sm.x, s_w = sm.w, s_full = sm.full, s_empty = sm.empty;  // s_w: QS_WTMA weight stages

  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32;
  const int lane = tid % 32;
  sm.init_barriers();

  const int nk = K / 64;
  const uint64_t wpol = weight_policy();  // QS_EF: evict_first for the weights, else unused
#if QS_GROUPED
  __shared__ float s_tw[NWG][NT];  // per consumer warpgroup: the slot weights of its unit's tokens
#endif
  const int units = n_tiles * m_tiles * splits;

  if (wg == 0) {
    // ------------------------------------------------------------------ producer: TMA for X
    if constexpr (NWG > 1) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (tid == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_x)) : "memory");
      int stage = 0;
      uint32_t phase = 0;
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int split = u % splits;
        const int tile = u / splits;
        const int tm = tile / n_tiles;
#if QS_GROUPED
        if (tile_expert(block_experts, num_padded, tm, num_experts) < 0) continue;  // the consumers skip it too
#endif
        const int s0 = split * steps_per_split;
        const int nsteps = min(nk - s0, steps_per_split);
#if QS_L2PF > 0
        // the unit's weights of one k64 step: NWG channel blocks x 2 KB, contiguous (clipped at N)
        const int tn_p = tile % n_tiles;
        const uint4* const wrow = qweight + static_cast<size_t>(s0) * (2 * N) + tn_p * NWG * 128;
        const uint32_t wbytes = static_cast<uint32_t>(min(NWG, N / 64 - tn_p * NWG)) * 2048u;
        auto l2_prefetch = [&](int s) {
          if (s < nsteps)
            asm volatile("cp.async.bulk.prefetch.L2.global" QS_HINT " [%0], %1" QS_LDW_POL2 ";\n" ::"l"(
                             wrow + static_cast<size_t>(s) * (2 * N)),
                         "r"(wbytes), "l"(wpol)
                         : "memory");
        };
        for (int s = 0; s < QS_L2PF; ++s) l2_prefetch(s);
#endif
        for (int s = 0; s < nsteps; ++s) {
#if QS_L2PF > 0
          l2_prefetch(s + QS_L2PF);
#endif
          mbar_wait(s_empty + 8 * stage, phase ^ 1);
#if QS_WTMA
          {
            const int tn_w = tile % n_tiles;
            const uint32_t nv = static_cast<uint32_t>(min(NWG, N / 64 - tn_w * NWG));
            const uint32_t sw = s_w + stage * WST_BYTES;
            const size_t srow = static_cast<size_t>((s0 + s) >> gshift) * N + tn_w * NWG * 64;
            mbar_expect_tx(s_full + 8 * stage, STAGE_BYTES + nv * (2048 + 256));
            bulk_g2s_w(sw, qweight + static_cast<size_t>(s0 + s) * (2 * N) + tn_w * NWG * 128, nv * 2048,
                       s_full + 8 * stage, wpol);
            bulk_g2s(sw + NWG * 2048, scales + srow, nv * 128, s_full + 8 * stage);
            bulk_g2s(sw + NWG * 2048 + NWG * 128, zeros + srow, nv * 128, s_full + 8 * stage);
          }
#else
          mbar_expect_tx(s_full + 8 * stage, STAGE_BYTES);
#endif
          tma_load_2d(s_x + stage * STAGE_BYTES, &tmap_x, (s0 + s) * 64, tm * NT, s_full + 8 * stage);
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
  if constexpr (NWG > 1) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  const int cw = wg - 1;
  const int n64 = N / 64;
  uint16_t* const epi = reinterpret_cast<uint16_t*>(sm.gbase + sm.epi_off + cw * EPI_BYTES);

  float acc[ACC];
  uint32_t a_frag[2][4][4];
  // Raw weights (and scale/zero words) of two groups of GRP k64 steps, used in turn: one is consumed while the
  // other is in flight. Ping-pong (not copy): a copy of freshly loaded registers would wait for the load.
#if QS_PIPE == 1
  uint32_t grp[2][GRP][4] = {}, grp_s[2][GRP][SW] = {}, grp_z[2][GRP][SW] = {};
#endif

  int stage = 0;
  uint32_t phase = 0;

  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const WorkUnit wu(u, splits, n_tiles, steps_per_split, nk);
    const int split = wu.split, tile = wu.tile, tm = wu.tm, s0 = wu.s0, nsteps = wu.nsteps;
    const int blk = wu.tn * NWG + cw;
#if QS_GROUPED
    const int ex = tile_expert(block_experts, num_padded, tm, num_experts);
    if (ex < 0) continue;  // the producer issued nothing for it
    const uint4* const qw = qweight + static_cast<size_t>(ex) * nk * (2 * N);
    const size_t sz_off = static_cast<size_t>(ex) * expert_srows * N;
#else
    const uint4* const qw = qweight;
    constexpr size_t sz_off = 0;
#endif

    if (blk >= n64) {  // past the last channel block (N not a multiple of 64 * NWG): keep the pipeline going
      for (int s = 0; s < nsteps; ++s) {
        mbar_wait(s_full + 8 * stage, phase);
        release_stage(s_empty + 8 * stage, lane);
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
      continue;
    }
    const int nb = blk * 64;

    // Weight stream of this warp: n16 block (nb/16 + warp), lane's 16 bytes; one k64 row = 2N uint4.
    const uint4* qbase = qw + static_cast<size_t>(s0) * (2 * N) + (nb / 16 + warp) * 32 + lane;
    const size_t col = static_cast<size_t>(nb + 16 * warp + 2 * (lane / 4));
    // Scale/zero row of k64 step k: 2k and 2k+1 for G = 32, k >> gshift otherwise (gshift = log2(G/64), or 31
    // for one group over all of K). Computed from the step, so the load path has no branches.
    const uint16_t* sbase = scales + sz_off + col;
    const uint16_t* zbase = zeros + sz_off + col;
    uint32_t dep = 0;  // QS_PIPE 1: run-time zero that orders a group's loads after the previous group's wait

    // Load k64 step `step` of the unit (weights, scale and zero words); predicated off past the unit or when
    // `enable` is false (the instruction stream stays uniform).
    auto load_one = [&](uint32_t(&r)[4], uint32_t(&rs)[SW], uint32_t(&rz)[SW], const int step, const bool enable) {
      const bool p = enable && step < nsteps;
      const int kstep = s0 + step;
      ldg_w(r, qbase + static_cast<size_t>(step) * (2 * N) + dep, p, wpol);
      if constexpr (G32) {
        const size_t row = static_cast<size_t>(2 * kstep) * N + dep;
        ldg_u32(rs[0], sbase + row, p);
        ldg_u32(rz[0], zbase + row, p);
        ldg_u32(rs[1], sbase + row + N, p);
        ldg_u32(rz[1], zbase + row + N, p);
      } else {
        const size_t row = static_cast<size_t>(kstep >> gshift) * N + dep;
        ldg_u32(rs[0], sbase + row, p);
        ldg_u32(rz[0], zbase + row, p);
      }
    };
    auto dequant_step = [&](const uint32_t(&r)[4], const uint32_t(&rs)[SW], const uint32_t(&rz)[SW],
                            uint32_t(&a)[4][4]) {
      const GroupConst g0 = group_const(rs[0], rz[0]);
      if constexpr (G32) {
        const GroupConst g1 = group_const(rs[1], rz[1]);
        dequant_word(r[0], g0, a[0]);
        dequant_word(r[1], g0, a[1]);
        dequant_word(r[2], g1, a[2]);
        dequant_word(r[3], g1, a[3]);
      } else {
#pragma unroll
        for (int w = 0; w < 4; ++w) dequant_word(r[w], g0, a[w]);
      }
    };
    int prev_stage = 0;

#if QS_WTMA
    // This lane's 16 bytes of weights and 4-byte scale/zero words inside a stage (same bytes as in global memory).
    const uint32_t w_off = (cw * 4 + warp) * 512 + lane * 16;
    const uint32_t s_off = NWG * 2048 + (cw * 64 + 16 * warp + 2 * (lane / 4)) * 2;
    auto dequant_stage = [&](const int st, uint32_t(&a)[4][4]) {
      const uint32_t sw = s_w + st * WST_BYTES;
      const uint4 v = quick::lds128(sw + w_off);
      const uint32_t r[4] = {v.x, v.y, v.z, v.w};
      const uint32_t rs[SW] = {quick::lds32(sw + s_off)};
      const uint32_t rz[SW] = {quick::lds32(sw + s_off + NWG * 128)};
      dequant_step(r, rs, rz, a);
    };
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
    mbar_wait(s_full + 8 * stage, phase);
    dequant_stage(stage, a_frag[0]);
    for (int sb = 0; sb < nsteps; sb += 2) {
#pragma unroll
      for (int uu = 0; uu < 2; ++uu) {  // unrolled by 2: the A buffer index is a constant
        const int s = sb + uu;
        if (s < nsteps) {
          mbar_wait(s_full + 8 * stage, phase);  // complete already (waited before its dequantization)
          const uint64_t desc = make_desc(s_x + stage * STAGE_BYTES);
          wgmma_fence();
#pragma unroll
          for (int w = 0; w < 4; ++w) wgmma_rs<NT>(acc, a_frag[uu][w], desc + 2 * w, 1);  // +32 B per k16
          wgmma_commit();
          wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and A registers are free
#pragma unroll
          for (int w = 0; w < 4; ++w)
#pragma unroll
            for (int i = 0; i < 4; ++i) fence_reg(a_frag[uu ^ 1][w][i]);
          if (s > 0) release_stage(s_empty + 8 * prev_stage, lane);
          prev_stage = stage;
          stage = stage + 1 == STAGES ? 0 : stage + 1;
          phase ^= stage == 0 ? 1u : 0u;
          if (s + 1 < nsteps) {
            mbar_wait(s_full + 8 * stage, phase);
            dequant_stage(stage, a_frag[uu ^ 1]);
          }
        }
      }
    }
#elif QS_PIPE == 1
    const uint32_t rt_zero = static_cast<uint32_t>(M) >> 31;  // 0 for any valid M, unknown to the compilers
    auto load_group = [&](const int set, const int g, const bool enable) {
#pragma unroll
      for (int j = 0; j < GRP; ++j) load_one(grp[set][j], grp_s[set][j], grp_z[set][j], g * GRP + j, enable);
    };
    // Wait for a group: every register it loaded is folded into one word (volatile asm, so it stays at the group
    // boundary), and later loads take their addresses from it (times a run-time zero), so they cannot be issued
    // before it. ptxas tracks all these loads on one scoreboard: waiting here, once per GRP steps, keeps the
    // waits off the per-step path.
    auto wait_group = [&](const int set) {
      uint32_t t = 0;
#pragma unroll
      for (int j = 0; j < GRP; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) xor_acc(t, grp[set][j][i]);
#pragma unroll
        for (int i = 0; i < SW; ++i) {
          xor_acc(t, grp_s[set][j][i]);
          xor_acc(t, grp_z[set][j][i]);
        }
      }
      dep = t & rt_zero;
    };

    // Prologue: groups 0 and 1 in flight together, one wait (drains both), first fragments.
    load_group(0, 0, true);
    load_group(1, 1, true);
    wait_group(0);
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
    dequant_step(grp[0][0], grp_s[0][0], grp_z[0][0], a_frag[0]);

    int it = 0;  // 2*GRP-step iteration: set 0 holds group 2*it, set 1 group 2*it + 1
    // One k64 step: wgmma on the stage's x tile with A fragments already in registers; then, while the tensor
    // cores run, dequantize the next step. At the middle of an iteration: wait for set 1, refill set 0 with the
    // group after; at its end: wait for set 0 (set 1 is refilled at the top of the next iteration, so no load
    // is in flight across the loop's back edge, where ptxas would otherwise wait for everything).
    auto step = [&](const int uu, const int s, const bool has_next) {
      mbar_wait(s_full + 8 * stage, phase);
      const uint64_t desc = make_desc(s_x + stage * STAGE_BYTES);
      wgmma_fence();
#pragma unroll
      for (int w = 0; w < 4; ++w) wgmma_rs<NT>(acc, a_frag[uu & 1][w], desc + 2 * w, 1);  // +32 B per k16
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and A registers are free
#pragma unroll
      for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int i = 0; i < 4; ++i) fence_reg(a_frag[(uu + 1) & 1][w][i]);
      if (s > 0) release_stage(s_empty + 8 * prev_stage, lane);
      if (has_next) {
        const int nx = uu + 1;
        const int set = (nx / GRP) % 2;
        const int j = nx % GRP;
        if (nx == GRP) {
          wait_group(1);
          load_group(0, 2 * it + 2, true);
        } else if (nx == 2 * GRP) {
          wait_group(0);
        }
        dequant_step(grp[set][j], grp_s[set][j], grp_z[set][j], a_frag[nx & 1]);
      }
      prev_stage = stage;
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      phase ^= stage == 0 ? 1u : 0u;
    };
    // Steady state: whole iterations whose every step has a successor; no data-dependent branches inside.
    const int n_main = nsteps - 1;
    int sb = 0;
    for (; sb + 2 * GRP <= n_main; sb += 2 * GRP, ++it) {
      load_group(1, 2 * it + 1, it > 0);  // iteration 0: loaded by the prologue
#pragma unroll
      for (int uu = 0; uu < 2 * GRP; ++uu) step(uu, sb + uu, true);
    }
    load_group(1, 2 * it + 1, it > 0);
#pragma unroll
    for (int uu = 0; uu < 2 * GRP; ++uu) {  // tail (< 2*GRP steps with a successor, then the last step)
      if (sb + uu < n_main) {
        step(uu, sb + uu, true);
      } else if (sb + uu == n_main) {
        step(uu, sb + uu, false);
      }
    }
#else
    // Ring of PREF k64 steps: the load for step s + PREF is issued as step s is consumed. ptxas tracks all of
    // them on one scoreboard and drains it at each step's first use, so this pipeline is latency-bound; kept
    // as the reference (first version measured on the device).
    uint32_t ring[PREF][4] = {}, ring_s[PREF][SW] = {}, ring_z[PREF][SW] = {};
#pragma unroll
    for (int p = 0; p < PREF; ++p) load_one(ring[p], ring_s[p], ring_z[p], p, true);
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
    dequant_step(ring[0], ring_s[0], ring_z[0], a_frag[0]);
    load_one(ring[0], ring_s[0], ring_z[0], PREF, true);
    int ld_next = PREF + 1;
    for (int sb = 0; sb < nsteps; sb += UNR) {
#pragma unroll
      for (int uu = 0; uu < UNR; ++uu) {
        const int s = sb + uu;
        if (s < nsteps) {
          mbar_wait(s_full + 8 * stage, phase);
          const uint64_t desc = make_desc(s_x + stage * STAGE_BYTES);
          wgmma_fence();
#pragma unroll
          for (int w = 0; w < 4; ++w) wgmma_rs<NT>(acc, a_frag[uu & 1][w], desc + 2 * w, 1);  // +32 B per k16
          wgmma_commit();
          wgmma_wait<1>();  // the previous step's wgmmas are done: its stage and A registers are free
#pragma unroll
          for (int w = 0; w < 4; ++w)
#pragma unroll
            for (int i = 0; i < 4; ++i) fence_reg(a_frag[(uu + 1) & 1][w][i]);
          if (s > 0) release_stage(s_empty + 8 * prev_stage, lane);
          if (s + 1 < nsteps) {
            const int slot = (uu + 1) % PREF;
            dequant_step(ring[slot], ring_s[slot], ring_z[slot], a_frag[(uu + 1) & 1]);
            load_one(ring[slot], ring_s[slot], ring_z[slot], ld_next, true);
            ++ld_next;
          }
          prev_stage = stage;
          stage = stage + 1 == STAGES ? 0 : stage + 1;
          phase ^= stage == 0 ? 1u : 0u;
        }
      }
    }
#endif
    wgmma_drain(acc, a_frag);
    release_stage(s_empty + 8 * prev_stage, lane);

    // ------------------------------------------------------------------ split-k: deterministic reduction
    if (splits > 1 &&
        !splitk_reduce<NT, NWG, ACC, float, float4>(acc, ws, counters, sm.flag, tile, split, splits, cw, tid))
      continue;

    // ------------------------------------------------------------------ epilogue
    // D fragment: acc[4j + 2v1 + v0] = out^T[channel 16*warp + lane/4 + 8*v1][token 8j + 2*(lane%4) + v0].
    const int ch0 = 16 * warp + lane / 4;
    float b0, b1;
    bias_pair<BF16>(bias, nb, ch0, b0, b1);
#if QS_GROUPED
    // the slot weight of each token of the tile (1 without weights and for padding rows), in shared memory: held in
    // registers beside the accumulators they would spill at 256 tokens
    float* const tws = s_tw[cw];
    for (int t = tid; t < NT; t += 128) {
      const int row = plan_row(sorted_ids, tm * NT + t, num_slots);
      tws[t] = topk_w != nullptr && row >= 0 ? __ldg(topk_w + row) : 1.f;
    }
    named_bar(1 + cw, 128);
#endif
#pragma unroll
    for (int i = 0; i < ACC; ++i) {
      const int j = i / 4, v1 = (i / 2) & 1, v0 = i & 1;
      const int t = 8 * j + 2 * (lane % 4) + v0;
#if QS_GROUPED
      epi[t * EPI_STRIDE + ch0 + 8 * v1] = f_to_h16<BF16>(acc[i] * tws[t]);
#else
      epi[t * EPI_STRIDE + ch0 + 8 * v1] = f_to_h16<BF16>(acc[i] + (v1 ? b1 : b0));
#endif
    }
#if QS_GROUPED
    named_bar(1 + cw, 128);
    for (int idx = tid; idx < NT * 8; idx += 128) {  // staged rows -> their output rows, 16 bytes at a time
      const int t = idx / 8, q = idx % 8;
      const int row = plan_row(sorted_ids, tm * NT + t, num_slots);
      if (row >= 0) {
        const uint4 v = *reinterpret_cast<const uint4*>(epi + t * EPI_STRIDE + 8 * q);
        *reinterpret_cast<uint4*>(out + static_cast<size_t>(row) * N + nb + 8 * q) = v;
      }
    }
    named_bar(1 + cw, 128);
#else
    store_staged<NT, EPI_STRIDE>(out, epi, tm, M, N, nb, tid, 1 + cw);
#endif
  }
}
