// quick_moe_plan.cuh: the sorted-token plan of a mixture-of-experts batch, computed by one whole CTA.
//
// Computes exactly what quick/nn/moe.py: build_plan(static=True, check=False) computes with about thirty PyTorch
// kernels: the slots (token * top_k + j) grouped by expert in increasing slot order, each expert's run padded
// with the padding id (= slots) to a multiple of the block size, the expert of every block (-1 past the padded
// total), the padded offsets, the counts and the padded total. Ids outside [0, E] count as dropped slots (expert
// id E, transformers' marker), which appear nowhere.
//
// Padding fill and histogram (shared atomics) by all threads; a scan of the padded counts by warp 0; block experts
// by all threads (binary search over the offsets); then warp 0 places the slots, 32 at a time: __match_any_sync
// groups the lanes with equal experts, a lane's rank is the number of such lanes below it, and each expert's
// running count in shared memory advances once per group. That keeps every expert's slots in slot order (the plan
// PyTorch's stable sort gives) without a sort. Used by quick_moe_plan.cu (ids from global memory) and
// quick_moe_route.cu (ids the same CTA just chose, in shared memory).
#pragma once
#include <cstdint>

namespace qplan {
constexpr int THREADS = 1024;
constexpr int MAX_E = 1024;  // the launchers refuse more experts
constexpr unsigned FULL = 0xffffffffu;

template <typename IdT>
__device__ __forceinline__ int expert_of(IdT id, int num_experts) {
  return (id < 0 || id > num_experts) ? num_experts : static_cast<int>(id);
}

// Every thread of a CTA of THREADS threads calls this; `ids` may point to global or shared memory.
template <typename IdT>
__device__ void build(const IdT* ids, int* __restrict__ sorted_ids, int* __restrict__ block_experts,
                      int* __restrict__ offsets, int* __restrict__ counts, int* __restrict__ num_padded, int slots,
                      int num_experts, int block_size, int capacity) {
  __shared__ int cnt[MAX_E + 1];  // per expert (and the dropped slots at E)
  __shared__ int off[MAX_E + 1];  // padded offsets, off[E] = the padded total
  __shared__ int run[MAX_E];      // slots placed so far per expert
  const int tid = threadIdx.x;
  const int E = num_experts;

  for (int e = tid; e <= E; e += THREADS) {
    cnt[e] = 0;
    if (e < E) run[e] = 0;
  }
  for (int j = tid; j < capacity; j += THREADS) sorted_ids[j] = slots;  // padding, overwritten below by real slots
  __syncthreads();
  for (int i = tid; i < slots; i += THREADS) atomicAdd(&cnt[expert_of(ids[i], E)], 1);
  __syncthreads();

  if (tid < 32) {  // exclusive scan of the padded counts, 32 experts per round
    int carry = 0;
    for (int base = 0; base < E; base += 32) {
      const int e = base + tid;
      const int p = e < E ? (cnt[e] + block_size - 1) / block_size * block_size : 0;
      int x = p;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int y = __shfl_up_sync(FULL, x, d);
        if (tid >= d) x += y;
      }
      if (e < E) off[e] = carry + x - p;
      carry += __shfl_sync(FULL, x, 31);
    }
    if (tid == 0) off[E] = carry;
  }
  __syncthreads();  // also orders the padding fill before the placement below

  const int total = off[E];
  for (int e = tid; e <= E; e += THREADS) {
    offsets[e] = off[e];
    if (e < E) counts[e] = cnt[e];
  }
  if (tid == 0) num_padded[0] = total;
  for (int b = tid; b < capacity / block_size; b += THREADS) {
    const int start = b * block_size;
    int expert = -1;
    if (start < total) {  // the number of j in [1, E] with off[j] <= start (start < off[E] bounds it by E - 1)
      int lo = 1, hi = E;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (off[mid] <= start) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      expert = lo - 1;
    }
    block_experts[b] = expert;
  }

  if (tid < 32 && capacity > 0) {  // capacity 0: counts and offsets only (the router wants no plan)
    const unsigned below = (1u << tid) - 1u;
    for (int base = 0; base < slots; base += 32) {
      const int i = base + tid;
      const int e = i < slots ? expert_of(ids[i], E) : E + 1;  // lanes past the end: a group of their own
      const unsigned peers = __match_any_sync(FULL, e);
      const int rank = __popc(peers & below);
      const int before = e < E ? run[e] : 0;
      __syncwarp();  // every lane has read its expert's count before the group's first lane advances it
      const int dst = e < E ? off[e] + before + rank : capacity;
      if (dst < capacity) {  // always, for a capacity of at least the launcher's bound
        sorted_ids[dst] = i;
        if (rank == 0) run[e] = before + __popc(peers);
      }
      __syncwarp();
    }
  }
}
}  // namespace qplan
