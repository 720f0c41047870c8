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
//   ldg128 / lds128 / lds32      plain 16-byte loads (global, shared), 4-byte shared load
//   pack2 / unpack2, load_pair / load_quad   fp32 <-> packed 16-bit pairs; 2 / 4 elements of a 16-bit vector
//   griddep_wait / griddep_launch_dependents  programmatic dependent launch (sm_90; no-ops below, and when the
//                                kernel was not launched with the PDL attribute)
// Split-k GEMM building blocks (quick_mma.cu with fp32, quick_w4a8.cu with int32 accumulators acc[MT][NB][T][4]):
//   cta_pos, warp_nblocks        a thread's warp / tile / K-tile range; its warp's n-blocks
//   for_each_tile, zero_acc      walk / clear the accumulator tiles
//   reduce_kslices               the WARPS_K k-slices summed through shared memory in a fixed order
//   pipeline_prologue / pipeline_advance   the STAGES-deep cp.async pipeline of the activations
//   for_each_out_pair            the epilogue's walk over the C fragments (rows < M, valid n-blocks)
//   store_partial, sum_splits2 / sum_splits4   split-k partials ws[z][M][N], summed in split order
//   splitk_last_cta / splitk_done            in-kernel split-k: the arrival counter of a tile
//
// Layout reminder (quick/formats/layouts.py, layout "quick"): word w of a lane holds the B registers of
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

// Programmatic dependent launch (PDL). A kernel launched with the programmatic-serialization attribute may start
// while the previous kernel on its stream still runs: before griddep_wait() it may touch only what no earlier kernel
// writes (the weights); after it, the previous grid has completed and its writes are visible.
// griddep_launch_dependents() lets the next such kernel start once every CTA of this one has called it or exited.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
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

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
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

// Elements col, col + 1 of a 16-bit row vector (e.g. the bias) as floats (one 4-byte load).
template <int DT>
__device__ __forceinline__ float2 load_pair(const void* p, int col) {
  return unpack2<DT>(*reinterpret_cast<const uint32_t*>(static_cast<const char*>(p) + col * 2));
}

// Elements col .. col + 3 of a 16-bit row vector as floats (one 8-byte load): (col, col + 1), (col + 2, col + 3).
template <int DT>
__device__ __forceinline__ void load_quad(const void* p, int col, float2& lo, float2& hi) {
  const uint2 b = *reinterpret_cast<const uint2*>(static_cast<const char*>(p) + col * 2);
  lo = unpack2<DT>(b.x);
  hi = unpack2<DT>(b.y);
}

// ---- building blocks of the split-k GEMMs (quick_mma.cu: fp32 accumulators, quick_w4a8.cu: int32)

template <typename A>
struct AccVec;  // the 2- and 4-wide vector types of an accumulator type
template <>
struct AccVec<float> {
  using V2 = float2;
  using V4 = float4;
};
template <>
struct AccVec<int> {
  using V2 = int2;
  using V4 = int4;
};

// Where a thread of a split-k GEMM CTA works: warp (wm, wn, wk) of WARPS_M x WARPS_N x WARPS_K (m fastest), the
// CTA's BM x BN output tile at (m0, n0) (blockIdx.y, blockIdx.x), and its split blockIdx.z: the K tiles of BKS
// columns [tile_begin, tile_begin + ntiles).
struct CtaPos {
  int tid, lane, wm, wn, wk, n0, m0, tile_begin, ntiles;
};

template <int WARPS_M, int WARPS_N, int BM, int BN, int BKS>
__device__ __forceinline__ CtaPos cta_pos(int K, int tiles_per_split) {
  CtaPos p;
  p.tid = threadIdx.x;
  p.lane = p.tid & 31;
  const int warp = p.tid >> 5;
  p.wm = warp % WARPS_M;
  p.wn = (warp / WARPS_M) % WARPS_N;
  p.wk = warp / (WARPS_M * WARPS_N);
  p.n0 = blockIdx.x * BN;
  p.m0 = blockIdx.y * BM;
  const int total_tiles = K / BKS;
  p.tile_begin = blockIdx.z * tiles_per_split;
  p.ntiles = min(tiles_per_split, total_tiles - p.tile_begin);
  return p;
}

