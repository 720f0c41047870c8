// quick_actquant.cu: per-token symmetric int8 quantization of the activations for the W4A8 kernels.
//
// x [M, K] fp16/bf16 -> x_q int8 [M, K], s_x fp32 [M], bit for bit what quick.formats.w4a8.
// quantize_activations() computes in fp32 on a CUDA tensor: amax = max|x|; inv = 127 / amax (0 if amax == 0),
// which torch evaluates as reciprocal(amax) * 127 (two IEEE roundings, on CPU and CUDA alike);
// x_q = clamp(rint(x * inv), -127, 127) (round half to even); s_x = amax / 127, which torch on CUDA evaluates
// as amax * fl(1/127) (on CPU it divides: s_x can differ from the CPU's by one ulp, x_q cannot). Explicit
// rn operations, no contraction, so the result does not depend on the schedule. One CTA per row; a thread keeps up to VPT 16-byte pieces of its row in registers between
// the max pass and the quantization pass (K <= 8 * THREADS * VPT never re-reads global memory).
//
// Entry points: quick_actquant_f16, quick_actquant_bf16 (x, x_q, s_x, xsum, M, K); K % 8 == 0, 16-byte aligned
// rows. xsum (may be null; needs K % 128 == 0): int32 [M, K/128], the sum of x_q over each group of 128 columns
// (the zero-point correction of the W4A8 GEMM's unsigned-weight variant).
#include "quick_rowquant.cuh"

namespace {

constexpr int THREADS = 512;
constexpr int VPT = 2;

// Quantize one 16-byte piece i of the row (if i < nvec) and, when xsum is given, write the sum of x_q over each
// group of 128 columns (16 pieces = 16 consecutive lanes: a half-warp reduction). Called by every thread of the
// block the same number of times (the shuffles need the whole warp).
template <int DT>
__device__ __forceinline__ void quant_piece(const uint4& v, bool valid, int i, float inv, uint2* qr, int* xs) {
  int sum = 0;
  if (valid) {
    const uint2 q = quick::quant8<DT>(v, inv);
    qr[i] = q;
    sum = __dp4a(static_cast<int>(q.x), 0x01010101, __dp4a(static_cast<int>(q.y), 0x01010101, 0));  // signed bytes
  }
  if (xs != nullptr) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (valid && (i & 15) == 0) xs[i >> 4] = sum;
  }
}

template <int DT>
__device__ __forceinline__ void actquant(const void* __restrict__ xp, int8_t* __restrict__ xq, float* __restrict__ sx,
                                         int* __restrict__ xsum, int K) {
  __shared__ float red[THREADS / 32];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int nvec = K / 8;
  const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const char*>(xp) + static_cast<size_t>(row) * K * 2);
  uint2* qr = reinterpret_cast<uint2*>(xq + static_cast<size_t>(row) * K);

  uint4 cache[VPT];
  float amax = 0.f;
  quick::load_row_cache<THREADS>(cache, xr, tid, nvec);
#pragma unroll
  for (int v = 0; v < VPT; ++v) amax = quick::absmax<DT>(cache[v], amax);
  for (int i = tid + VPT * THREADS; i < nvec; i += THREADS) amax = quick::absmax<DT>(quick::ldg128(xr + i), amax);
  amax = quick::block_reduce<true, THREADS / 32, false>(amax, red);

  const float inv = amax > 0.f ? __fmul_rn(__frcp_rn(amax), 127.f) : 0.f;
  int* xs = xsum != nullptr ? xsum + static_cast<size_t>(row) * (K / 128) : nullptr;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = tid + v * THREADS;
    quant_piece<DT>(cache[v], i < nvec, i, inv, qr, xs);
  }
  for (int base = VPT * THREADS; base < nvec; base += THREADS) {  // same trip count in every thread
    const int i = base + tid;
    const bool valid = i < nvec;
    quant_piece<DT>(valid ? quick::ldg128(xr + i) : make_uint4(0, 0, 0, 0), valid, i, inv, qr, xs);
  }
  if (tid == 0) sx[row] = __fmul_rn(amax, 1.0f / 127.0f);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) quick_actquant_f16(const void* __restrict__ x,
                                                                         int8_t* __restrict__ xq,
                                                                         float* __restrict__ sx,
                                                                         int* __restrict__ xsum, int M, int K) {
  if (static_cast<int>(blockIdx.x) < M) actquant<0>(x, xq, sx, xsum, K);
}

extern "C" __global__ void __launch_bounds__(THREADS) quick_actquant_bf16(const void* __restrict__ x,
                                                                          int8_t* __restrict__ xq,
                                                                          float* __restrict__ sx,
                                                                          int* __restrict__ xsum, int M, int K) {
  if (static_cast<int>(blockIdx.x) < M) actquant<1>(x, xq, sx, xsum, K);
}
