// quick_dec.cu: the decode kernel over the `quick_sm90` layout (QD_WB = 0, weight = mma A operand, M <= 64 tokens)
// or the paper's `quick` layout (QD_WB = 1, weight = mma B operand, M <= 16), for sm_80 and newer.
//
// Why a separate kernel: at decode sizes the wgmma GEMM (quick_sm90.cu) is bound by instruction issue, not by
// memory (ncu: ~150 instructions per k64 step and warp, 1.56 TB/s at M = 1 on the H200). This kernel spends as
// few instructions per weight as the QUICK layout allows:
//
// * The `quick_sm90` layout already stores, per lane, the mma.m16n8k16 A fragment (16 channels x k16) of four
//   consecutive k16 steps in one 16-byte chunk (wgmma's register A fragment is mma.sync's, per warp). So the
//   weight is the A operand of mma.sync (transposed product, out^T = W^T x^T) and tokens are the n8 side.
// * Weights stream global -> shared -> registers with 16-byte cp.async (each lane copies and later reads back
//   only its own chunk: no bank conflicts, no barrier, explicit wait_group counting instead of the register
//   scoreboards that drained the wgmma kernel's prefetch ring). STAGES k64 steps are in flight per warp.
// * Dequantization is 9 instructions per 32-bit word in fp16 (1 shift, 4 lop3, 4 packed add/fma): the zero point
//   is subtracted exactly in 16 bits ((1024 + q) - (1024 + z), and (1024 + 16q) / 16 - (64 + z) for the second
//   nibble of a byte, which saves three shifts), and the **scale is applied after the mma, in fp32**, once per
//   group and k64 step (the mma accumulates sum (q - z) x exactly in fp32).
// * x (M rows of the CTA's K range) is copied to shared memory once; its fragments come from ldmatrix, one x4 per
//   k32 and n8 tile (A-side) or per k16 (B-side), shared by the RB channel blocks of the warp. Token rows >= M
//   re-read row M - 1 (their outputs are dropped).
// * `quick` layout (QD_WB = 1): the same pipeline with the paper's B fragment: a lane's 16 bytes of one k16 row
//   are 8 n8 tiles (64 channels), x is the m16 A operand (tokens), 4 chunks per k64 step and channel block.
// * A warp owns RB channel blocks of 16 (A-side) or 64 (B-side) channels. A CTA has QD_NW x QD_WARPS warps: NW
//   groups side by side over channels (the CTA owns NW x RB blocks), and in each the WARPS warps split the CTA's K
//   range into contiguous runs and meet once in shared memory (fixed order). NW > 1 is for larger M (32, 64): x in
//   shared memory is then shared by more channels. Splits across CTAs (gridDim.y) write fp32 partials; the last CTA
//   of a channel tile (arrival counter) sums them in split order and writes the output: deterministic, one launch.
//
// * QD_ACT (1 silu, 2 tanh-gelu; 0 none): x is then a gate/up product [M, 2K] and the kernel multiplies in
//   act(gate) * up while it stages x in shared memory (fp32, rounded once to the model dtype, as the compiled
//   elementwise kernel it replaces does): the down projection of a gated MLP without a kernel of its own. The
//   weight stages are issued first, so the loads of x and the arithmetic overlap the weights' first round trip.
//
// * QD_NORM (with N the hidden size): the residual add and RMSNorm that follow the o and down projections. Every
//   CTA writes its tile of h as usual, into `out`; the last CTA to finish the whole output (a row counter after the
//   tile counters) turns it into r = resid + h (the add in the model dtype, in place) and writes
//   normed = RMSNorm(r) (transformers' arithmetic: fp32, then w * cast(r / rms) or, with an offset (Gemma),
//   cast(r / rms * (offset + w))), one token at a time with a fixed reduction order: deterministic. The separate
//   add + norm kernel (2.4 us at batch 1) and its launch gap go; the tail is one CTA's pass over M x N.
//
// * QD_PDL (sm_90): launched as a programmatic dependent launch, the kernel issues its first weight stages (the
//   weights are read-only), then waits for the previous kernel (griddepcontrol.wait), lets the next one start
//   (launch_dependents), and only then reads x and touches counters and outputs. So its first loads overlap the
//   previous kernel's tail, and the next kernel's overlap its own. x is staged with L2 loads after the wait.
//
// * QD_GROUPED (either layout, M <= 16): the experts of a mixture-of-experts block at decode sizes. The weights are
//   stacks of E layout tensors (K x N / 2 bytes of codes, scales and zeros [E, K/G, N]) and blockIdx.z is a block of
//   16 rows of a sorted-token plan (quick/nn/moe.py: build_plan; one expert per block, its valid rows first): the CTA
//   loads the padded total, its block's expert and slots in one round trip, skips blocks past num_padded[0] or
//   without an expert, takes row r's activations from x[sorted_ids[r] / gdiv] (gathered into shared memory like x;
//   at most max_rows of them, which the launcher sized it for) and writes output row sorted_ids[r], times
//   topk_w[slot] when given. No split, bias or norm.
//   Gate/up then down of an expert MLP are two launches: gate|up plain (out [slots, 2I]), down with QD_ACT.
//
// -D: QD_WB (0: quick_sm90 layout, 1: quick layout), QD_DTYPE (0 fp16, 1 bf16), QD_NT (n8 token tiles, 1/2/4/8:
// M <= 8 * NT; the B-side takes 1), QD_RB (channel blocks per warp), QD_WARPS (warps splitting K), QD_NW (warp groups
// splitting channels), QD_STAGES (k64 steps in flight per warp), QD_G32 (group size 32: two scale rows per k64 step),
// QD_ACT (0 none, 1 silu, 2 tanh-gelu: x = act(gate) * up of a [M, 2K] gate/up product), QD_NORM (0/1: the
// residual add + RMSNorm tail), QD_PDL (0/1: programmatic dependent launch), QD_GROUPED (0/1: experts, above).
// Dynamic shared memory: DecConfig.smem_bytes in quick/kernels/decode.py.
#include "quick_common.cuh"

