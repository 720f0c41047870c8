// quick_moe.cu: grouped W4A16 GEMM over the experts of a mixture-of-experts block (mma.sync.m16n8k16, sm_80+).
//
// out[slot, :] = x[slot / gdiv, :] @ dequant(W[e]) for every slot of a sorted-token plan (quick/nn/moe.py:
// build_plan): the rows are sorted by expert and each expert's run is padded to BM rows, so that a block of BM
// sorted rows belongs to one expert, block_experts[block]. Grid: (row blocks, N tiles); a CTA takes one row block
// and one N tile, skips itself when the block lies past num_padded[0] or has no expert, gathers its activation
// rows through cp.async (padding rows zero-filled), and streams that expert's k16 x n64 blocks of the interleaved
// `quick` layout from global memory into registers exactly as the dense GEMM (quick_mma.cu) does: the same
// dequantization (quick_common.cuh: dequant_word), the same A fragments (ldmatrix), the same k-slice reduction.
// Row blocks are the fast grid dimension: CTAs that run together mostly read the same weight tile (prefill: one
// expert's several row blocks hit L2) or different experts' tiles (decode: every routed expert streams at once).
//
// Epilogue per output pair (row r of the block, columns col, col + 1), skipped where sorted_ids[r] is padding:
//   QM_GATED = 0: out[slot][col] = acc (* topk_w[slot] when given)
//   QM_GATED = 1: W is a gate|up stack [K, 2I] (gate columns first); a warp owns gate blocks j and the matching up
//                 blocks j + I/64, and writes out[slot][col] = act(gate) * up (gate and up rounded to the 16-bit
//                 type first, as the unfused pair of products would be), I columns per row.
// Ids are bounds-checked on the device (a slot outside [0, num_slots) counts as padding, an expert outside
// [0, E) skips the block), so a malformed plan cannot read or write out of bounds.
//
// Compile-time configuration (-D): QM_DTYPE (0 fp16, 1 bf16), QM_BM (rows per block = the plan's block size),
// QM_WM, QM_WN, QM_WK, QM_NB, QM_SW, QM_STAGES, QM_PF, QM_GATED. Shared memory: quick/kernels/moe.py.
#include "quick_common.cuh"
#include "quick_mainloop.cuh"

#ifndef QM_DTYPE
#define QM_DTYPE 0
#endif
#ifndef QM_BM
#define QM_BM 16
#endif
#ifndef QM_WM
#define QM_WM 1
#endif
#ifndef QM_WN
#define QM_WN 1
#endif
#ifndef QM_WK
#define QM_WK 8
#endif
#ifndef QM_NB
#define QM_NB 2
#endif
#ifndef QM_SW
#define QM_SW 2
#endif
#ifndef QM_STAGES
#define QM_STAGES 3
#endif
#ifndef QM_PF
#define QM_PF 2
#endif
#ifndef QM_GATED
#define QM_GATED 0
#endif

