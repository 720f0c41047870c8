// quick_attn.cu: one-token (decode) attention of every sequence over a static KV cache, split over the cache.
//
// Why: in a batch-1 decode step of a 7B model, cuDNN's SDPA takes ~6.9 us per layer for one query over 256 cached
// positions (H200 profile): 32 CTAs (one per head) walking the cache, and every position up to the
// cache's end read although the causal mask hides those after `pos`. This kernel
// * reads only positions 0..pos (`pos` is a device scalar, so a captured CUDA graph replays for every step),
// * splits them over gridDim.x CTAs per (sequence, key/value head) so that a batch of one still fills the GPU,
// * serves the QA_G query heads of one key/value head (grouped-query attention) from each K/V row it loads,
// * keeps a running max / sum / accumulator per head in fp32 (base-2 exponentials, the scale folded into q),
// * and sums the splits in the last CTA to arrive (arrival counter per (sequence, kv head), reset by that CTA), in
//   split order: deterministic, one launch.
//
// Thread layout: a K/V row of QA_D 16-bit elements is QA_D / 8 lanes x 16 bytes (LPP lanes per position); a warp
// holds 32 / LPP positions at a time, the CTA's 4 warps PPI = 4 x 32 / LPP, and each lane keeps its 8 dimensions of
// every head: q (pre-scaled), the accumulator, and the row state (max, sum; equal across the LPP lanes).
// Positions are walked UNROLL x PPI at a time with all loads issued first.
//
// QA_ROPE = 1 also does the two small steps that precede the attention in a decode step, which otherwise cost two
// kernels per layer (~2.3 us at batch 1 on the H200): the rotary embedding (rotate-half, all D dimensions)
// of q and of the new key, and the cache append at `pos`. q, k_new and v_new are the q/k/v projections as they
// come (rows may be strided: views of one fused q/k/v product). Every CTA rotates its own q heads; the one CTA whose
// range holds `pos` also rotates the new key, stores the key and value rows at `pos`, and uses them from registers
// in its loop (no CTA reads row `pos` from memory in this launch, so the read-only loads stay valid). Rotated q and
// k are rounded to the model dtype, as the unfused path stores them. `pos` >= L writes nothing.
//
// QA_PDL = 1 (sm_90): launched as a programmatic dependent launch, the kernel waits for the previous kernel before
// it reads anything (griddepcontrol.wait), then lets the next one start (launch_dependents): the next kernel (the o
// projection) gets its CTAs resident and its weights in flight while this one runs.
//
// -D: QA_D (head dim 64, 128, 256), QA_G (query heads per kv head, 1..8), QA_DTYPE (0 fp16, 1 bf16), QA_ROPE (0/1),
// QA_PDL (0/1).
// Launcher: quick/kernels/attention.py.
#include "quick_common.cuh"

#ifndef QA_D
#define QA_D 128
#endif
#ifndef QA_G
#define QA_G 1
#endif
#ifndef QA_DTYPE
#define QA_DTYPE 0
#endif
#ifndef QA_ROPE
#define QA_ROPE 0
#endif
#ifndef QA_PDL
#define QA_PDL 0
#endif