#ifndef QD_WB
#define QD_WB 0
#endif
#ifndef QD_DTYPE
#define QD_DTYPE 0
#endif
#ifndef QD_NT
#define QD_NT 1
#endif
#ifndef QD_RB
#define QD_RB 4
#endif
#ifndef QD_WARPS
#define QD_WARPS 8
#endif
#ifndef QD_NW
#define QD_NW 1
#endif
#ifndef QD_STAGES
#define QD_STAGES 4
#endif
#ifndef QD_G32
#define QD_G32 0
#endif
#ifndef QD_ACT
#define QD_ACT 0
#endif
#ifndef QD_NORM
#define QD_NORM 0
#endif
#ifndef QD_PDL
#define QD_PDL 0
#endif
#ifndef QD_GROUPED
#define QD_GROUPED 0
#endif

namespace {
constexpr bool WB = QD_WB != 0;
constexpr int DT = QD_DTYPE;
constexpr int NT = WB ? 1 : QD_NT;  // B-side: the m16 tile holds all 16 tokens
constexpr int RB = QD_RB;
constexpr int WARPS = QD_WARPS;  // k slices
constexpr int NW = QD_NW;        // channel groups
constexpr int STAGES = QD_STAGES;
constexpr int ACT = QD_ACT;
constexpr bool NORM = QD_NORM != 0;
constexpr bool PDL = QD_PDL != 0;
constexpr bool GROUPED = QD_GROUPED != 0;
static_assert(!GROUPED || (!NORM && !PDL && NW == 1), "QD_GROUPED: no norm tail, PDL or NW");
constexpr bool X_LATE = ACT != 0 || PDL;  // x staged with loads after the first weight stages (not by cp.async)
constexpr int GPS = QD_G32 ? 2 : 1;     // scale rows per k64 step
constexpr int WPG = 4 / GPS;            // words (k16 steps) per scale row
constexpr int THREADS = 32 * WARPS * NW;
constexpr int CH = WB ? 64 : 16;             // channels per block
constexpr int WCHUNKS = WB ? 4 : 1;          // 16-byte chunks per lane, k64 step and block
constexpr int W_BYTES = RB * WCHUNKS * 512;  // one warp's weights of one k64 step
constexpr int S_LINE = CH * 4;               // scales (CH x 2 B) + zeros (CH x 2 B) of one block and scale row
constexpr int S_BYTES = RB * GPS * S_LINE;
constexpr int S_CHUNKS = RB * GPS * S_LINE / 16;  // one 16-byte copy per lane
constexpr int NACC = WB ? 8 : NT;                 // accumulator tiles per block: n8 tiles (B) / token tiles (A)
constexpr int STAGE_BYTES = W_BYTES + S_BYTES;
constexpr int RING_BYTES = WARPS * NW * STAGES * STAGE_BYTES;
static_assert(NT == 1 || NT == 2 || NT == 4 || NT == 8, "QD_NT is 1, 2, 4 or 8");
static_assert(STAGES >= 2, "two stages at least");
// The k-slice reduction reuses shared memory from offset 0: WARPS x NW x RB x NACC x 512 bytes, which the launcher
// makes sure of (DecConfig.smem_bytes takes the max of ring + x and this).
static_assert(S_CHUNKS <= 32, "one 16-byte scale chunk per lane");

// mma with C = 0: the first k16 step of a scale group starts a fresh fp32 partial.
template <int D>
__device__ __forceinline__ void mma_16816_zero(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  const float z = 0.f;
  if constexpr (D == 0) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
  }
}

