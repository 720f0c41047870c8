// quick_hopper.cuh: device code shared by the two Hopper (sm_90a) kernels, quick_sm90.cu (W4A16) and
// quick_w4a8_sm90.cu (W4A8): shared-memory addresses, mbarriers, the 2-D TMA load and 1-D bulk copy, named
// barriers, the wgmma fence / commit / wait and the K-major 128-byte-swizzle shared-memory descriptor, register
// pins, 16-bit conversions, the register-A wgmma of both kernels (QH_DEFINE_WGMMA_RS); and two pieces of a work
// unit both kernels run alike: draining the wgmma pipeline and the staged output store (more of the work unit:
// quick_wgmma_pipeline.cuh).
// Everything here is independent of a kernel's compile-time variant (included before the kernels' constants):
// what depends on it comes in as template arguments.
#pragma once

#include <cstdint>

namespace {

// A CUtensorMap as a kernel parameter (__grid_constant__), 64-byte aligned.
struct alignas(64) TmaDesc {
  unsigned long long v[16];
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "QH_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra QH_WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// A consumer warp frees a stage: one arrival per warp (the empty barriers count warps), after __syncwarp so that
// every lane's shared-memory reads of the stage are ordered before it, not lane 0's alone.
__device__ __forceinline__ void release_stage(uint32_t bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaDesc* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void named_bar(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// ---- wgmma.mma_async, A fragment in registers, B (K-major, 128-byte swizzle) from a shared-memory descriptor
// QH_DEFINE_WGMMA_RS(NAME, ACC_T, C, KTYPES, TAIL) defines NAME<N>(d, a, desc, scale_d) for N = 8 .. 256, one
// "wgmma...m64n<N><KTYPES> {d}, {a}, desc, p<TAIL>" with p = (scale_d != 0): D = A x B + D, or A x B where 0.
// d holds a thread's N / 2 accumulators (asm constraint C), a its four A registers. asm operands are numbered
// d first, then a, desc and scale_d: the lists below spell them out once for both kernels.
#define QH_WG_R0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define QH_WG_R16 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define QH_WG_R32 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define QH_WG_R48 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QH_WG_R64 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79"
#define QH_WG_R80 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define QH_WG_R96 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111"
#define QH_WG_R112 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QH_WG_R0_63 QH_WG_R0 ", " QH_WG_R16 ", " QH_WG_R32 ", " QH_WG_R48
#define QH_WG_OPS_8 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8"
#define QH_WG_OPS_16 "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12"
#define QH_WG_OPS_32 "{" QH_WG_R0 "}, {%16, %17, %18, %19}, %20"
#define QH_WG_OPS_64 "{" QH_WG_R0 ", " QH_WG_R16 "}, {%32, %33, %34, %35}, %36"
#define QH_WG_OPS_128 "{" QH_WG_R0_63 "}, {%64, %65, %66, %67}, %68"
#define QH_WG_OPS_256 \
  "{" QH_WG_R0_63 ", " QH_WG_R64 ", " QH_WG_R80 ", " QH_WG_R96 ", " QH_WG_R112 "}, {%128, %129, %130, %131}, %132"
#define QH_WG_SCALE_8 "%9"
#define QH_WG_SCALE_16 "%13"
#define QH_WG_SCALE_32 "%21"
#define QH_WG_SCALE_64 "%37"
#define QH_WG_SCALE_128 "%69"
#define QH_WG_SCALE_256 "%133"
#define QH_WG_D4(C, i) C(d[i]), C(d[i + 1]), C(d[i + 2]), C(d[i + 3])
#define QH_WG_D16(C, i) QH_WG_D4(C, i), QH_WG_D4(C, i + 4), QH_WG_D4(C, i + 8), QH_WG_D4(C, i + 12)
#define QH_WG_D64(C, i) QH_WG_D16(C, i), QH_WG_D16(C, i + 16), QH_WG_D16(C, i + 32), QH_WG_D16(C, i + 48)
#define QH_WG_OUT_8(C) QH_WG_D4(C, 0)
#define QH_WG_OUT_16(C) QH_WG_D4(C, 0), QH_WG_D4(C, 4)
#define QH_WG_OUT_32(C) QH_WG_D16(C, 0)
#define QH_WG_OUT_64(C) QH_WG_D16(C, 0), QH_WG_D16(C, 16)
#define QH_WG_OUT_128(C) QH_WG_D64(C, 0)
#define QH_WG_OUT_256(C) QH_WG_D64(C, 0), QH_WG_D64(C, 64)
#define QH_WGMMA_RS_N(N, KTYPES, TAIL, C)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " QH_WG_SCALE_##N ", 0;\n"                             \
               "wgmma.mma_async.sync.aligned.m64n" #N KTYPES " " QH_WG_OPS_##N ", p" TAIL ";\n}\n"      \
               : QH_WG_OUT_##N(C)                                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))
#define QH_DEFINE_WGMMA_RS(NAME, ACC_T, C, KTYPES, TAIL)                                            \
  template <int N>                                                                                  \
  __device__ __forceinline__ void NAME(ACC_T* d, const uint32_t* a, uint64_t desc, int scale_d) {   \
    static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256, "wgmma N");       \
    if constexpr (N == 8) {                                                                         \
      QH_WGMMA_RS_N(8, KTYPES, TAIL, C);                                                            \
    } else if constexpr (N == 16) {                                                                 \
      QH_WGMMA_RS_N(16, KTYPES, TAIL, C);                                                           \
    } else if constexpr (N == 32) {                                                                 \
      QH_WGMMA_RS_N(32, KTYPES, TAIL, C);                                                           \
    } else if constexpr (N == 64) {                                                                 \
      QH_WGMMA_RS_N(64, KTYPES, TAIL, C);                                                           \
    } else if constexpr (N == 128) {                                                                \
      QH_WGMMA_RS_N(128, KTYPES, TAIL, C);                                                          \
    } else {                                                                                        \
      QH_WGMMA_RS_N(256, KTYPES, TAIL, C);                                                          \
    }                                                                                               \
  }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle (what TMA SWIZZLE_128B writes), 8-row groups
// 1024 bytes apart (SBO), leading offset unused for swizzled K-major layouts.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// 1-D bulk copy global -> shared, completion counted in bytes on an mbarrier (16-byte aligned, size % 16 == 0).
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Keep a register value alive (and ordered) at this point: wgmma reads A and writes D asynchronously, so the
// compiler must neither reuse A's registers nor read D before the wait_group that precedes this fence.
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// A 16-bit value (fp16, or bf16 with BF16) to fp32 and back (round to nearest even).
template <bool BF16>
__device__ __forceinline__ float h16_to_f(uint16_t h) {
  float f;
  if constexpr (BF16) {
    f = __uint_as_float(static_cast<uint32_t>(h) << 16);
  } else {
    asm("{\n.reg .f16 t;\nmov.b16 t, %1;\ncvt.f32.f16 %0, t;\n}\n" : "=f"(f) : "h"(h));
  }
  return f;
}

template <bool BF16>
__device__ __forceinline__ uint16_t f_to_h16(float f) {
  uint16_t h;
  if constexpr (BF16) {
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
  } else {
    asm("{\n.reg .f16 t;\ncvt.rn.f16.f32 t, %1;\nmov.b16 %0, t;\n}\n" : "=h"(h) : "f"(f));
  }
  return h;
}

// End of a unit's main loop: wait for the last wgmmas, then pin the accumulators and both A buffers here (their
// registers are read / rewritten by what follows).
template <int ACC, typename T>
__device__ __forceinline__ void wgmma_drain(T (&acc)[ACC], uint32_t (&a_frag)[2][4][4]) {
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < ACC; ++i) fence_reg(acc[i]);
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      fence_reg(a_frag[0][w][i]);
      fence_reg(a_frag[1][w][i]);
    }
}

// The staged output rows of one unit (token tile tm: tokens NT tm .. + NT - 1, channels nb .. nb + 63, rows >= M
// dropped) as 16-byte stores, then the barrier after which the staging buffer may be rewritten.
template <int NT, int STRIDE>
__device__ __forceinline__ void store_staged(uint16_t* out, const uint16_t* epi, int tm, int M, int N, int nb,
                                             int tid, int bar) {
  named_bar(bar, 128);
  const int row0 = tm * NT;
  for (int idx = tid; idx < NT * 8; idx += 128) {
    const int t = idx / 8, q = idx % 8;
    if (row0 + t < M) {
      const uint4 v = *reinterpret_cast<const uint4*>(epi + t * STRIDE + 8 * q);
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(row0 + t) * N + nb + 8 * q) = v;
    }
  }
  named_bar(bar, 128);
}

// t ^= v as a volatile asm: stays where it is written (the compiler would otherwise reassociate the fold and
// spread it over earlier steps, where a read of a loaded register costs a wait for every load in flight).
__device__ __forceinline__ void xor_acc(uint32_t& t, uint32_t v) {
  asm volatile("xor.b32 %0, %0, %1;\n" : "+r"(t) : "r"(v));
}

}  // namespace
