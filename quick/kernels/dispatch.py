"""The op a packed layout's layer calls on an input, or ``None`` ("use the reference path").

A small registry from layout to the entry of its ``torch.library`` op (:mod:`quick.kernels.ops`): the highest
priority entry whose ``available(x)`` is true wins; the built-in layouts register on the first lookup, and other
code may offer an entry with :func:`register_kernel`. Which kernel and configuration runs inside the op is
:mod:`quick.kernels.select`'s choice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

KernelFn = Callable[[torch.Tensor, dict, int], torch.Tensor]
Available = Callable[[torch.Tensor], bool]


@dataclass(frozen=True)
class KernelEntry:
    layout: str
    fn: KernelFn
    available: Available
    priority: int
    name: str


_REGISTRY: dict[str, list[KernelEntry]] = {}
_LOCK = threading.RLock()
_LOADED = False


def register_kernel(
    layout: str, fn: KernelFn, available: Available, priority: int = 0, name: str | None = None
) -> KernelEntry:
    """Offer ``fn(x2d, packed, group_size) -> out2d`` for ``layout``; ``available(x)`` says whether it can run
    on that input (device, dtype, shape); among available entries the highest ``priority`` is used.
    Registering the same ``name`` twice for a layout replaces the first entry."""
    entry = KernelEntry(layout, fn, available, priority, name or getattr(fn, "__qualname__", repr(fn)))
    with _LOCK:
        entries = [e for e in _REGISTRY.get(layout, []) if e.name != entry.name]
        entries.append(entry)
        entries.sort(key=lambda e: -e.priority)
        _REGISTRY[layout] = entries
    return entry


def unregister_kernel(layout: str, name: str) -> None:
    with _LOCK:
        _REGISTRY[layout] = [e for e in _REGISTRY.get(layout, []) if e.name != name]


def registered(layout: str | None = None) -> list[KernelEntry]:
    """Entries for one layout (or all), highest priority first."""
    _load_builtin()
    with _LOCK:
        if layout is not None:
            return list(_REGISTRY.get(layout, []))
        return [e for lay in sorted(_REGISTRY) for e in _REGISTRY[lay]]


def _load_builtin() -> None:
    """Register the built-in entries once (lazily: importing this module must stay cheap and must not need CUDA)."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        from quick.kernels import mma, ops, w4a8_mma, w4a8_wgmma, wgmma

        register_kernel("quick", ops.linear_fn, mma.is_available, priority=10, name="quick_mma")
        register_kernel("quick_sm90", ops.linear_fn_sm90, wgmma.takes_input, priority=100, name="quick_sm90")
        register_kernel("w4a8", ops.linear_w4a8, w4a8_mma.is_available, priority=10, name="quick_w4a8")
        register_kernel("w4a8_sm90", ops.linear_w4a8_sm90, w4a8_wgmma.takes_input, priority=100, name="quick_w4a8_sm90")


def kernel_for(layout: str, x: torch.Tensor) -> KernelFn | None:
    """Return ``fn(x2d, packed_tensors, group_size) -> out2d`` or ``None`` when no kernel applies."""
    for e in registered(layout):
        try:
            ok = e.available(x)
        except Exception:
            ok = False
        if ok:
            return e.fn
    return None