// One `quick_sm90` word -> the A fragment (q - z) of one k16 step, exact. Pair p of the word is register a_p:
// rows lane/4 (p = 0, 2) and lane/4 + 8 (p = 1, 3). zr0 / zr1: -(MAGIC + z) of row 0 / row 1 in both halves
// (fp16: zr1 is -(64 + z), for the nibbles taken 16x by the 0x00f000f0 mask).
template <int D>
__device__ __forceinline__ void dequant_a(uint32_t w, uint32_t zr0, uint32_t zr1, uint32_t a[4]) {
  using namespace quick;
  constexpr uint32_t MAGIC = Elt<D>::MAGIC;
  if constexpr (D == 0) {
    constexpr uint32_t SIXTEENTH = 0x2C002C00u;  // fp16x2 (1/16, 1/16)
    const uint32_t t = w >> 8;
    a[0] = add2<0>(lop3_and_or(w, 0x000f000fu, MAGIC), zr0);
    a[1] = fma2<0>(lop3_and_or(w, 0x00f000f0u, MAGIC), SIXTEENTH, zr1);
    a[2] = add2<0>(lop3_and_or(t, 0x000f000fu, MAGIC), zr0);
    a[3] = fma2<0>(lop3_and_or(t, 0x00f000f0u, MAGIC), SIXTEENTH, zr1);
  } else {  // bf16: bit 7 is the exponent's lowest bit, so every pair needs its own shift
    a[0] = add2<1>(lop3_and_or(w, 0x000f000fu, MAGIC), zr0);
    a[1] = add2<1>(lop3_and_or(w >> 4, 0x000f000fu, MAGIC), zr1);
    a[2] = add2<1>(lop3_and_or(w >> 8, 0x000f000fu, MAGIC), zr0);
    a[3] = add2<1>(lop3_and_or(w >> 12, 0x000f000fu, MAGIC), zr1);
  }
}

// (zr0, zr1) for dequant_a from a packed pair (z(row 0), z(row 1)) of zero points.
template <int D>
__device__ __forceinline__ void zero_consts(uint32_t z2, uint32_t& zr0, uint32_t& zr1) {
  using namespace quick;
  const uint32_t nz = neg_magic_zero<D>(z2);
  zr0 = bcast_lo(nz);
  if constexpr (D == 0) {
    constexpr uint32_t NEG_ONE = 0xBC00BC00u, NEG_64 = 0xD400D400u;
    zr1 = bcast_hi(fma2<0>(z2, NEG_ONE, NEG_64));
  } else {
    zr1 = bcast_hi(nz);
  }
}

// One `quick` word -> the B fragments (q - z) of n8 tiles 2w (pairs 0, 1 -> b0, b1) and 2w+1 (pairs 2, 3), exact.
// nz / nz16: -(MAGIC + z) / -(64 + z) (fp16) of (tile 2w, tile 2w+1) in (low, high).
template <int D>
__device__ __forceinline__ void dequant_b(uint32_t w, uint32_t nz, uint32_t nz16, uint32_t b[4]) {
  using namespace quick;
  constexpr uint32_t MAGIC = Elt<D>::MAGIC;
  const uint32_t z0 = bcast_lo(nz), z1 = bcast_hi(nz);
  if constexpr (D == 0) {
    constexpr uint32_t SIXTEENTH = 0x2C002C00u;
    const uint32_t t = w >> 8;
    b[0] = add2<0>(lop3_and_or(w, 0x000f000fu, MAGIC), z0);
    b[1] = fma2<0>(lop3_and_or(w, 0x00f000f0u, MAGIC), SIXTEENTH, bcast_lo(nz16));
    b[2] = add2<0>(lop3_and_or(t, 0x000f000fu, MAGIC), z1);
    b[3] = fma2<0>(lop3_and_or(t, 0x00f000f0u, MAGIC), SIXTEENTH, bcast_hi(nz16));
  } else {
    b[0] = add2<1>(lop3_and_or(w, 0x000f000fu, MAGIC), z0);
    b[1] = add2<1>(lop3_and_or(w >> 4, 0x000f000fu, MAGIC), z0);
    b[2] = add2<1>(lop3_and_or(w >> 8, 0x000f000fu, MAGIC), z1);
    b[3] = add2<1>(lop3_and_or(w >> 12, 0x000f000fu, MAGIC), z1);
  }
}

// The mma of one k16 step of a scale group's partial: `first` starts it from C = 0 (both operand roles).
template <int D>
__device__ __forceinline__ void mma_part(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, bool first) {
  if (first) {
    mma_16816_zero<D>(c, a, b0, b1);
  } else {
    quick::mma_16816<D>(c, a, b0, b1);
  }
}

