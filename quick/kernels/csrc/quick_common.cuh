// quick_common.cuh: device helpers shared by the QUICK kernels (mma.sync GEMM, GEMV, and the sm90 kernel).
//
// Public API (namespace quick), all __device__ __forceinline__:
//   Elt<DT>                      DT = 0: fp16, 1: bf16. ::MAGIC (fp16x2 0x6400 = 1024, bf16x2 0x4300 = 128)
//   dequant_raw<DT>(w, h[4])     one int32 of 8 nibbles -> 4 packed 16-bit pairs: pair i = (MAGIC + nib i,
//                                MAGIC + nib i+4), low half = nibble i. lop3 + shifts, no conversion.
//   neg_magic_zero<DT>(z2)       -(MAGIC + z) for a packed pair of zero points (exact: small integers)
//   bcast_lo(x) / bcast_hi(x)    (lo, lo) / (hi, hi) of a packed pair (one prmt)
//   dequant_word<DT>(w, s2, nz2, b[4])
//                                the weights of one QUICK word, scaled: b[p] = (h[p] + nz) * s, where
//                                s2/nz2 hold (tile 2w, tile 2w+1) in (lo, hi). Subtract first (exact),
//                                multiply second (one rounding), like dequantize() in float.
//   mma_16816<DT>(c[4], a[4], b0, b1)  mma.sync.aligned.m16n8k16.row.col, fp32 accumulate
//   ldmatrix_x4 / ldmatrix_x2, cp_async16 (zero-filling), cp_async_commit / cp_async_wait<N>
//   ldg_stream128(ptr)           16-byte global load that does not allocate in L1 (weights are read once)
//   ldg128 / lds128              plain 16-byte loads
//
// Layout reminder (quick/packing/layouts.py, layout "quick"): word w of a lane holds the B registers of
// n8 tiles 2w and 2w+1 of a k16 x n64 block; nibble (pair + 4*half): pair 0 -> b0 of tile 2w,
// 1 -> b1 of tile 2w, 2 -> b0 of tile 2w+1, 3 -> b1 of tile 2w+1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace quick {

template <int DT>
struct Elt;

template <>
struct Elt<0> {
  using T = __half;
  static constexpr uint32_t MAGIC = 0x64006400u;  // fp16x2 (1024, 1024): 1024 + q is exact for q < 1024
};

template <>
struct Elt<1> {
  using T = __nv_bfloat16;
  static constexpr uint32_t MAGIC = 0x43004300u;  // bf16x2 (128, 128): 128 + q is exact for q < 128
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t d;
  // (a & mask) | bits: immLut = (0xF0 & 0xCC) | 0xAA
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
}

template <int DT>
__device__ __forceinline__ void dequant_raw(uint32_t w, uint32_t h[4]) {
  constexpr uint32_t MASK = 0x000f000fu;
  h[0] = lop3_and_or(w, MASK, Elt<DT>::MAGIC);
  h[1] = lop3_and_or(w >> 4, MASK, Elt<DT>::MAGIC);
  h[2] = lop3_and_or(w >> 8, MASK, Elt<DT>::MAGIC);
  h[3] = lop3_and_or(w >> 12, MASK, Elt<DT>::MAGIC);
}

__device__ __forceinline__ uint32_t bcast_lo(uint32_t x) { return __byte_perm(x, 0, 0x1010); }
__device__ __forceinline__ uint32_t bcast_hi(uint32_t x) { return __byte_perm(x, 0, 0x3232); }

// fma on a packed pair: a * b + c with one rounding.
template <int DT>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (DT == 0) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

template <int DT>
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
  // a * 1 + b: exact whenever a + b is representable (true for integers of the dequantization).
  constexpr uint32_t ONE = DT == 0 ? 0x3C003C00u : 0x3F803F80u;
  return fma2<DT>(a, ONE, b);
}

template <int DT>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (DT == 0) {
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
    d = fma2<1>(a, b, 0x80008000u);  // a * b + (-0): one rounding, sign of zero kept
#endif
  }
  return d;
}

// -(MAGIC + z) for a packed pair of integer zero points, exact.
template <int DT>
__device__ __forceinline__ uint32_t neg_magic_zero(uint32_t z2) {
  constexpr uint32_t NEG_ONE = DT == 0 ? 0xBC00BC00u : 0xBF80BF80u;
  return fma2<DT>(z2, NEG_ONE, Elt<DT>::MAGIC ^ 0x80008000u);
}

// One QUICK word -> the 4 B registers (b0, b1 of tile 2w; b0, b1 of tile 2w+1), scaled.
// s2 = (scale of tile 2w, scale of tile 2w+1), nz2 = the same for -(MAGIC + zero).
template <int DT>
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t s2, uint32_t nz2, uint32_t b[4]) {
  uint32_t h[4];
  dequant_raw<DT>(w, h);
  const uint32_t slo = bcast_lo(s2), shi = bcast_hi(s2);
  const uint32_t zlo = bcast_lo(nz2), zhi = bcast_hi(nz2);
  b[0] = mul2<DT>(add2<DT>(h[0], zlo), slo);
  b[1] = mul2<DT>(add2<DT>(h[1], zlo), slo);
  b[2] = mul2<DT>(add2<DT>(h[2], zhi), shi);
  b[3] = mul2<DT>(add2<DT>(h[3], zhi), shi);
}

template <int DT>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (DT == 0) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t a[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t& a0, uint32_t& a1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(a0), "=r"(a1) : "r"(addr));
}

// 16-byte async copy global -> shared; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint4 ldg_stream128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ldg128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ldg32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint32_t u4_get(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Store two fp32 values as a packed pair of the output type.
template <int DT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (DT == 0) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

template <int DT>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (DT == 0) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  } else {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
}

}  // namespace quick
