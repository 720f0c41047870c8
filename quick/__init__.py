"""QUICK for everyone: 4-bit LLM weight quantization (AWQ, group 128, zero points) on interleaved GPU kernels.

The main names are importable from here (``from quick import AutoQuickForCausalLM, QuickLinear``) but load on first
use: ``import quick`` imports neither torch nor transformers, so the ``quick`` command starts at once. It also
arranges that transformers' ``from_pretrained`` reads QUICK checkpoints once transformers is imported
(:mod:`quick._hooks`, docs/integrations.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from quick import _hooks
from quick._hooks import register_with_transformers

# public name -> module that defines it
_LAZY = {
    "AutoQuickForCausalLM": "quick.auto",
    "AutoAWQForCausalLM": "quick.awq",
    "QuickLinear": "quick.nn.linear",
    "QuickLinearW4A8": "quick.nn.linear_w4a8",
    "QuantizationError": "quick.formats.weights",
    "CheckpointError": "quick.checkpoint",
    "save_quantized": "quick.checkpoint",
    "load_quantized": "quick.checkpoint",
}

__all__ = [
    "AutoAWQForCausalLM",
    "AutoQuickForCausalLM",
    "CheckpointError",
    "QuantizationError",
    "QuickLinear",
    "QuickLinearW4A8",
    "__version__",
    "load_quantized",
    "register_with_transformers",
    "save_quantized",
]

if TYPE_CHECKING:
    from quick.auto import AutoQuickForCausalLM
    from quick.awq import AutoAWQForCausalLM
    from quick.checkpoint import CheckpointError, load_quantized, save_quantized
    from quick.formats.weights import QuantizationError
    from quick.nn.linear import QuickLinear
    from quick.nn.linear_w4a8 import QuickLinearW4A8


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("quick-llm")
        except PackageNotFoundError:
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quick' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_hooks.install()