__device__ __forceinline__ void store16(void* p, float v) {
  if constexpr (DT == 0) {
    *static_cast<__half*>(p) = __float2half_rn(v);
  } else {
    *static_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
  }
}

// act(g) * u of a gated MLP in fp32: QD_ACT 1 silu (x sigmoid(x)), 2 tanh-gelu.
__device__ __forceinline__ float gate_act(float g, float u) {
  if constexpr (ACT == 1) return g / (1.f + __expf(-g)) * u;
  const float t = tanhf(0.7978845608028654f * fmaf(0.044715f * g, g * g, g));
  return 0.5f * g * (1.f + t) * u;
}

__device__ __forceinline__ float load16(const void* p) {
  if constexpr (DT == 0) {
    return __half2float(*static_cast<const __half*>(p));
  } else {
    return __bfloat162float(*static_cast<const __nv_bfloat16*>(p));
  }
}
// QD_NORM: the row tail (see the header). Called by every CTA that finished a channel tile of the output (h in
// `out`, written and fenced); the last of them does the add and the norm over all M x N. Both passes walk the
// M x N / 8 16-byte chunks flat (chunk j: token j / (N / 8)), NORM_U (4) chunks per thread at a time with their loads
// issued first, so that M = 8 costs a few round trips, not eight. Sums of squares: each thread adds into its own
// shared slot per token (its chunks in a fixed order), then warp t sums token t's slots in a fixed order:
// deterministic. `scratch`: the dynamic shared memory, free by now (>= M x THREADS floats).
constexpr int NORM_U = 4;

__device__ __forceinline__ void norm_tail(int M, int N, char* out, const char* resid, const char* weight,
                                          char* normed, float eps, float offset, int* row_counter, int tid,
                                          float* scratch) {
  using namespace quick;
  constexpr int NWARPS = THREADS / 32;
  static_assert(NWARPS >= 8, "QD_NORM: a warp per token (M <= 8)");
  __shared__ int s_row;
  __shared__ float s_inv[8];
  __threadfence();
  __syncthreads();
  if (tid == 0) s_row = atomicAdd(row_counter, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!s_row) return;
  __threadfence();
  const int lane = tid & 31, warp = tid >> 5;
  const int cpt = N >> 3, chunks = M * cpt;  // chunks per token, in all
  for (int t = 0; t < M; ++t) scratch[t * THREADS + tid] = 0.f;
  for (int j0 = tid; j0 < chunks; j0 += NORM_U * THREADS) {  // r = cast(resid + h) over h; r^2 into the slots
    uint4 hv[NORM_U], rv[NORM_U];
#pragma unroll
    for (int u = 0; u < NORM_U; ++u) {
      const int j = j0 + u * THREADS;
      if (j < chunks) {
        hv[u] = __ldcg(reinterpret_cast<const uint4*>(out) + j);
        rv[u] = ldg128(resid + static_cast<size_t>(j) * 16);
      }
    }
#pragma unroll
    for (int u = 0; u < NORM_U; ++u) {
      const int j = j0 + u * THREADS;
      if (j < chunks) {
        uint32_t w[4];
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 h2 = unpack2<DT>(u4_get(hv[u], i)), r2 = unpack2<DT>(u4_get(rv[u], i));
          w[i] = pack2<DT>(r2.x + h2.x, r2.y + h2.y);
          const float2 q = unpack2<DT>(w[i]);
          ss = fmaf(q.x, q.x, fmaf(q.y, q.y, ss));
        }
        reinterpret_cast<uint4*>(out)[j] = make_uint4(w[0], w[1], w[2], w[3]);
        scratch[(j / cpt) * THREADS + tid] += ss;
      }
    }
  }
  __syncthreads();
  if (warp < M) {  // warp t: token t's THREADS slots, lane-strided, then a shuffle tree
    float ss = 0.f;
    for (int i = lane; i < THREADS; i += 32) ss += scratch[warp * THREADS + i];
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, sh);
    if (lane == 0) s_inv[warp] = rsqrtf(ss / static_cast<float>(N) + eps);
  }
  __syncthreads();
  for (int j0 = tid; j0 < chunks; j0 += NORM_U * THREADS) {  // normed = RMSNorm(r): each thread re-reads its r
    uint4 rv[NORM_U], wv[NORM_U];
#pragma unroll
    for (int u = 0; u < NORM_U; ++u) {
      const int j = j0 + u * THREADS;
      if (j < chunks) {
        rv[u] = reinterpret_cast<const uint4*>(out)[j];
        wv[u] = ldg128(weight + static_cast<size_t>(j % cpt) * 16);
      }
    }
#pragma unroll
    for (int u = 0; u < NORM_U; ++u) {
      const int j = j0 + u * THREADS;
      if (j < chunks) {
        const float inv = s_inv[j / cpt];
        uint32_t y[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 r2 = unpack2<DT>(u4_get(rv[u], i)), w2 = unpack2<DT>(u4_get(wv[u], i));
          if (offset == 0.f) {  // w * cast(r / rms), the product rounded once more
            const float2 n2 = unpack2<DT>(pack2<DT>(r2.x * inv, r2.y * inv));
            y[i] = pack2<DT>(w2.x * n2.x, w2.y * n2.y);
          } else {  // cast(r / rms * (offset + w))
            y[i] = pack2<DT>(r2.x * inv * (offset + w2.x), r2.y * inv * (offset + w2.y));
          }
        }
        reinterpret_cast<uint4*>(normed)[j] = make_uint4(y[0], y[1], y[2], y[3]);
      }
    }
  }
  if (tid == 0) *row_counter = 0;  // zero again for the next launch on this stream
}
}  // namespace