namespace {

constexpr int DT = QM_DTYPE;
constexpr int BM = QM_BM, WARPS_M = QM_WM, WARPS_N = QM_WN, WARPS_K = QM_WK;
constexpr int NB = QM_NB, SW = QM_SW, STAGES = QM_STAGES, PF = QM_PF;
constexpr bool GATED = QM_GATED != 0;
constexpr int NWARPS = WARPS_M * WARPS_N * WARPS_K;
constexpr int THREADS = 32 * NWARPS;
constexpr int WM = BM / WARPS_M;
constexpr int MT = WM / 16;
constexpr int BN = 64 * NB * WARPS_N;  // weight columns of a CTA (gated: half gate, half up)
constexpr int HB = NB / 2;             // gated: gate blocks per warp (the up blocks follow)
constexpr int BKS = 16 * SW * WARPS_K;
constexpr int A_STRIDE = BKS + 8;  // elements; +16 bytes per row: ldmatrix rows fall in distinct banks
constexpr int A_STAGE_BYTES = BM * A_STRIDE * 2;
constexpr int S_ROWS = BKS >= 32 ? BKS / 32 : 1;  // group rows one stage can span (G >= 32)
constexpr int S_BYTES = S_ROWS * BN * 2;          // scales; zeros follow
constexpr int STAGE_BYTES = A_STAGE_BYTES + 2 * S_BYTES;
constexpr int A_CHUNKS = BM * BKS / 8;  // 16-byte pieces of one A stage

static_assert(MT >= 1 && WM % 16 == 0, "BM / WARPS_M must be a multiple of 16");
static_assert(STAGES >= 2, "need at least two pipeline stages");
static_assert(BKS % 64 == 0, "a stage must cover a multiple of 64 columns of K");
static_assert(STAGE_BYTES % 16 == 0, "stages must stay 16-byte aligned");
static_assert(!GATED || NB % 2 == 0, "a gated warp holds gate and up blocks in pairs");

// Activations of the gated epilogue (runtime: one uniform branch per output pair, off the main loop).
enum Act { ACT_SILU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_RELU = 4 };

__device__ __forceinline__ float activate(float g, int act) {
  switch (act) {
    case ACT_SILU:
      return g / (1.f + __expf(-g));
    case ACT_GELU:
      return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
    case ACT_GELU_TANH:
      return 0.5f * g * (1.f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
    case ACT_RELU:
      return fmaxf(g, 0.f);
    default:
      return g;
  }
}

// The 16-bit rounding of a float, back as a float (what writing a product out and reading it back gives).
__device__ __forceinline__ float round16(float v) { return quick::unpack2<DT>(quick::pack2<DT>(v, 0.f)).x; }

// Weight block (n64 column block of W) of CTA block cb (= wn * NB + nb) in N tile tn, and whether it exists.
// gate_blocks = I / 64 when gated (the up block of gate block j is j + I / 64), else N / 64.
__device__ __forceinline__ int weight_block(int tn, int cb, int gate_blocks, bool& valid) {
  if constexpr (GATED) {
    const int wn = cb / NB, nb = cb % NB;
    const int j = tn * (WARPS_N * HB) + wn * HB + nb % HB;
    valid = j < gate_blocks;
    return nb < HB ? j : j + gate_blocks;
  } else {
    const int j = tn * (BN / 64) + cb;
    valid = j < gate_blocks;
    return j;
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) quick_moe_gemm(
    const void* __restrict__ xp, const uint4* __restrict__ qweight, const void* __restrict__ scalesp,
    const void* __restrict__ zerosp, const int* __restrict__ sorted_ids, const int* __restrict__ block_experts,
    const int* __restrict__ num_padded, const float* __restrict__ topk_w, void* __restrict__ out, int num_slots,
    int gdiv, int num_experts, int N, int K, int group_size, int gshift, int act) {
  using namespace quick;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_xrow[BM];  // activation row of each block row, -1 for padding
  __shared__ int s_slot[BM];  // output row of each block row, -1 for padding

  const int blk = blockIdx.x, tn = blockIdx.y;
  if (blk * BM >= __ldg(num_padded)) return;
  const int e = __ldg(block_experts + blk);
  if (e < 0 || e >= num_experts) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WARPS_M, wn = (warp / WARPS_M) % WARPS_N, wk = warp / (WARPS_M * WARPS_N);
  const int ntiles = K / BKS;
  const int srows = group_size < BKS ? BKS / group_size : 1;
  const int half_n = N / 2;  // uint4 per k16 row of qweight (2N int32)
  const int gate_blocks = GATED ? N / 128 : N / 64;
  const int n_out = GATED ? N / 2 : N;

  // this expert's tensors: the stacks are [E, ...] with a fixed stride per expert
  const uint4* qw = qweight + static_cast<size_t>(e) * (K / 16) * half_n;
  const size_t s_off = static_cast<size_t>(e) * (K / group_size) * N * 2;
  const char* scales = static_cast<const char*>(scalesp) + s_off;
  const char* zeros = static_cast<const char*>(zerosp) + s_off;
  const char* x = static_cast<const char*>(xp);

  for (int r = tid; r < BM; r += THREADS) {
    const int slot = __ldg(sorted_ids + blk * BM + r);
    const bool real = slot >= 0 && slot < num_slots;
    s_slot[r] = real ? slot : -1;
    s_xrow[r] = real ? slot / gdiv : -1;
  }
  __syncthreads();

  const uint32_t smem_base = smem_u32(smem);

  // ---- cp.async producer: the gathered A rows [BM x BKS] and the scale/zero rows of one stage
  auto load_stage = [&](int slot, int tile) {
    const int k0 = tile * BKS;
    const uint32_t sa = smem_base + slot * STAGE_BYTES;
#pragma unroll
    for (int i = tid; i < A_CHUNKS; i += THREADS) {
      const int row = i / (BKS / 8);
      const int c = i % (BKS / 8);
      const int xr = s_xrow[row];
      const char* src = x + ((static_cast<size_t>(xr >= 0 ? xr : 0) * K + k0 + c * 8) * 2);
      cp_async16(sa + (row * A_STRIDE + c * 8) * 2, src, xr >= 0);
    }
    const int g0 = k0 / group_size;
    const int per = srows * (BN / 8);
    for (int i = tid; i < 2 * per; i += THREADS) {
      const int which = i / per;
      const int r = (i % per) / (BN / 8);
      const int c = i % (BN / 8);
      bool ok;
      const int gb = weight_block(tn, c / 8, gate_blocks, ok);
      const int col = gb * 64 + (c % 8) * 8;
      const char* base = which ? zeros : scales;
      const char* src = base + (static_cast<size_t>(g0 + r) * N + (ok ? col : 0)) * 2;
      cp_async16(sa + A_STAGE_BYTES + which * S_BYTES + (r * BN + c * 8) * 2, src, ok);
    }
  };

  // ---- per-warp weight stream
  int nblk[NB];
  bool nvalid[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) nblk[nb] = weight_block(tn, wn * NB + nb, gate_blocks, nvalid[nb]);
  auto wptr = [&](int tile, int j, int nb) {
    const int step = tile * (BKS / 16) + wk * SW + j;
    return qw + (static_cast<size_t>(step) * half_n + nblk[nb] * 32 + lane);
  };

  uint4 wring[PF][SW][NB];
  float acc[MT][NB][8][4];
  zero_acc(acc);

  weight_ring_prologue(wring, ntiles, nvalid, [&](int p, int j, int nb) { return ldg_stream128(wptr(p, j, nb)); });
  pipeline_prologue<STAGES>(ntiles, load_stage);

  // ---- main loop, unrolled by PF so that every ring slot has a compile-time index
  const int a_row = wm * WM + (lane & 15);
  const int a_col = (lane >> 4) * 8;
  const int s_col = (wn * NB) * 64 + 8 * (lane >> 2);
  pipeline_loop<STAGES, PF>(ntiles, load_stage, [&](int p, int tile) {
    const uint32_t sa = smem_base + (tile % STAGES) * STAGE_BYTES;
#pragma unroll
    for (int j = 0; j < SW; ++j) {
      w4a16_kstep<DT, MT, NB, A_STRIDE, BN, S_BYTES>(
          acc, sa, sa + A_STAGE_BYTES, a_row, a_col, s_col, (wk * SW + j) * 16, gshift,
          [&](int nb) { return wring[p][j][nb]; },
          [&](int nb) {
            if (tile + PF < ntiles && nvalid[nb]) wring[p][j][nb] = ldg_stream128(wptr(tile + PF, j, nb));
          });
    }
  });
  cp_async_wait<0>();

  // ---- reduce the WARPS_K k-slices in a fixed order: acc(wk=0) += acc(1); += acc(2); ...
  if constexpr (WARPS_K > 1) reduce_kslices<WARPS_K>(acc, smem, wm + WARPS_M * wn, wk, lane);
  if (wk != 0) return;

  // ---- epilogue: one 4-byte store per output pair at the slot's row; padding rows skipped
  bool ovalid[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) ovalid[nb] = nvalid[nb] && (!GATED || nb < HB);
  for_each_out_pair<MT, NB, 8, 64>(
      nblk, ovalid, wm * WM, BM, lane, [](int) { return 0; },
      [&](int, int row, int col, int mt, int nb, int t, int h) {
        const int slot = s_slot[row];
        if (slot < 0) return;
        float v0 = acc[mt][nb][t][2 * h], v1 = acc[mt][nb][t][2 * h + 1];
        if constexpr (GATED) {
          const float u0 = acc[mt][(nb + HB) % NB][t][2 * h], u1 = acc[mt][(nb + HB) % NB][t][2 * h + 1];
          v0 = activate(round16(v0), act) * round16(u0);
          v1 = activate(round16(v1), act) * round16(u1);
        }
        if (topk_w != nullptr) {
          const float wt = __ldg(topk_w + slot);
          v0 *= wt;
          v1 *= wt;
        }
        const size_t o = static_cast<size_t>(slot) * n_out + col;
        *reinterpret_cast<uint32_t*>(static_cast<char*>(out) + o * 2) = pack2<DT>(v0, v1);
      });
}
