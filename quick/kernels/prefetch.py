"""Cross-kernel L2 prefetch of the next linear's weights during a decode step.

At batch 1 a decode step alternates weight-streaming linears with small kernels (norms, rotary, attention) that
leave DRAM idle, and each linear's own tail (its last CTAs, its split-k reduction) leaves it half idle too. The
decode kernel (``csrc/quick_dec.cu``) therefore takes the weights of the linear that runs after it: once a CTA has
issued its last weight load it asks the L2 for its share of them (``cp.async.bulk.prefetch.L2`` on sm_90), so the
next linear finds part of its stream in L2. The hint changes no result.

:func:`chain` records the order: ``QuickLinear.l2_next`` gives the next layer's ``qweight``; the kernel fetches
at most :data:`MAX_BYTES` of it (``QUICK_L2_PREFETCH_MB``, 0 switches the prefetch off), because a prefetch larger
than what the L2 keeps until the next linear reads it only evicts itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quick.kernels import tuning

LAYOUTS = ("quick_sm90",)  # layouts whose decode route takes ``l2_next``
MAX_BYTES = tuning.env_max_m("QUICK_L2_PREFETCH_MB", default=24) << 20


def prefetch_bytes(t: torch.Tensor | None, limit: int | None = None) -> int:
    """How many bytes of ``t`` the kernel asks the L2 for: all of it up to ``limit`` (default :data:`MAX_BYTES`),
    a multiple of 16 (the bulk prefetch's unit); 0 for ``None`` or a tensor not 16-byte aligned. (The launcher
    also drops a tensor on another device.)"""
    if t is None or t.data_ptr() % 16:
        return 0
    limit = MAX_BYTES if limit is None else limit
    return min(t.numel() * t.element_size(), limit) // 16 * 16


def chain(linears: Sequence[nn.Module], enabled: bool = True) -> int:
    """Give each linear of ``linears`` (in call order) the one after it as ``l2_next`` (its ``qweight``), where
    both are ``QuickLinear`` of a layout in :data:`LAYOUTS`; clears it elsewhere (everywhere when not
    ``enabled``). Returns how many were set."""
    from quick.nn.linear import QuickLinear

    linears = list(linears)
    count = 0
    for cur, nxt in zip(linears, [*linears[1:], None], strict=True):
        if not isinstance(cur, QuickLinear):
            continue
        ok = enabled and MAX_BYTES > 0 and isinstance(nxt, QuickLinear) and cur.layout_name in LAYOUTS
        cur.set_l2_next(nxt if ok else None)
        count += ok
    return count


def unchain(model: nn.Module) -> None:
    """Clear every ``l2_next`` under ``model``."""
    from quick.nn.linear import QuickLinear

    for m in model.modules():
        if isinstance(m, QuickLinear):
            m.set_l2_next(None)
