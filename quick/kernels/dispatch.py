"""Pick the GPU kernel for a packed layout and an input; ``None`` means "use the reference path".

A small registry: any module can offer a kernel for a layout with :func:`register_kernel`; the highest
priority entry whose ``available(x)`` is true wins. The built-in QUICK mma.sync kernel registers for layout
``quick``; optional kernel modules listed in ``OPTIONAL_MODULES`` (the Hopper wgmma kernel,
``quick.kernels.quick_sm90``) are imported lazily on the first lookup, if they exist, and register themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

KernelFn = Callable[[torch.Tensor, dict, int], torch.Tensor]
Available = Callable[[torch.Tensor], bool]

OPTIONAL_MODULES = ("quick.kernels.quick_w4a8", "quick.kernels.quick_w4a8_sm90")


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
    """Register the built-in kernel and import the optional kernel modules once (lazily: importing this
    module must stay cheap and must not need CUDA)."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        from quick.kernels import ops, quick_mma, quick_sm90

        register_kernel("quick", ops.linear_fn, quick_mma.is_available, priority=10, name="quick_mma")
        register_kernel("quick_sm90", ops.linear_fn_sm90, quick_sm90.takes_input, priority=100, name="quick_sm90")
        for mod in OPTIONAL_MODULES:
            try:
                if importlib.util.find_spec(mod) is None:
                    continue
                importlib.import_module(mod)
            except Exception as e:  # a broken optional kernel must not take the reference path down with it
                warnings.warn(f"optional kernel module {mod} failed to import: {e}", RuntimeWarning, stacklevel=2)


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
