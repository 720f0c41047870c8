// quick_hopper.cuh: PTX helpers shared by the two Hopper (sm_90a) kernels, quick_sm90.cu (W4A16) and
// quick_w4a8_sm90.cu (W4A8): shared-memory addresses, mbarriers, the 2-D TMA load, named barriers, the wgmma
// fence / commit / wait and the K-major 128-byte-swizzle shared-memory descriptor, register pins.
// Everything here is independent of a kernel's compile-time variant (included before the kernels' constants).
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

// t ^= v as a volatile asm: stays where it is written (the compiler would otherwise reassociate the fold and
// spread it over earlier steps, where a read of a loaded register costs a wait for every load in flight).
__device__ __forceinline__ void xor_acc(uint32_t& t, uint32_t v) {
  asm volatile("xor.b32 %0, %0, %1;\n" : "+r"(t) : "r"(v));
}

}  // namespace
