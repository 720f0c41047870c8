// quick_moe_route.cu: a mixture-of-experts router's top-k and the sorted-token plan of its batch in one launch.
//
// From the router logits [tokens, E] (16-bit, row stride `stride`): the softmax over the experts in fp32, the top_k
// largest probabilities (ties to the lower expert id; a NaN counts as the largest, as torch.topk orders it), divided
// by their sum when `renormalize`, optionally rounded through the logits' dtype (families whose router casts the
// weights back). Writes the expert ids (int64, as torch.topk returns them) and fp32 weights [tokens, top_k], then
// the plan of those ids (quick_moe_plan.cuh) from shared memory. Replaces the softmax, top-k, sum, divide, cast and
// plan kernels of a decode step's router with one.
//
// One CTA of qplan::THREADS threads; warp w routes tokens w, w + 32, ...: lane l holds experts l, l + 32, ... (EPL of
// them, -1 past E), a warp max and sum give the softmax, and each of the top_k rounds is a warp arg-max whose
// winner drops its entry. Sized for decode batches: the launcher takes at most ROUTE_MAX_SLOTS slots.
//
// Compile-time configuration (-D): QR_BF16 (1: bf16 logits, 0: fp16), QR_EPL (experts per lane: E <= 32 * QR_EPL).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "quick_moe_plan.cuh"

#ifndef QR_BF16
#define QR_BF16 1
#endif
#ifndef QR_EPL
#define QR_EPL 4
#endif

#if QR_BF16
typedef __nv_bfloat16 qr_t;
__device__ __forceinline__ float qr_load(const qr_t* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float qr_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
#else
typedef __half qr_t;
__device__ __forceinline__ float qr_load(const qr_t* p) { return __half2float(*p); }
__device__ __forceinline__ float qr_round(float v) { return __half2float(__float2half_rn(v)); }
#endif

namespace {
constexpr int MAX_SLOTS = 4096;  // the launcher's ROUTE_MAX_SLOTS
constexpr int WARPS = qplan::THREADS / 32;
constexpr float TAKEN = -1.0f;  // below every probability: entries past E and entries already chosen

// (a, ia) ranks before (b, ib): NaN first, then the larger value, then the lower id.
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an != bn) return an;
  if (!an && a != b) return a > b;
  return ia < ib;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(qplan::THREADS)
    quick_moe_route(const qr_t* __restrict__ logits, long long* __restrict__ ids_out, float* __restrict__ weights_out,
                    int* __restrict__ sorted_ids, int* __restrict__ block_experts, int* __restrict__ offsets,
                    int* __restrict__ counts, int* __restrict__ num_padded, int tokens, int stride, int num_experts,
                    int top_k, int renormalize, int round_weights, int block_size, int capacity) {
  __shared__ int chosen[MAX_SLOTS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = num_experts;

  for (int t = warp; t < tokens; t += WARPS) {
    const qr_t* row = logits + static_cast<long long>(t) * stride;
    float v[QR_EPL];
    float mx = -INFINITY;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < QR_EPL; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < E ? qr_load(row + e) : -INFINITY;
      nan |= isnan(v[i]);
      mx = fmaxf(mx, v[i]);
    }
#pragma unroll
    for (int d = 16; d; d >>= 1) mx = fmaxf(mx, __shfl_xor_sync(qplan::FULL, mx, d));
    nan = __any_sync(qplan::FULL, nan);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < QR_EPL; ++i) {
      v[i] = lane + 32 * i < E ? expf(v[i] - mx) : 0.f;  // an all -inf row gives NaN, as torch's softmax does
      sum += v[i];
    }
#pragma unroll
    for (int d = 16; d; d >>= 1) sum += __shfl_xor_sync(qplan::FULL, sum, d);
    const float inv = 1.f / sum;
#pragma unroll
    for (int i = 0; i < QR_EPL; ++i) v[i] = lane + 32 * i < E ? (nan ? NAN : v[i] * inv) : TAKEN;

    float mine = 0.f;  // lane j < top_k keeps the j-th choice
    int mine_id = 0;
    for (int j = 0; j < top_k; ++j) {
      float bv = v[0];
      int bi = lane;
#pragma unroll
      for (int i = 1; i < QR_EPL; ++i) {
        if (before(v[i], lane + 32 * i, bv, bi)) {
          bv = v[i];
          bi = lane + 32 * i;
        }
      }
#pragma unroll
      for (int d = 16; d; d >>= 1) {
        const float ov = __shfl_xor_sync(qplan::FULL, bv, d);
        const int oi = __shfl_xor_sync(qplan::FULL, bi, d);
        if (before(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == j) {
        mine = bv;
        mine_id = bi;
      }
      if ((bi & 31) == lane) {
#pragma unroll
        for (int i = 0; i < QR_EPL; ++i)
          if (lane + 32 * i == bi) v[i] = TAKEN;
      }
    }
    if (renormalize) {
      float s = lane < top_k ? mine : 0.f;
#pragma unroll
      for (int d = 16; d; d >>= 1) s += __shfl_xor_sync(qplan::FULL, s, d);
      mine = mine / s;
    }
    if (round_weights) mine = qr_round(mine);
    if (lane < top_k) {
      const int slot = t * top_k + lane;
      ids_out[slot] = mine_id;
      weights_out[slot] = mine;
      chosen[slot] = mine_id;
    }
  }
  __syncthreads();
  qplan::build(chosen, sorted_ids, block_experts, offsets, counts, num_padded, tokens * top_k, num_experts,
               block_size, capacity);
}