// QD_ACT / QD_NORM / QD_PDL variants of 512-thread configs whose rings leave room for two CTAs per SM keep to 64 registers,
// so that they run two per SM as their plain twins do (the staging of act(gate) * up or the norm tail would
// otherwise take them past 64).
constexpr int MIN_BLOCKS = (ACT != 0 || NORM || PDL) && THREADS >= 512 && 2 * RING_BYTES <= 200 * 1024 ? 2 : 1;

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) quick_dec(
    const void* __restrict__ xp, const void* __restrict__ qweight, const void* __restrict__ scales,
    const void* __restrict__ zeros, const void* __restrict__ bias, void* __restrict__ out, float* __restrict__ ws,
    int* __restrict__ counters, int M, int N, int K, int gshift, int steps_per_split, const void* __restrict__ nres,
    const void* __restrict__ nweight, void* __restrict__ normed, float neps, float noffset,
    const int* __restrict__ sorted_ids, const int* __restrict__ block_experts, const int* __restrict__ num_padded,
    const float* __restrict__ topk_w, int num_slots, int gdiv, int num_experts, int expert_srows, int max_rows) {
  using namespace quick;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // QD_GROUPED: the plan block's expert and rows (x row and output row of each of its 16 rows; valid rows first)
  __shared__ int s_xrow[GROUPED ? 16 : 1], s_orow[GROUPED ? 16 : 1];
  if constexpr (GROUPED) {
    const int blk = blockIdx.z;
    // independent loads (the plan holds gridDim.z whole blocks, all written): one round trip, not three
    const int npad = __ldg(num_padded);
    const int ex = __ldg(block_experts + blk);
    const int slot = tid < 16 ? __ldg(sorted_ids + blk * 16 + tid) : -1;
    if (blk * 16 >= npad || ex < 0 || ex >= num_experts) return;
    if (tid < 16) {
      const bool real = slot >= 0 && slot < num_slots;
      s_orow[tid] = real ? slot : -1;
      s_xrow[tid] = real ? slot / gdiv : -1;
    }
    __syncthreads();
    // the valid prefix (a used expert's block starts with a valid row), at most the rows shared memory was sized for
    M = 0;
    while (M < max_rows && s_orow[M] >= 0) ++M;
    if (M == 0) return;
    qweight = static_cast<const char*>(qweight) + static_cast<size_t>(ex) * K * N / 2;  // K/16 rows of 8N bytes
    const size_t soff = static_cast<size_t>(ex) * expert_srows * N * 2;
    scales = static_cast<const char*>(scales) + soff;
    zeros = static_cast<const char*>(zeros) + soff;
  }
  // activation row of token row r (QD_GROUPED: gathered through the plan)
  auto xrow_of = [&](int r) { return GROUPED ? s_xrow[r] : r; };
  const int kslice = warp % WARPS, nsl = warp / WARPS;
  const int nb0 = blockIdx.x * (RB * NW);  // first channel block (n16 A-side, n64 B-side) of this CTA
  const int nbw = nb0 + nsl * RB;          // ... of this warp
  const int s_beg = blockIdx.y * steps_per_split;
  const int s_end = min(s_beg + steps_per_split, K >> 6);
  const int nsteps = s_end - s_beg;  // > 0: the launcher drops empty splits
  const int per_warp = (nsteps + WARPS - 1) / WARPS;
  const int w_beg = s_beg + kslice * per_warp;
  const int w_n = max(0, min(per_warp, s_end - w_beg));

  unsigned char* ring = smem + warp * STAGES * STAGE_BYTES;
  unsigned char* xs = smem + RING_BYTES;
  const int kr = nsteps * 64;              // x columns this CTA holds
  const int xpitch = kr * 2 + 16;          // = 16 mod 128: the 8 rows of an ldmatrix hit distinct banks
  const char* x = static_cast<const char*>(xp);

  // ---- x[:, K range] -> shared (first cp.async group; empty with QD_ACT, whose x is staged after the weight
  // stages are issued, below). With one warp group (NW = 1) every warp reads only the x columns of its own k-slice,
  // so it copies just those and waits for nothing else: no CTA barrier before the loop. With NW > 1 the groups share
  // each slice, and the CTA copies it once.
  const int x_c0 = NW == 1 ? (w_beg - s_beg) * 8 : 0;  // first 16-byte chunk of a row, count per row
  const int x_cn = NW == 1 ? w_n * 8 : kr >> 3;
  const int x_t0 = NW == 1 ? lane : tid, x_step = NW == 1 ? 32 : THREADS;
  if constexpr (!X_LATE) {
    for (int idx = x_t0; idx < M * x_cn; idx += x_step) {
      const int r = idx / x_cn, c = x_c0 + idx - r * x_cn;
      cp_async16(smem_u32(xs + r * xpitch + c * 16), x + (static_cast<size_t>(xrow_of(r)) * K + s_beg * 64 + c * 8) * 2,
                 true);
    }
  }
  cp_async_commit();

  // ---- one k64 step of this warp: RB x WCHUNKS weight chunks (16 bytes a lane each), then RB x GPS lines of
  // scales and zeros (one 16-byte chunk for each of the first S_CHUNKS lanes). Per-lane sources and destinations
  // are fixed; a step only adds its row offsets.
  const size_t wrow = static_cast<size_t>(N) * 32;  // bytes per k64 row, both layouts (A: 1 row, B: 4 k16 rows)
  const char* wsrc = static_cast<const char*>(qweight) + static_cast<size_t>(nbw) * 512 + lane * 16;
  const uint32_t ring_u32 = smem_u32(ring);
  const bool s_lane = lane < S_CHUNKS;
  constexpr int LINE_CHUNKS = S_LINE / 16;  // chunks per (block, scale row): first half scales, second zeros
  const int s_rb = lane / (GPS * LINE_CHUNKS), s_gi = (lane / LINE_CHUNKS) % GPS, s_c = lane % LINE_CHUNKS;
  const int s_sz = s_c >= LINE_CHUNKS / 2, s_off = (s_c % (LINE_CHUNKS / 2)) * 16;
  const char* ssrc = static_cast<const char*>(s_sz ? zeros : scales) + (nbw + s_rb) * CH * 2 + s_off;
  const uint32_t sdst = W_BYTES + (s_rb * GPS + s_gi) * S_LINE + s_sz * (S_LINE / 2) + s_off;
  const size_t srow = static_cast<size_t>(N) * 2;  // bytes per scale row
  auto load_stage = [&](int i) {
    if (i < w_n) {
      const int s = w_beg + i;
      const uint32_t st = ring_u32 + (i % STAGES) * STAGE_BYTES;
      const char* src = wsrc + s * wrow;
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int j = 0; j < WCHUNKS; ++j)  // B-side: k16 row j of the step (row stride 8N bytes)
          cp_async16(st + (rb * WCHUNKS + j) * 512 + lane * 16, src + rb * 512 + j * (wrow / 4), true);
      if (s_lane) {
        const int row = GPS == 2 ? 2 * s + s_gi : (s >> gshift);
        cp_async16(st + sdst, ssrc + row * srow, true);
      }
    }
    cp_async_commit();  // always: keeps the group count uniform
  };

