"""The modules a fused projection is made of: the one linear over several projections' concatenated outputs
(:class:`FusedProjection`) and the stand-ins its parent module still calls (:class:`FusedSlice`).
:func:`quick.models.fuse.fuse_model` builds them from a model family's scale groups."""

from __future__ import annotations

import torch
from torch import nn


class FusedProjection(nn.Module):
    """One linear whose output is the concatenation of several projections of the same input."""

    def __init__(
        self,
        linear: nn.Module,
        sizes: tuple[int, ...],
        names: tuple[str, ...],
        biased: tuple[bool, ...] | None = None,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.sizes, self.names = tuple(sizes), tuple(names)
        # which members had a bias (the fused bias holds zeros for the others): unfusing gives back the same layers
        has_bias = getattr(linear, "bias", None) is not None
        self.biased = tuple(biased) if biased is not None else (has_bias,) * len(self.sizes)
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] | None = None
        self._pending = 0  # bit i set: part i of the current product not handed out yet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index`` of the fused product of ``x``: computed once per input, views handed out, and the
        reference dropped when every part was taken (so no activation outlives its step)."""
        if self._parts is None or self._input is not x or not (self._pending >> index) & 1:
            self._parts = self(x)
            self._input = x
            self._pending = (1 << len(self.sizes)) - 1
        out = self._parts[index]
        self._pending &= ~(1 << index)
        if self._pending == 0:
            self._input = self._parts = None
        return out

    def extra_repr(self) -> str:
        return f"parts={dict(zip(self.names, self.sizes, strict=True))}"


class FusedSlice(nn.Module):
    """Stands in for one fused linear: returns its columns of the shared product (a view)."""

    def __init__(self, owner: FusedProjection, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the weights live once, on the owner
        self.index = index
        self.out_features = owner.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner.part(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} ({self._owner.names[self.index]}) of a fused projection"
