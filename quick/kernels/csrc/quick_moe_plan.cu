// quick_moe_plan.cu: the sorted-token plan of a mixture-of-experts batch in one launch, from expert ids in global
// memory (the plan itself: quick_moe_plan.cuh). One CTA; sized for decode batches: the launcher sends more than
// its MAX_SLOTS slots to the PyTorch path.
//
// Compile-time configuration (-D): QP_IDX64 (1: int64 ids, as torch.topk returns them; 0: int32).
#include <cstdint>

#include "quick_moe_plan.cuh"

#ifndef QP_IDX64
#define QP_IDX64 1
#endif

#if QP_IDX64
typedef long long qp_idx_t;
#else
typedef int qp_idx_t;
#endif

namespace {
constexpr int THREADS = 1024;
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    quick_moe_plan(const qp_idx_t* __restrict__ ids, int* __restrict__ sorted_ids, int* __restrict__ block_experts,
                   int* __restrict__ offsets, int* __restrict__ counts, int* __restrict__ num_padded, int slots,
                   int num_experts, int block_size, int capacity) {
  __shared__ quick_moe::PlanSmem sm;
  quick_moe::build_plan<THREADS>(ids, sorted_ids, block_experts, offsets, counts, num_padded, slots, num_experts,
                                 block_size, capacity, sm);
}