namespace {
constexpr int D = QA_D;
constexpr int G = QA_G;
constexpr int DT = QA_DTYPE;
constexpr bool ROPE = QA_ROPE != 0;
constexpr bool PDL = QA_PDL != 0;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int LPP = D / 8;       // lanes per position
constexpr int PPW = 32 / LPP;    // positions per warp
constexpr int PPI = WARPS * PPW;  // positions per CTA step
constexpr int UNROLL = G >= 4 ? 2 : 4;  // position steps in flight (registers: G x 16 for q and the accumulators)
constexpr float NEG_BIG = -1.0e30f;  // running-max start: finite, so exp2(m_old - m_new) never sees inf - inf
static_assert(D == 64 || D == 128 || D == 256, "QA_D is 64, 128 or 256");
static_assert(G >= 1 && G <= 8, "QA_G is 1..8");

__device__ __forceinline__ void to_f32x8(const uint4 v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = quick::unpack2<DT>(w[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Rotate-half rotary of a lane's 8 dimensions: x (its own), xp (the partner dimensions D/2 away), cos/sin of its
// dimensions; `neg`: the lane's dimensions are in the first half (partner enters negated). Rounded to the model dtype.
__device__ __forceinline__ void rope8(const uint4 x, const uint4 xp, const float c[8], const float s[8], bool neg,
                                      float r[8]) {
  float a[8], p[8];
  to_f32x8(x, a);
  to_f32x8(xp, p);
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    const float lo = fmaf(a[i], c[i], (neg ? -p[i] : p[i]) * s[i]);
    const float hi = fmaf(a[i + 1], c[i + 1], (neg ? -p[i + 1] : p[i + 1]) * s[i + 1]);
    const float2 v = quick::unpack2<DT>(quick::pack2<DT>(lo, hi));  // the model dtype's rounding
    r[i] = v.x;
    r[i + 1] = v.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float r[8]) {
  return make_uint4(quick::pack2<DT>(r[0], r[1]), quick::pack2<DT>(r[2], r[3]), quick::pack2<DT>(r[4], r[5]),
                    quick::pack2<DT>(r[6], r[7]));
}

__device__ __forceinline__ float load_elt(const void* p, size_t i) {
  if constexpr (DT == 0) {
    return __half2float(static_cast<const __half*>(p)[i]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ void store_elt(void* p, size_t i, float v) {
  if constexpr (DT == 0) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}
}  // namespace

// q, out: [B, KV * G, D]; keys, values: [B, KV, L, D]; mask: additive, element (b, t) at b * mask_stride + t, or
// null; pos: int64 [1], positions 0..min(pos, L - 1) are attended; ws: fp32 [B * KV, S, G, D + 2] (S > 1 only);
// counters: int32 [B * KV], zero between launches; scale_log2 = softmax scale * log2(e).
// QA_ROPE: q is [B, KV * G * D] with row stride q_stride, k_new / v_new [B, KV * D] with row stride kv_stride,
// cos / sin [B, D] with row stride cs_stride (all in elements, unit stride inside a row); keys / values are
// written at row pos. Without QA_ROPE those five pointers and three strides are unused (null / 0).
extern "C" __global__ void __launch_bounds__(THREADS) quick_attn_decode(
    const void* __restrict__ q, const void* __restrict__ keys, const void* __restrict__ values,
    const void* __restrict__ mask, const long long* __restrict__ pos, void* __restrict__ out, float* __restrict__ ws,
    int* __restrict__ counters, int KV, int L, int mask_stride, float scale_log2, const void* __restrict__ k_new,
    const void* __restrict__ v_new, const void* __restrict__ rcos, const void* __restrict__ rsin, int q_stride,
    int kv_stride, int cs_stride) {
  using namespace quick;
  __shared__ float red[PPI][G][D + 2];  // per position slot: acc[D], then max, sum
  __shared__ int s_last;

  if constexpr (PDL) {
    griddep_wait();
    griddep_launch_dependents();
  }
  const int S = gridDim.x, split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const long long p_now = *pos;
  const int n = static_cast<int>(min(static_cast<long long>(L) - 1, p_now)) + 1;
  const int chunk = (n + S - 1) / S;
  const int t_beg = split * chunk, t_end = min(n, t_beg + chunk);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = warp * PPW + lane / LPP;  // this lane's position slot
  const int col = (lane % LPP) * 8;          // its 8 dimensions

  const size_t bk = static_cast<size_t>(b) * KV + kvh;  // (sequence, kv head)
  float qf[G][8];
  uint4 k_fresh = make_uint4(0, 0, 0, 0), v_fresh = k_fresh;  // QA_ROPE: the new row's 8 dimensions of this lane
  int t_fresh = -1;                                           // ... and its position, if this CTA's range holds it
  if constexpr (ROPE) {
    const bool neg = col < D / 2;
    const int pcol = neg ? col + D / 2 : col - D / 2;
    float c[8], s[8];
    const size_t cs_off = (static_cast<size_t>(b) * cs_stride + col) * 2;
    to_f32x8(ldg128(static_cast<const char*>(rcos) + cs_off), c);
    to_f32x8(ldg128(static_cast<const char*>(rsin) + cs_off), s);
    const char* qrow = static_cast<const char*>(q) + (static_cast<size_t>(b) * q_stride + kvh * G * D) * 2;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      rope8(ldg128(qrow + (g * D + col) * 2), ldg128(qrow + (g * D + pcol) * 2), c, s, neg, qf[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] *= scale_log2;
    }
    if (p_now < L && p_now >= t_beg && p_now < t_end) {
      t_fresh = static_cast<int>(p_now);
      const size_t kv_off = (static_cast<size_t>(b) * kv_stride + kvh * D) * 2;
      const char* krow = static_cast<const char*>(k_new) + kv_off;
      float r[8];
      rope8(ldg128(krow + col * 2), ldg128(krow + pcol * 2), c, s, neg, r);
      k_fresh = pack8(r);
      v_fresh = ldg128(static_cast<const char*>(v_new) + kv_off + col * 2);
      if (slot == (t_fresh - t_beg) % PPI) {  // one lane per 8 dimensions stores the row
        const size_t row = (bk * L + t_fresh) * D + col;
        *reinterpret_cast<uint4*>(const_cast<char*>(static_cast<const char*>(keys)) + row * 2) = k_fresh;
        *reinterpret_cast<uint4*>(const_cast<char*>(static_cast<const char*>(values)) + row * 2) = v_fresh;
      }
    }
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      to_f32x8(ldg128(static_cast<const char*>(q) + ((bk * G + g) * D + col) * 2), qf[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] *= scale_log2;
    }
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = NEG_BIG;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  const char* kb = static_cast<const char*>(keys) + (bk * L * D + col) * 2;
  const char* vb = static_cast<const char*>(values) + (bk * L * D + col) * 2;
  constexpr float LOG2E = 1.4426950408889634f;
  for (int t0 = t_beg; t0 < t_end; t0 += UNROLL * PPI) {  // uniform trip count: the shuffles need every lane
    uint4 kr[UNROLL], vr[UNROLL];
    float mk[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = t0 + u * PPI + slot;
      const bool ok = t < t_end;
      const bool fresh = ROPE && t == t_fresh;  // the row this launch writes: from registers
      kr[u] = ok && !fresh ? ldg128(kb + static_cast<size_t>(t) * D * 2) : k_fresh;
      vr[u] = ok && !fresh ? ldg128(vb + static_cast<size_t>(t) * D * 2) : v_fresh;
      mk[u] = !ok ? -INFINITY : (mask != nullptr ? load_elt(mask, static_cast<size_t>(b) * mask_stride + t) * LOG2E : 0.f);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[8], vf[8];
      to_f32x8(kr[u], kf);
      to_f32x8(vr[u], vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(qf[g][i], kf[i], s);
#pragma unroll
        for (int o = LPP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s += mk[u];  // -inf for slots past the end and masked positions: p = 0 below
        const float mn = fmaxf(m[g], s);
        const float c = exp2f(m[g] - mn), p = exp2f(s - mn);
        l[g] = fmaf(l[g], c, p);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(acc[g][i], c, p * vf[i]);
        m[g] = mn;
      }
    }
  }

  // ---- the PPI position slots meet in shared memory
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red[slot][g][col + i] = acc[g][i];
    if (lane % LPP == 0) {
      red[slot][g][D] = m[g];
      red[slot][g][D + 1] = l[g];
    }
  }
  __syncthreads();
  const bool split_k = S > 1;
  const size_t part = (bk * S + split) * G;  // this CTA's partials in ws, [G][D + 2]
  for (int idx = tid; idx < G * D; idx += THREADS) {
    const int g = idx / D, d = idx % D;
    float mx = NEG_BIG;
#pragma unroll
    for (int r = 0; r < PPI; ++r) mx = fmaxf(mx, red[r][g][D]);
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int r = 0; r < PPI; ++r) {
      const float w = exp2f(red[r][g][D] - mx);
      sum = fmaf(red[r][g][D + 1], w, sum);
      a = fmaf(red[r][g][d], w, a);
    }
    if (split_k) {
      float* w = ws + (part + g) * (D + 2);
      w[d] = a;
      if (d == 0) {
        w[D] = mx;
        w[D + 1] = sum;
      }
    } else {
      store_elt(out, (bk * G + g) * D + d, sum > 0.f ? a / sum : 0.f);
    }
  }
  if (!split_k) return;

  // ---- splits: the last CTA of this (sequence, kv head) sums them in split order
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + bk, 1) == S - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const float* all = ws + bk * S * G * (D + 2);
  for (int idx = tid; idx < G * D; idx += THREADS) {
    const int g = idx / D, d = idx % D;
    float mx = NEG_BIG;
    for (int z = 0; z < S; ++z) mx = fmaxf(mx, __ldcg(all + (z * G + g) * (D + 2) + D));
    float sum = 0.f, a = 0.f;
    for (int z = 0; z < S; ++z) {
      const float* w = all + (z * G + g) * (D + 2);
      const float f = exp2f(__ldcg(w + D) - mx);
      sum = fmaf(__ldcg(w + D + 1), f, sum);
      a = fmaf(__ldcg(w + d), f, a);
    }
    store_elt(out, (bk * G + g) * D + d, sum > 0.f ? a / sum : 0.f);
  }
  if (tid == 0) counters[bk] = 0;  // zero again for the next launch on this stream
}
