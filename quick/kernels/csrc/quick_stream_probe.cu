// quick_stream_probe.cu: a read-only streaming kernel, the yardstick for the decode kernels' memory time.
//
// Reads n16 16-byte words with ld.global.nc.L1::no_allocate.v4 (the weight loads of the QUICK kernels), QP_U
// independent loads in flight per thread per iteration, a grid-stride loop over contiguous chunks; the words are
// xor-folded and the fold is stored only if it equals a value the data never produces in practice (so that the
// loads are not dead code, and the kernel writes nothing). Launched by scripts/ncu_decode.py with various grids,
// block sizes and QP_U; also used there as the "clean" L2 flush (reading a 256 MB buffer leaves clean lines).
#include <stdint.h>

#ifndef QP_U
#define QP_U 8
#endif
#ifndef QP_EF
#define QP_EF 0  // 1: loads carry an L2::evict_first cache policy (replacement prefers these clean lines)
#endif

__device__ __forceinline__ void stream_read(const uint4* __restrict__ p, long long n16, uint32_t* __restrict__ sink) {
  uint32_t acc = 0;
#if QP_EF
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (QP_U - 1) * stride < n16; i += QP_U * stride) {
    uint4 v[QP_U];
#pragma unroll
    for (int u = 0; u < QP_U; ++u) {
#if QP_EF
      asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(p + i + u * stride), "l"(pol));
#else
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(p + i + u * stride));
#endif
    }
#pragma unroll
    for (int u = 0; u < QP_U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}

// The measured kernel, and the same code under another name for the "read" L2 flush (so that a profiler can
// select the measured launches by name).
extern "C" __global__ void quick_stream_probe(const uint4* __restrict__ p, long long n16, uint32_t* __restrict__ sink) {
  stream_read(p, n16, sink);
}

extern "C" __global__ void quick_stream_flush(const uint4* __restrict__ p, long long n16, uint32_t* __restrict__ sink) {
  stream_read(p, n16, sink);
}

// The weight access pattern of a tiled kernel, without its arithmetic: the buffer is rows of row16 16-byte words
// (the quick layout: one k16 row = N/2 words); CTA b reads, of rows [part * rows_per_cta, + rows_per_cta), the
// chunk16 words of column block (b % ncols), part = b / ncols. blockDim.x is a multiple of chunk16; every thread
// keeps QP_U rows in flight. Same bytes as the sequential probe, the access order of the GEMM's CTAs.
extern "C" __global__ void quick_stream_tiled(const uint4* __restrict__ p, int row16, int chunk16, int ncols,
                                              int rows_per_cta, uint32_t* __restrict__ sink) {
  const int col = blockIdx.x % ncols, part = blockIdx.x / ncols;
  const uint4* base = p + static_cast<size_t>(part) * rows_per_cta * row16 + static_cast<size_t>(col) * chunk16;
  const int per_round = blockDim.x / chunk16;
  const int r0 = threadIdx.x / chunk16, c = threadIdx.x % chunk16;
  uint32_t acc = 0;
  for (int r = r0; r < rows_per_cta; r += per_round * QP_U) {
    uint4 v[QP_U];
#pragma unroll
    for (int u = 0; u < QP_U; ++u) {
      const int rr = r + u * per_round;
      v[u] = make_uint4(0, 0, 0, 0);
      if (rr < rows_per_cta) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                     : "l"(base + static_cast<size_t>(rr) * row16 + c));
      }
    }
#pragma unroll
    for (int u = 0; u < QP_U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}