#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) load_stage(j);
  if constexpr (PDL) {  // everything above read only weights; the previous kernel's output is needed from here
    griddep_wait();
    griddep_launch_dependents();
  }
  if constexpr (X_LATE) {  // x (ACT: act(gate) * up from the [M, 2K] product), 8 columns per 16-byte chunk
    for (int idx = x_t0; idx < M * x_cn; idx += x_step) {
      const int r = idx / x_cn, c = x_c0 + idx - r * x_cn;
      const char* gp = x + (static_cast<size_t>(xrow_of(r)) * (ACT ? 2 : 1) * K + s_beg * 64 + c * 8) * 2;
      uint4 v;
      if constexpr (ACT != 0) {
        const uint4 gv = PDL ? __ldcg(reinterpret_cast<const uint4*>(gp)) : ldg128(gp);
        const uint4 uv = PDL ? __ldcg(reinterpret_cast<const uint4*>(gp + static_cast<size_t>(K) * 2))
                             : ldg128(gp + static_cast<size_t>(K) * 2);
        uint32_t o[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 g2 = unpack2<DT>(u4_get(gv, w)), u2 = unpack2<DT>(u4_get(uv, w));
          o[w] = pack2<DT>(gate_act(g2.x, u2.x), gate_act(g2.y, u2.y));
        }
        v = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
        v = __ldcg(reinterpret_cast<const uint4*>(gp));
      }
      *reinterpret_cast<uint4*>(xs + r * xpitch + c * 16) = v;
    }
  }
  cp_async_wait<STAGES - 1>();  // the x group (this thread's copies)
  if constexpr (NW == 1) {
    __syncwarp();  // ... and the other lanes' copies of this warp's slice
  } else {
    __syncthreads();
  }

  // ldmatrix.x4 row addresses. A-side (x = B operand): lane supplies row (lane & 7) = token 8 nt + (lane & 7) of
  // matrix j = lane >> 3 (k offset 8 j: b0, b1 of k16 steps 2h, 2h + 1). B-side (x = A operand, m16 x k16): matrix
  // j holds tokens 8 (j & 1) .. + 7 and k offset 8 (j >> 1). Token rows >= M read row M - 1 instead: an mma output
  // element depends on one token's x only, so those rows only feed output columns (A) / rows (B) that are dropped.
  uint32_t xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int t = WB ? 8 * ((lane >> 3) & 1) + (lane & 7) : 8 * nt + (lane & 7);
    const int koff = WB ? 8 * (lane >> 4) : 8 * (lane >> 3);
    xrow[nt] = smem_u32(xs + min(t, M - 1) * xpitch + koff * 2);
  }

  float acc[RB][NACC][4];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int nt = 0; nt < NACC; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rb][nt][e] = 0.f;

  for (int i = 0; i < w_n; ++i) {
    cp_async_wait<STAGES - 2>();  // step i has landed (for this lane)
    __syncwarp();                 // ... for every lane, and every lane is done with step i - 1's slot
    load_stage(i + STAGES - 1);
    const uint32_t st = smem_u32(ring + (i % STAGES) * STAGE_BYTES);
    const int kloc = (w_beg - s_beg + i) * 64;

    // x fragments of the 4 k16 steps: xf[step][nt][reg]
    uint32_t xf[4][NT][WB ? 4 : 2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if constexpr (WB) {
#pragma unroll
        for (int j = 0; j < 4; ++j) ldmatrix_x4(xf[j][nt], xrow[nt] + 2 * (kloc + 16 * j));
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t r[4];
          ldmatrix_x4(r, xrow[nt] + 2 * (kloc + 32 * h));
          xf[2 * h][nt][0] = r[0];
          xf[2 * h][nt][1] = r[1];
          xf[2 * h + 1][nt][0] = r[2];
          xf[2 * h + 1][nt][1] = r[3];
        }
      }
    }

