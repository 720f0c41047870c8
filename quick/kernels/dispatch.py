"""Pick the GPU kernel for a packed layout and an input; ``None`` means "use the reference path"."""

from __future__ import annotations

from collections.abc import Callable

import torch

KernelFn = Callable[[torch.Tensor, dict, int], torch.Tensor]


def kernel_for(layout: str, x: torch.Tensor) -> KernelFn | None:
    """Return ``fn(x2d, packed_tensors, group_size) -> out2d`` or ``None`` when no kernel applies."""
    return None
