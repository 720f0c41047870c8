// quick_hopper.cuh: device code shared by the two Hopper (sm_90a) kernels, quick_sm90.cu (W4A16) and
// quick_w4a8_sm90.cu (W4A8): shared-memory addresses, mbarriers, the 2-D TMA load and 1-D bulk copy, named
// barriers, the wgmma fence / commit / wait and the K-major 128-byte-swizzle shared-memory descriptor, register
// pins, 16-bit conversions; and two pieces of a work unit both kernels run alike: draining the wgmma pipeline and
// the staged output store. (Their split-k reductions are still written out in each kernel: a shared template
// compiled to different, if equivalent, address arithmetic, and these kernels are only changed where the SASS
// stays identical unless a GPU is there to check them.)
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
