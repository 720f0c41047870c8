// quick_normquant.cu: (residual add +) RMSNorm + per-token int8 quantization for the W4A8 GEMMs, one launch.
//
// x [M, K] fp16/bf16 (+ resid [M, K]) -> x_q int8 [M, K], s_x fp32 [M] (what quick_actquant.cu writes for the
// normed rows), and optionally r = cast(resid + x) [M, K] (the new residual) and normed [M, K].
// Arithmetic (transformers' RMSNorm, as quick.kernels.decode.rms_norm, then quick.formats.w4a8's quantization):
//   r = cast(resid + x)                                    the add in fp32, rounded to the model dtype (like torch)
//   inv = rsqrt(sum(r^2) / K + eps)                        fp32, fixed reduction order per row
//   y = w * cast(r * inv)         (offset == 0: Llama)     two roundings to the model dtype, as torch does them
//   y = cast(r * inv * (offset + w))  (offset != 0: Gemma)
//   amax = max|y|; x_q = clamp(rint(y * (rcp(amax) * 127)), -127, 127); s_x = amax * fl(1/127)
// Explicit rn operations (no contraction). Only the sum of squares' order differs from torch's, so against the
// unfused norm + quick_actquant an element of y can differ by one ulp of the model dtype where the fp32 rms lands
// on a rounding boundary, and its x_q by one step; everything else is bit for bit.
//
// One CTA per row. Each thread keeps up to VPT 16-byte pieces of r (then of y) in registers between the passes
// (K <= 8 * THREADS * VPT = 16384 reads x and resid once); longer rows re-read r from the residual output (the
// same thread wrote it) or x, and recompute y identically.
//
// Entry points: quick_normquant_f16, quick_normquant_bf16 (x, resid, weight, x_q, s_x, r_out, normed, M, K, eps,
// offset); resid, r_out, normed may be null (r_out is required with resid); K % 8 == 0, 16-byte aligned rows.
#include "quick_rowquant.cuh"

namespace {

constexpr int THREADS = 512;
constexpr int NWARPS = THREADS / 32;
constexpr int VPT = 4;

// cast(resid + x) per element pair, rounded like torch's add in the model dtype
template <int DT>
__device__ __forceinline__ uint4 add_piece(const uint4& a, const uint4& b) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = quick::unpack2<DT>(quick::u4_get(a, i)), q = quick::unpack2<DT>(quick::u4_get(b, i));
    w[i] = quick::pack2<DT>(__fadd_rn(p.x, q.x), __fadd_rn(p.y, q.y));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int DT>
__device__ __forceinline__ float sumsq(const uint4& v, float ss) {
  return quick::fold8<DT>(v, ss, [](float a, float x) { return fmaf(x, x, a); });
}

// y = RMSNorm(r) of one piece with the same two cast points as transformers' modules
template <int DT>
__device__ __forceinline__ uint4 norm_piece(const uint4& r, const uint4& w, float inv, float offset) {
  uint32_t y[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 r2 = quick::unpack2<DT>(quick::u4_get(r, i)), w2 = quick::unpack2<DT>(quick::u4_get(w, i));
    if (offset == 0.f) {
      const float2 n2 = quick::unpack2<DT>(quick::pack2<DT>(__fmul_rn(r2.x, inv), __fmul_rn(r2.y, inv)));
      y[i] = quick::pack2<DT>(__fmul_rn(w2.x, n2.x), __fmul_rn(w2.y, n2.y));
    } else {
      y[i] = quick::pack2<DT>(__fmul_rn(__fmul_rn(r2.x, inv), __fadd_rn(offset, w2.x)),
                              __fmul_rn(__fmul_rn(r2.y, inv), __fadd_rn(offset, w2.y)));
    }
  }
  return make_uint4(y[0], y[1], y[2], y[3]);
}

template <int DT>
__device__ __forceinline__ void normquant(const void* __restrict__ xp, const void* __restrict__ rp,
                                          const void* __restrict__ wp, int8_t* __restrict__ xq,
                                          float* __restrict__ sx, void* __restrict__ rop, void* __restrict__ nop,
                                          int K, float eps, float offset) {
  __shared__ float red[NWARPS];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int nvec = K / 8;
  const size_t base = static_cast<size_t>(row) * K * 2;
  const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const char*>(xp) + base);
  const uint4* rr = rp != nullptr ? reinterpret_cast<const uint4*>(static_cast<const char*>(rp) + base) : nullptr;
  uint4* ro = rop != nullptr ? reinterpret_cast<uint4*>(static_cast<char*>(rop) + base) : nullptr;
  uint4* no = nop != nullptr ? reinterpret_cast<uint4*>(static_cast<char*>(nop) + base) : nullptr;
  const uint4* wr = static_cast<const uint4*>(wp);
  uint2* qr = reinterpret_cast<uint2*>(xq + static_cast<size_t>(row) * K);

