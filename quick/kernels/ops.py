"""``torch.ops.quick.gemm_w4a16``: the QUICK W4A16 product as a torch.library custom op.

One opaque op with a fake (meta) implementation, so that ``torch.compile`` traces through models that use it
without looking inside, and CUDA graphs capture it (the launcher enqueues on torch's current stream and
allocates its split-k workspace through torch's caching allocator).

``gemm_w4a16(x [..., K], qweight [K/16, 2N] int32, scales [K/G, N], zeros [K/G, N], group_size, bias [N]?)
-> [..., N]`` in x's dtype, weights in the ``quick`` layout.
"""

# No `from __future__ import annotations` here: torch.library infers the op schema from real annotations.

import torch

from quick.kernels import quick_mma


@torch.library.custom_op("quick::gemm_w4a16", mutates_args=())
def gemm_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W) (+ bias)`` on the QUICK mma.sync kernels (GEMV for <= 8 rows)."""
    x2 = quick_mma._flatten(x)
    out = quick_mma.quick_matmul(x2, qweight, scales, zeros, group_size, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@gemm_w4a16.register_fake
def _gemm_w4a16_fake(x, qweight, scales, zeros, group_size, bias=None):
    x2 = quick_mma._flatten(x)
    _, _, n, _ = quick_mma.validate(x2, qweight, scales, zeros, group_size, bias, need_cuda=False)
    return x.new_empty((*x.shape[:-1], n))


def linear_fn(x2d: torch.Tensor, packed: dict, group_size: int) -> torch.Tensor:
    """The dispatcher's entry for layout ``quick``: ``fn(x2d, packed_tensors, group_size) -> out2d``.
    Callers hand in views (``x[:, :1].reshape(...)``); the kernels need dense rows, so copy those."""
    x2d = quick_mma._dense_rows(x2d)
    return torch.ops.quick.gemm_w4a16(x2d, packed["qweight"], packed["scales"], packed["zeros"], group_size)