#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
      for (int gi = 0; gi < GPS; ++gi) {
        const uint32_t sline = st + W_BYTES + (rb * GPS + gi) * S_LINE;
        if constexpr (!WB) {
          const uint4 wv = lds128(st + rb * 512 + lane * 16);
          const int zslot = 4 * (lane >> 2);  // this lane's (row 0, row 1) pair inside a 32-byte line
          const uint32_t s2 = lds32(sline + zslot);
          const uint32_t z2 = lds32(sline + 32 + zslot);
          uint32_t zr0, zr1;
          zero_consts<DT>(z2, zr0, zr1);
          float part[NT][4];
#pragma unroll
          for (int j = 0; j < WPG; ++j) {
            const int w = gi * WPG + j;
            uint32_t a[4];
            dequant_a<DT>(u4_get(wv, w), zr0, zr1, a);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_part<DT>(part[nt], a, xf[w][nt][0], xf[w][nt][1], j == 0);
          }
          const float2 sf = unpack2<DT>(s2);  // (scale of row 0, scale of row 1)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            acc[rb][nt][0] = fmaf(sf.x, part[nt][0], acc[rb][nt][0]);
            acc[rb][nt][1] = fmaf(sf.x, part[nt][1], acc[rb][nt][1]);
            acc[rb][nt][2] = fmaf(sf.y, part[nt][2], acc[rb][nt][2]);
            acc[rb][nt][3] = fmaf(sf.y, part[nt][3], acc[rb][nt][3]);
          }
        } else {
          // zeros of the lane's column lane/4 of tiles 0..7 (slots 8 (lane/4) ..); scales of columns 2c, 2c+1
          // of tiles 0..7 (slots 16c .. 16c + 15): sA = column 2c, sB = column 2c + 1 (c = lane % 4)
          const uint4 zv = lds128(sline + 128 + 16 * (lane >> 2));
          const uint4 sa = lds128(sline + 32 * (lane & 3));
          const uint4 sb = lds128(sline + 32 * (lane & 3) + 16);
          uint32_t nz[4], nz16[4];
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const uint32_t z2 = u4_get(zv, w);
            nz[w] = neg_magic_zero<DT>(z2);
            nz16[w] = DT == 0 ? fma2<0>(z2, 0xBC00BC00u, 0xD400D400u) : nz[w];
          }
          float part[8][4];