  // pass 1: r = x (+ resid), written out as the new residual; its sum of squares
  uint4 cache[VPT];
  float ss = 0.f;
  quick::load_row_cache<THREADS>(cache, xr, tid, nvec);
  if (rr != nullptr) {
    uint4 res[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int i = tid + v * THREADS;
      res[v] = i < nvec ? quick::ldg128(rr + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int i = tid + v * THREADS;
      if (i < nvec) {
        cache[v] = add_piece<DT>(res[v], cache[v]);
        ro[i] = cache[v];
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VPT; ++v) ss = sumsq<DT>(cache[v], ss);  // zero pieces add zero
  for (int i = tid + VPT * THREADS; i < nvec; i += THREADS) {
    uint4 r = quick::ldg128(xr + i);
    if (rr != nullptr) {
      r = add_piece<DT>(quick::ldg128(rr + i), r);
      ro[i] = r;
    }
    ss = sumsq<DT>(r, ss);
  }
  ss = quick::block_reduce<false, NWARPS>(ss, red);
  const float inv = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), eps));

  // pass 2: y = RMSNorm(r) (kept in the cache), its absmax
  float amax = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = tid + v * THREADS;
    if (i < nvec) {
      cache[v] = norm_piece<DT>(cache[v], quick::ldg128(wr + i), inv, offset);
      if (no != nullptr) no[i] = cache[v];
      amax = quick::absmax<DT>(cache[v], amax);
    }
  }
  for (int i = tid + VPT * THREADS; i < nvec; i += THREADS) {
    const uint4 r = ro != nullptr ? ro[i] : quick::ldg128(xr + i);  // ro[i]: this thread's own store
    const uint4 y = norm_piece<DT>(r, quick::ldg128(wr + i), inv, offset);
    if (no != nullptr) no[i] = y;
    amax = quick::absmax<DT>(y, amax);
  }
  amax = quick::block_reduce<true, NWARPS>(amax, red);

  // pass 3: x_q = rint(y * 127 / amax), as quick_actquant.cu
  const float qinv = amax > 0.f ? __fmul_rn(__frcp_rn(amax), 127.f) : 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = tid + v * THREADS;
    if (i < nvec) qr[i] = quick::quant8<DT>(cache[v], qinv);
  }
  for (int i = tid + VPT * THREADS; i < nvec; i += THREADS) {
    const uint4 r = ro != nullptr ? ro[i] : quick::ldg128(xr + i);
    qr[i] = quick::quant8<DT>(norm_piece<DT>(r, quick::ldg128(wr + i), inv, offset), qinv);
  }
  if (tid == 0) sx[row] = __fmul_rn(amax, 1.0f / 127.0f);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    quick_normquant_f16(const void* __restrict__ x, const void* __restrict__ resid, const void* __restrict__ weight,
                        int8_t* __restrict__ xq, float* __restrict__ sx, void* __restrict__ r_out,
                        void* __restrict__ normed, int M, int K, float eps, float offset) {
  if (static_cast<int>(blockIdx.x) < M) normquant<0>(x, resid, weight, xq, sx, r_out, normed, K, eps, offset);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    quick_normquant_bf16(const void* __restrict__ x, const void* __restrict__ resid, const void* __restrict__ weight,
                         int8_t* __restrict__ xq, float* __restrict__ sx, void* __restrict__ r_out,
                         void* __restrict__ normed, int M, int K, float eps, float offset) {
  if (static_cast<int>(blockIdx.x) < M) normquant<1>(x, resid, weight, xq, sx, r_out, normed, K, eps, offset);
}
