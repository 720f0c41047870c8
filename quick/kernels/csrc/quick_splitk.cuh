// quick_splitk.cuh: the deterministic split-k reduction shared by the GEMM and the GEMV.
//
// Split z of a kernel writes its fp32 partial product to ws[z][M][N]; this kernel sums the splits in
// the fixed order z = 0, 1, ..., adds the bias and rounds once to the output type. Same inputs, same
// bits, on every run and any schedule (no atomics).
#pragma once

#include "quick_common.cuh"

#ifndef QK_DTYPE
#define QK_DTYPE 0
#endif

extern "C" __global__ void __launch_bounds__(256) quick_splitk_reduce(
    const float* __restrict__ ws, const void* __restrict__ bias, void* __restrict__ out, int M, int N, int splits) {
  using namespace quick;
  constexpr int DT = QK_DTYPE;
  const size_t total4 = static_cast<size_t>(M) * N / 4;  // N % 64 == 0
  const size_t mn = static_cast<size_t>(M) * N;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total4;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float4 acc = sum_splits4(ws, i, mn, splits);
    if (bias != nullptr) {
      float2 b01, b23;
      load_quad<DT>(bias, static_cast<int>((i * 4) % N), b01, b23);
      acc.x += b01.x;
      acc.y += b01.y;
      acc.z += b23.x;
      acc.w += b23.y;
    }
    uint2 o;
    o.x = pack2<DT>(acc.x, acc.y);
    o.y = pack2<DT>(acc.z, acc.w);
    reinterpret_cast<uint2*>(out)[i] = o;
  }
}
