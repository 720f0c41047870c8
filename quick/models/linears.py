"""A model's linear layers by name: what the quantizers and the random-model builders walk."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

DEFAULT_SKIP = ("lm_head",)  # the output projection stays 16-bit unless asked for


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding submodule ``name`` and the attribute it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """All ``nn.Linear`` modules whose name contains none of ``skip``."""
    skip = tuple(skip)
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not any(s in name for s in skip)
    ]
