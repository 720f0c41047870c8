"""A model's floating dtypes around its packed layers: which dtype the dense parts compute in, and rounding them to
the grid a checkpoint stores."""

from __future__ import annotations

import torch
from torch import nn

from quick.nn.linear import QuickLinear


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run the dense parts of ``model`` in ``dtype``; packed layers keep their scale dtype.

    Where the two differ, each ``QuickLinear`` casts its input to its own dtype and its output back to
    ``dtype`` -- the activations a half-precision GPU kernel would see. This is what lets a model with
    fp16 packed weights run its norms, attention and embeddings in fp32 on CPU, where half-precision
    matmuls are very slow.
    """
    for mod in model.modules():
        if isinstance(mod, QuickLinear):
            mod.set_compute_dtype(dtype)
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def round_dense_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round dense floating parameters to ``dtype``'s grid (keeping their dtype): what a checkpoint stores."""
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuickLinear):
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point() and id(p) not in seen and p.dtype != dtype:
                seen.add(id(p))
                p.data = p.data.to(dtype).to(p.dtype)
    return model