// The NB blocks of NBW columns of warp column wn in the CTA tile at column n0 (nblk: block indices) and whether
// each lies inside N (nvalid).
template <int NB, int NBW>
__device__ __forceinline__ void warp_nblocks(int n0, int wn, int N, int (&nblk)[NB], bool (&nvalid)[NB]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    nblk[nb] = n0 / NBW + wn * NB + nb;
    nvalid[nb] = nblk[nb] < N / NBW;
  }
}

// f(mt, nb, t) for every n8 tile t of every n-block nb of every m16 tile mt of a warp (fully unrolled).
template <int MT, int NB, int T, typename F>
__device__ __forceinline__ void for_each_tile(F&& f) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int t = 0; t < T; ++t) f(mt, nb, t);
}

// acc[MT][NB][T][4] = 0
template <typename A, int MT, int NB, int T>
__device__ __forceinline__ void zero_acc(A (&acc)[MT][NB][T][4]) {
  for_each_tile<MT, NB, T>([&](int mt, int nb, int t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][nb][t][e] = A(0);
  });
}

// Adds the accumulators acc[MT][NB][T][4] of the WARPS_K k-slices (warps wk = 1 .. WARPS_K - 1 of the same
// (wm, wn), widx = wm + WARPS_M * wn) into those of wk = 0, through shared memory `red`, in the fixed order
// acc(0) += acc(1); += acc(2); ... (deterministic for fp32). Only wk == 0 holds the sum afterwards.
template <int WARPS_K, typename A, int MT, int NB, int T>
__device__ __forceinline__ void reduce_kslices(A (&acc)[MT][NB][T][4], void* red_smem, int widx, int wk, int lane) {
  using V4 = typename AccVec<A>::V4;
  V4* red = reinterpret_cast<V4*>(red_smem);
  auto slot = [&](int mt, int nb, int t) -> V4& { return red[(((widx * MT + mt) * NB + nb) * T + t) * 32 + lane]; };
#pragma unroll 1
  for (int r = 1; r < WARPS_K; ++r) {
    __syncthreads();
    if (wk == r) {
      for_each_tile<MT, NB, T>([&](int mt, int nb, int t) {
        slot(mt, nb, t) = V4{acc[mt][nb][t][0], acc[mt][nb][t][1], acc[mt][nb][t][2], acc[mt][nb][t][3]};
      });
    }
    __syncthreads();
    if (wk == 0) {
      for_each_tile<MT, NB, T>([&](int mt, int nb, int t) {
        const V4 v = slot(mt, nb, t);
        acc[mt][nb][t][0] += v.x;
        acc[mt][nb][t][1] += v.y;
        acc[mt][nb][t][2] += v.z;
        acc[mt][nb][t][3] += v.w;
      });
    }
  }
}

// ---- the STAGES-deep cp.async pipeline of the activations: load_stage(slot, tile) issues the copies of one tile

// Before the main loop: tiles 0 .. STAGES - 2 in flight (one commit group each, empty past ntiles).
template <int STAGES, typename F>
__device__ __forceinline__ void pipeline_prologue(int ntiles, F&& load_stage) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_stage(s, s);
    cp_async_commit();
  }
}

// At the start of tile `tile`: wait until its stage has landed (for every thread of the CTA), then issue tile
// tile + STAGES - 1 into the slot that the previous tile freed (one commit group, empty past ntiles).
template <int STAGES, typename F>
__device__ __forceinline__ void pipeline_advance(int tile, int ntiles, F&& load_stage) {
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  const int tn = tile + STAGES - 1;
  if (tn < ntiles) load_stage(tn % STAGES, tn);
  cp_async_commit();
}

