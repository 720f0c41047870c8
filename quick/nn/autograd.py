"""Backward through a packed 4-bit product with respect to its input (the weights are frozen).

``y = x @ dequant(W)`` gives ``dL/dx = dL/dy @ dequant(W)^T``; nothing flows to the packed tensors. That is all
LoRA needs: the adapters' gradients reach every layer through the inputs of the frozen 4-bit layers.

* CPU (and the reference path on any device): :func:`quick.nn.linear.reference_forward` is a plain
  dequantize-then-``F.linear``, which autograd differentiates as it is.
* GPU kernels: a kernel launch is opaque to autograd, so :func:`kernel_product` wraps it in
  :class:`KernelProduct`, whose backward multiplies by the reference dequantized weight (no transposed 4-bit kernel
  exists; the dense copy lives only during the backward of one layer). The wrapper sits around whatever kernel the
  dispatcher picked, so a kernel registered later gets a correct backward too, instead of cutting the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

KernelFn = Callable[[torch.Tensor, dict, int], torch.Tensor]


class KernelProduct(torch.autograd.Function):
    """``fn(x2d, packed, group_size)`` forward; ``grad @ dequant(W)^T`` backward (``x2d`` is ``[M, in_features]``:
    already padded and permuted as the packed weight expects)."""

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, fn: KernelFn, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return fn(x2d, module.packed(), module.group_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.module.unpack().dequantize(grad.dtype)  # [in_features, N], the order the kernel reads
        return grad @ w.t(), None, None


def kernel_product(fn: KernelFn, x2d: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``fn(x2d, module.packed(), module.group_size)``, differentiable in ``x2d`` when autograd needs it."""
    if torch.is_grad_enabled() and x2d.requires_grad:
        return KernelProduct.apply(x2d, fn, module)
    return fn(x2d, module.packed(), module.group_size)
