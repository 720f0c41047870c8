// quick_rowquant.cuh: per-row symmetric int8 quantization pieces of quick_actquant.cu and quick_normquant.cu (one
// CTA per row, a row as 16-byte pieces of 8 fp16/bf16 elements). Both kernels must quantize bit for bit alike.
#pragma once

#include "quick_common.cuh"

namespace quick {

template <int DT>
__device__ __forceinline__ void to_float8(const uint4& v, float f[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = unpack2<DT>(u4_get(v, i));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// cache[v] = piece tid + v * THREADS of the row (zero past nvec): a thread's pieces, kept in registers between passes
template <int THREADS, int VPT>
__device__ __forceinline__ void load_row_cache(uint4 (&cache)[VPT], const uint4* row, int tid, int nvec) {
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = tid + v * THREADS;
    cache[v] = make_uint4(0, 0, 0, 0);
    if (i < nvec) cache[v] = ldg128(row + i);
  }
}

// max that keeps a NaN (torch's amax does): such a row gets s_x = NaN instead of silently finite outputs
__device__ __forceinline__ float nanmax(float a, float b) { return (b > a || b != b) ? b : a; }

// acc = f(acc, x) over the 8 elements of a piece, in element order (a fixed order keeps float sums reproducible)
template <int DT, typename F>
__device__ __forceinline__ float fold8(const uint4& v, float acc, F&& f) {
  float x[8];
  to_float8<DT>(v, x);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc = f(acc, x[e]);
  return acc;
}

template <int DT>
__device__ __forceinline__ float absmax(const uint4& v, float m) {
  return fold8<DT>(v, m, [](float a, float x) { return nanmax(a, fabsf(x)); });
}

// 4 int8 of clamp(rint(f * inv), -127, 127) in one word (element i in byte i)
__device__ __forceinline__ uint32_t quant4(const float* f, float inv) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int q = __float2int_rn(__fmul_rn(f[i], inv));  // rint: round half to even
    q = max(-127, min(127, q));
    r |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * i);
  }
  return r;
}

// The 8 int8 of one piece
template <int DT>
__device__ __forceinline__ uint2 quant8(const uint4& v, float inv) {
  float f[8];
  to_float8<DT>(v, f);
  return make_uint2(quant4(f, inv), quant4(f + 4, inv));
}

// Block-wide sum (MAX = false) or NaN-keeping max in a fixed order: shuffle tree per warp, then warps in order.
// RED_REUSED: red served an earlier reduction, so wait for its readers before overwriting it.
template <bool MAX, int NWARPS, bool RED_REUSED = true>
__device__ __forceinline__ float block_reduce(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? nanmax(v, u) : v + u;
  }
  const int tid = threadIdx.x;
  if constexpr (RED_REUSED) __syncthreads();
  if ((tid & 31) == 0) red[tid >> 5] = v;
  __syncthreads();
  v = red[0];
#pragma unroll
  for (int w = 1; w < NWARPS; ++w) v = MAX ? nanmax(v, red[w]) : v + red[w];
  return v;
}

}  // namespace quick
