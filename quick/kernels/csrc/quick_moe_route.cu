// quick_moe_route.cu: a mixture-of-experts router's top-k and the sorted-token plan of its picks, in one launch.
//
// From the router logits [T, E] it computes what the families' routers compute with six to eight PyTorch kernels
// (quick/models/moe.py: route): the softmax over the experts in fp32, the top_k largest probabilities (ties and
// NaN as torch.topk orders them: NaN first, then the lower expert id), optionally divided by their sum; it writes
// the expert ids (int64, as torch.topk returns them) and the weights, then, when asked (block_size > 0), builds
// the plan of those ids (quick_moe_plan.cuh) from shared memory, so the experts' kernels can start right away.
//
// One CTA: a warp per token (tokens strided over the warps), each lane holding EPL of the token's logits in
// registers; top_k rounds of a warp arg-max pick the experts. Sized for decode batches like the plan kernel.
//
// Compile-time configuration (-D): QR_DTYPE (the logits' type: 0 fp16, 1 bf16), QR_EPL (logits per lane: the
// kernel takes E <= 32 * QR_EPL). Run time: wmode 0 writes fp32 weights, 1 fp32 weights rounded through the
// logits' type (a router that casts its weights, read by a kernel that wants fp32), 2 weights in the logits' type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quick_moe_plan.cuh"

#ifndef QR_DTYPE
#define QR_DTYPE 1
#endif
#ifndef QR_EPL
#define QR_EPL 4
#endif

#if QR_DTYPE == 0
typedef __half qr_t;
__device__ __forceinline__ float qr_to_float(qr_t v) { return __half2float(v); }
__device__ __forceinline__ qr_t qr_from_float(float v) { return __float2half_rn(v); }
#else
typedef __nv_bfloat16 qr_t;
__device__ __forceinline__ float qr_to_float(qr_t v) { return __bfloat162float(v); }
__device__ __forceinline__ qr_t qr_from_float(float v) { return __float2bfloat16_rn(v); }
#endif

namespace {
constexpr int THREADS = QR_EPL > 8 ? 512 : 1024;  // 32 logits per lane need more than 64 registers
constexpr int WARPS = THREADS / 32;
constexpr int MAX_SLOTS = 4096;  // the launcher refuses more

// torch.topk's order: NaN above every number, then larger values, then (our choice on exact ties) lower ids.
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    quick_moe_route(const qr_t* __restrict__ logits, long long* __restrict__ ids, void* __restrict__ weights,
                    int* __restrict__ sorted_ids, int* __restrict__ block_experts, int* __restrict__ offsets,
                    int* __restrict__ counts, int* __restrict__ num_padded, int tokens, int num_experts, int top_k,
                    int renormalize, int wmode, int block_size, int capacity) {
  __shared__ int picked[MAX_SLOTS];
  __shared__ quick_moe::PlanSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = num_experts;

  for (int t = warp; t < tokens; t += WARPS) {
    const qr_t* row = logits + static_cast<size_t>(t) * E;
    float p[QR_EPL];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < QR_EPL; ++j) {
      const int e = j * 32 + lane;
      p[j] = e < E ? qr_to_float(row[e]) : -INFINITY;
      mx = fmaxf(mx, p[j]);
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) mx = fmaxf(mx, __shfl_xor_sync(quick_moe::FULL, mx, d));
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < QR_EPL; ++j) {
      p[j] = j * 32 + lane < E ? expf(p[j] - mx) : 0.f;
      sum += p[j];
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(quick_moe::FULL, sum, d);
    bool live[QR_EPL];  // not yet picked and a real expert
#pragma unroll
    for (int j = 0; j < QR_EPL; ++j) {
      p[j] = p[j] / sum;
      live[j] = j * 32 + lane < E;
    }

    float mine_w = 0.f, picked_sum = 0.f;
    int mine_id = E;
    for (int r = 0; r < top_k; ++r) {
      float bv = 0.f;
      int bi = E;  // no live candidate left (cannot happen for top_k <= E): a dropped slot
#pragma unroll
      for (int j = 0; j < QR_EPL; ++j) {
        const int e = j * 32 + lane;
        if (live[j] && (bi == E || before(p[j], e, bv, bi))) {
          bv = p[j];
          bi = e;
        }
      }
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        const float ov = __shfl_xor_sync(quick_moe::FULL, bv, d);
        const int oi = __shfl_xor_sync(quick_moe::FULL, bi, d);
        if (oi != E && (bi == E || before(ov, oi, bv, bi))) {
          bv = ov;
          bi = oi;
        }
      }
#pragma unroll
      for (int j = 0; j < QR_EPL; ++j) live[j] = live[j] && j * 32 + lane != bi;
      if (lane == r) {
        mine_w = bv;
        mine_id = bi;
      }
      picked_sum += bv;
    }
    if (lane < top_k) {
      const int slot = t * top_k + lane;
      const float w = renormalize ? mine_w / picked_sum : mine_w;
      ids[slot] = mine_id;
      picked[slot] = mine_id;
      if (wmode == 2) {
        static_cast<qr_t*>(weights)[slot] = qr_from_float(w);
      } else {
        static_cast<float*>(weights)[slot] = wmode == 1 ? qr_to_float(qr_from_float(w)) : w;
      }
    }
  }
  if (block_size <= 0) return;  // uniform across the CTA: no plan asked for
  __syncthreads();
  quick_moe::build_plan<THREADS>(picked, sorted_ids, block_experts, offsets, counts, num_padded, tokens * top_k, E,
                                 block_size, capacity, sm);
}
