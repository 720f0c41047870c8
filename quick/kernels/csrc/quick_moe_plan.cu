// quick_moe_plan.cu: the sorted-token plan of a mixture-of-experts batch in one launch of one CTA, from the expert
// ids in global memory (quick_moe_plan.cuh says what it computes and how). Sized for decode batches: the launcher
// sends more than PLAN_MAX_SLOTS slots to the PyTorch path.
//
// Compile-time configuration (-D): QP_IDX64 (1: int64 ids, as torch.topk returns them; 0: int32).
#include "quick_moe_plan.cuh"

#ifndef QP_IDX64
#define QP_IDX64 1
#endif

#if QP_IDX64
typedef long long qp_idx_t;
#else
typedef int qp_idx_t;
#endif

extern "C" __global__ void __launch_bounds__(qplan::THREADS)
    quick_moe_plan(const qp_idx_t* __restrict__ ids, int* __restrict__ sorted_ids, int* __restrict__ block_experts,
                   int* __restrict__ offsets, int* __restrict__ counts, int* __restrict__ num_padded, int slots,
                   int num_experts, int block_size, int capacity) {
  qplan::build(ids, sorted_ids, block_experts, offsets, counts, num_padded, slots, num_experts, block_size, capacity);
}