// The output pairs of a warp's accumulators acc[MT][NB][T][4] in the mma C layout (a lane holds rows lane / 4 and
// lane / 4 + 8 of each m16 tile, columns 2 * (lane % 4) and + 1 of each n8 tile): for every valid n-block nb
// (nvalid[nb]; its first column is nblk[nb] * NBW) and n8 tile t, cv = col_fn(col) once (the per-column operands),
// then pair_fn(cv, row, col, mt, nb, t, h) for each row < M of the pairs (row = row0 + mt * 16 + lane / 4 + 8 * h)
// of elements acc[mt][nb][t][2h], [2h + 1] = out[row][col], [col + 1].
template <int MT, int NB, int T, int NBW, typename ColFn, typename PairFn>
__device__ __forceinline__ void for_each_out_pair(const int (&nblk)[NB], const bool (&nvalid)[NB], int row0, int M,
                                                  int lane, ColFn&& col_fn, PairFn&& pair_fn) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    if (!nvalid[nb]) continue;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const int col = nblk[nb] * NBW + t * 8 + 2 * (lane & 3);
      const auto cv = col_fn(col);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + mt * 16 + (lane >> 2) + 8 * h;
          if (row >= M) continue;
          pair_fn(cv, row, col, mt, nb, t, h);
        }
      }
    }
  }
}

// Split z's partial pair (v0, v1) of out[row][col], col + 1 in the workspace ws[z][M][N].
template <typename A>
__device__ __forceinline__ void store_partial(A* ws, int z, int M, int N, int row, int col, A v0, A v1) {
  using V2 = typename AccVec<A>::V2;
  const size_t o = (static_cast<size_t>(z) * M + row) * N + col;
  *reinterpret_cast<V2*>(ws + o) = V2{v0, v1};
}

// In-kernel split-k: counts this CTA's arrival at its (n, m) tile and tells whether it is the last of the
// gridDim.z splits, i.e. the one that sums every split's partial (all visible once this returns true). The
// RT threads tid < RT that still run take part (named barrier 1). The last CTA resets counters[tile_id] to 0
// when done (splitk_done), so the counters are zero again for the next launch on the stream.
template <int RT>
__device__ __forceinline__ bool splitk_last_cta(int* counters, int tile_id, int tid) {
  __shared__ int s_last;
  __threadfence();  // this CTA's partials are visible device-wide before it is counted
  asm volatile("bar.sync 1, %0;" ::"n"(RT) : "memory");
  if (tid == 0) s_last = atomicAdd(counters + tile_id, 1) == static_cast<int>(gridDim.z) - 1;
  asm volatile("bar.sync 1, %0;" ::"n"(RT) : "memory");
  if (!s_last) return false;
  __threadfence();
  return true;
}

__device__ __forceinline__ void splitk_done(int* counters, int tile_id, int tid) {
  if (tid == 0) counters[tile_id] = 0;  // ready for the next launch on this stream
}

// Sum over the nz splits of the partials ws[z][M][N] at element o (a pair), in split order 0, 1, ...; through
// L2 (__ldcg): the partials were written by other CTAs of this launch.
template <typename A>
__device__ __forceinline__ typename AccVec<A>::V2 sum_splits2(const A* ws, size_t o, size_t mn, int nz) {
  using V2 = typename AccVec<A>::V2;
  V2 v = __ldcg(reinterpret_cast<const V2*>(ws + o));
  for (int z = 1; z < nz; ++z) {
    const V2 u = __ldcg(reinterpret_cast<const V2*>(ws + z * mn + o));
    v.x += u.x;
    v.y += u.y;
  }
  return v;
}

// Sum over the splits of the partials ws[z][M][N] at the 4-element group i, in split order 0, 1, ... (the
// split-k reduce kernels).
template <typename A>
__device__ __forceinline__ typename AccVec<A>::V4 sum_splits4(const A* ws, size_t i, size_t mn, int splits) {
  using V4 = typename AccVec<A>::V4;
  V4 acc = reinterpret_cast<const V4*>(ws)[i];
  for (int z = 1; z < splits; ++z) {
    const V4 v = reinterpret_cast<const V4*>(ws + z * mn)[i];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  return acc;
}

}  // namespace quick
