// quick_wgmma_pipeline.cuh: the work-unit loop pieces shared by the two Hopper kernels, quick_sm90.cu (W4A16) and
// quick_w4a8_sm90.cu (W4A8). Both run a persistent grid of (channel tile, token tile, k split) units on one producer
// warpgroup (TMA for the activations) and NWG consumer warpgroups (weights global -> registers -> wgmma A operand).
// Here: the shared-memory carve-up and stage barriers, a consumer's unit decoding, the deterministic split-k
// reduction and a thread's bias. Each piece compiles to the instructions the kernels had written out (SASS compared
// variant by variant). The weight pipelines and the producer loops stay in the kernels: moved into shared functions
// or lambdas, nvcc schedules them differently (other code, if equivalent).
#pragma once

#include "quick_hopper.cuh"

namespace {

// Dynamic shared memory, from a 1024-byte aligned base (128-byte swizzle atoms): STAGES activation stages of
// STAGE_BYTES, STAGES weight stages of WSTAGE_BYTES (0 where the weights do not go through shared memory), NWG
// output staging buffers of EPI_BYTES, STAGES full and STAGES empty mbarriers, NWG split-k flags.
template <int STAGES, int STAGE_BYTES, int WSTAGE_BYTES, int NWG, int EPI_BYTES>
struct WgmmaSmem {
  static constexpr int BYTES = 1024 + STAGES * (STAGE_BYTES + WSTAGE_BYTES) + NWG * EPI_BYTES + STAGES * 16 + NWG * 16;
  uint8_t* gbase;    // the aligned base, generic address
  uint32_t x;        // activation stages (shared-space addresses from here on)
  uint32_t w;        // weight stages
  uint32_t epi_off;  // staging buffers, offset from the base
  uint32_t full;     // full mbarriers (8 bytes each): the producer's expect_tx + the copies' bytes
  uint32_t empty;    // empty mbarriers: lane 0 of every consumer warp releases a stage
  volatile int* flag;

  __device__ __forceinline__ explicit WgmmaSmem(uint8_t* smem_raw) {
    const uint32_t raw_base = smem_u32(smem_raw);
    const uint32_t base = (raw_base + 1023u) & ~1023u;
    gbase = smem_raw + (base - raw_base);
    x = base;
    w = base + STAGES * STAGE_BYTES;
    epi_off = STAGES * (STAGE_BYTES + WSTAGE_BYTES);
    full = base + epi_off + NWG * EPI_BYTES;
    empty = full + STAGES * 8;
    flag = reinterpret_cast<volatile int*>(gbase + epi_off + NWG * EPI_BYTES + STAGES * 16);
  }

  // Thread 0 initializes the barriers; the block waits for it.
  __device__ __forceinline__ void init_barriers() const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(full + 8 * s, 1);
        mbar_init(empty + 8 * s, 4 * NWG);
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();
  }
};

// Work unit u: k split, tile = (token tile tm, channel tile tn), its first k step s0 and its number of steps (in the
// consumers' order of computation: the producers compute tn last, and stay written out).
struct WorkUnit {
  int split, tile, tn, tm, s0, nsteps;
  __device__ __forceinline__ WorkUnit(int u, int splits, int n_tiles, int steps_per_split, int nk)
      : split(u % splits), tile(u / splits), tn(tile % n_tiles), tm(tile / n_tiles), s0(split * steps_per_split),
        nsteps(min(nk - s0, steps_per_split)) {}
};

// Split-k across CTAs, deterministic: every split of a (tile, warpgroup) writes its accumulators (fp32 or int32, in
// fragment order: coalesced 16-byte stores) to its slab of ws; the last CTA to arrive (atomic counter) sums all
// slabs in split order 0 .. splits - 1, whoever arrives last, and resets the counter for the next launch.
// Returns false in the CTAs that leave the tile to another.
template <int NT, int NWG, int ACC, typename T, typename V4>
__device__ __forceinline__ bool splitk_reduce(T (&acc)[ACC], T* ws, int* counters, volatile int* s_flag, int tile,
                                              int split, int splits, int cw, int tid) {
  const size_t slab = static_cast<size_t>(64) * NT;  // values per (tile, warpgroup, split)
  V4* const mine = reinterpret_cast<V4*>(ws + (static_cast<size_t>(tile * NWG + cw) * splits + split) * slab);
#pragma unroll
  for (int c = 0; c < ACC / 4; ++c) __stcg(mine + c * 128 + tid, V4{acc[4 * c], acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3]});
  __threadfence();
  named_bar(1 + cw, 128);
  if (tid == 0) {
    const int old = atomicAdd(counters + tile * NWG + cw, 1);
    s_flag[cw] = (old == splits - 1);
  }
  named_bar(1 + cw, 128);
  if (!s_flag[cw]) return false;
  __threadfence();
#pragma unroll
  for (int i = 0; i < ACC; ++i) acc[i] = 0;
  const V4* const all = reinterpret_cast<const V4*>(ws + static_cast<size_t>(tile * NWG + cw) * splits * slab);
  for (int sp2 = 0; sp2 < splits; ++sp2) {
#pragma unroll
    for (int c = 0; c < ACC / 4; ++c) {
      const V4 v = __ldcg(all + static_cast<size_t>(sp2) * (slab / 4) + c * 128 + tid);
      acc[4 * c] += v.x;
      acc[4 * c + 1] += v.y;
      acc[4 * c + 2] += v.z;
      acc[4 * c + 3] += v.w;
    }
  }
  if (tid == 0) counters[tile * NWG + cw] = 0;
  return true;
}

// The bias of a thread's two channels nb + ch0 and nb + ch0 + 8 (16-bit, null: none) as fp32.
template <bool BF16>
__device__ __forceinline__ void bias_pair(const uint16_t* bias, int nb, int ch0, float& b0, float& b1) {
  b0 = 0.f;
  b1 = 0.f;
  if (bias != nullptr) {
    b0 = h16_to_f<BF16>(bias[nb + ch0]);
    b1 = h16_to_f<BF16>(bias[nb + ch0 + 8]);
  }
}

}  // namespace