#pragma unroll
          for (int j = 0; j < WPG; ++j) {  // k16 rows of this scale group
            const int kk = gi * WPG + j;
            const uint4 wv = lds128(st + (rb * WCHUNKS + kk) * 512 + lane * 16);
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              uint32_t b[4];
              dequant_b<DT>(u4_get(wv, w), nz[w], nz16[w], b);
              mma_part<DT>(part[2 * w], xf[kk][0], b[0], b[1], j == 0);
              mma_part<DT>(part[2 * w + 1], xf[kk][0], b[2], b[3], j == 0);
            }
          }
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const uint32_t pa = u4_get(sa, t / 2), pb = u4_get(sb, t / 2);
            const float s0 = (t & 1) ? unpack2<DT>(pa).y : unpack2<DT>(pa).x;
            const float s1 = (t & 1) ? unpack2<DT>(pb).y : unpack2<DT>(pb).x;
            acc[rb][t][0] = fmaf(s0, part[t][0], acc[rb][t][0]);
            acc[rb][t][1] = fmaf(s1, part[t][1], acc[rb][t][1]);
            if (M > 8) {
              acc[rb][t][2] = fmaf(s0, part[t][2], acc[rb][t][2]);
              acc[rb][t][3] = fmaf(s1, part[t][3], acc[rb][t][3]);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: reuse it for the k-slice reduction

  // ---- the WARPS k-slices meet in shared memory, summed in k-slice order
  float* red = reinterpret_cast<float*>(smem);  // [WARPS][NW x RB][NACC][4][32]
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int nt = 0; nt < NACC; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        red[((((kslice * NW + nsl) * RB + rb) * NACC + nt) * 4 + e) * 32 + lane] = acc[rb][nt][e];
  __syncthreads();

  constexpr int ELEMS = NW * RB * NACC * 4 * 32;
  const bool split = !GROUPED && gridDim.y > 1;
  const size_t mn = static_cast<size_t>(M) * N;
  for (int idx = tid; idx < ELEMS; idx += THREADS) {
    const int l = idx & 31, e = (idx >> 5) & 3, nt = (idx >> 7) % NACC, rb = idx / (128 * NACC);  // rb < NW x RB
    // C fragment: c_e of lane l is row l/4 + 8 (e/2), column 2 (l%4) + e%2 of its tile; rows are channels
    // (A-side) or tokens (B-side)
    const int row = (l >> 2) + 8 * (e >> 1), col = 2 * (l & 3) + (e & 1);
    const int token = WB ? row : 8 * nt + col;
    const int chan = (nb0 + rb) * CH + (WB ? 8 * nt + col : row);
    if (token >= M) continue;
    float v = red[idx];
#pragma unroll 4
    for (int w = 1; w < WARPS; ++w) v += red[w * ELEMS + idx];
    if constexpr (GROUPED) {
      const int slot = s_orow[token];
      if (topk_w != nullptr) v *= __ldg(topk_w + slot);
      store16(static_cast<char*>(out) + (static_cast<size_t>(slot) * N + chan) * 2, v);
      continue;
    }
    const size_t o = static_cast<size_t>(token) * N + chan;
    if (split) {
      ws[blockIdx.y * mn + o] = v;
    } else {
      if (bias != nullptr) v += load16(static_cast<const char*>(bias) + chan * 2);
      store16(static_cast<char*>(out) + o * 2, v);
    }
  }
  if (!split) {
    if constexpr (NORM) {
      norm_tail(M, N, static_cast<char*>(out), static_cast<const char*>(nres), static_cast<const char*>(nweight),
                static_cast<char*>(normed), neps, noffset, counters + gridDim.x, tid, reinterpret_cast<float*>(smem));
    }
    return;
  }

  // ---- split-k: the last CTA of this channel tile sums every split in order 0, 1, ... and writes the output
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int idx = tid; idx < M * NW * RB * CH; idx += THREADS) {
    const int token = idx / (NW * RB * CH);
    const int chan = nb0 * CH + idx - token * (NW * RB * CH);
    const size_t o = static_cast<size_t>(token) * N + chan;
    float v = __ldcg(ws + o);
    for (int z = 1; z < static_cast<int>(gridDim.y); ++z) v += __ldcg(ws + z * mn + o);
    if (bias != nullptr) v += load16(static_cast<const char*>(bias) + chan * 2);
    store16(static_cast<char*>(out) + o * 2, v);
  }
  if (tid == 0) counters[blockIdx.x] = 0;  // zero again for the next launch on this stream
  if constexpr (NORM) {
    norm_tail(M, N, static_cast<char*>(out), static_cast<const char*>(nres), static_cast<const char*>(nweight),
              static_cast<char*>(normed), neps, noffset, counters + gridDim.x, tid, reinterpret_cast<float*>(smem));
  }
}
