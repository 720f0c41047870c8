"""Fused projections at load time: q/k/v -> one linear, gate/up -> one linear (one kernel call per group).

At decode sizes a 4-bit GEMM costs about as much per launch as per byte, so three launches for q, k and v
(two for gate and up) waste time that one launch over the concatenated output columns does not. Which
linears share one input is already written down as data for AWQ (:mod:`quick.models.families`: a
``ScaleGroup`` with several ``linears``), so the fusion groups are derived from it, not hard-coded.

Packed layouts concatenate along N without repacking: every layout here interleaves within blocks of
columns (``awq_gemm``: 8 columns per int32; ``quick``: k16 x n64 blocks, scales in blocks of 64;
``quick_sm90``: n16 x k64 blocks, scales in blocks of 16) and stores the blocks of one block-row in N order,
so ``cat(packed(W_a), packed(W_b), dim=-1) == packed(cat(W_a, W_b))`` when every part's N is a multiple of
the block width (which any packed part already is). Layouts not known to have that property are repacked
through the unpacked codes (vectorized, exact).

The parent module (e.g. ``LlamaAttention``) still calls ``q_proj``, ``k_proj`` and ``v_proj``: those become
:class:`FusedSlice` stand-ins that return views of the one fused product, computed on the first call for
an input and dropped once every part has been handed out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quick.models.families import ModelFamily, decoder_layers, get_family
from quick.nn.linear import QuickLinear
from quick.packing.layouts import get_layout
from quick.quant.primitives import QuantizedWeight

# Layouts whose packed tensors concatenate along their last (N) axis (see the module docstring; the tests
# check it against repacking for each). Any other layout is repacked through the unpacked codes.
CONCAT_SAFE_LAYOUTS = frozenset({"awq_gemm", "quick", "quick_sm90"})


class FuseError(ValueError):
    """Linears that cannot be fused (different inputs, group sizes, layouts, dtypes or devices)."""


@dataclass(frozen=True)
class FuseGroup:
    """Linears of one decoder layer that read the same input; ``fused`` is the new module's name."""

    fused: str
    members: tuple[str, ...]


def _fused_name(members: tuple[str, ...]) -> str:
    parents = {m.rpartition(".")[0] for m in members}
    if len(parents) != 1:
        raise FuseError(f"linears {members} do not share one parent module")
    short = [m.rpartition(".")[2].removesuffix("_proj") for m in members]
    stem = ("" if all(len(s) == 1 for s in short) else "_").join(short) + "_proj"  # qkv_proj, gate_up_proj
    parent = parents.pop()
    return f"{parent}.{stem}" if parent else stem


def fuse_groups(family: ModelFamily) -> list[FuseGroup]:
    """The family's scale groups with more than one linear: exactly the linears that share an input."""
    return [FuseGroup(_fused_name(g.linears), g.linears) for g in family.groups if len(g.linears) > 1]


class FusedProjection(nn.Module):
    """One linear whose output is the concatenation of several projections of the same input."""

    def __init__(self, linear: nn.Module, sizes: tuple[int, ...], names: tuple[str, ...]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes, self.names = tuple(sizes), tuple(names)
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


def _concat_quick(mods: list[QuickLinear]) -> QuickLinear:
    first = mods[0]
    keys = ("in_features", "logical_in_features", "group_size", "layout_name", "dtype")
    for m in mods[1:]:
        for key in keys:
            if getattr(m, key) != getattr(first, key):
                raise FuseError(
                    f"cannot fuse QuickLinears with different {key}: {getattr(first, key)} vs {getattr(m, key)}"
                )
        if m.perm is not None or first.perm is not None:
            raise FuseError("cannot fuse QuickLinears with an input permutation (act-order checkpoints)")
        if m.qweight.device != first.qweight.device:
            raise FuseError(f"cannot fuse layers on {first.qweight.device} and {m.qweight.device}")
    k, g, name = first.in_features, first.group_size, first.layout_name
    n = sum(m.out_features for m in mods)
    fused = QuickLinear(
        k,
        n,
        any(m.bias is not None for m in mods),
        g,
        name,
        first.dtype,
        first.qweight.device,
        first.logical_in_features,
    )
    fused.backend = first.backend
    if name in CONCAT_SAFE_LAYOUTS:
        for key in fused.packed():
            getattr(fused, key).copy_(torch.cat([m.packed()[key] for m in mods], dim=-1))
    else:  # generic: through the unpacked codes (exact)
        parts = [m.unpack() for m in mods]
        qw = QuantizedWeight(
            q=torch.cat([p.q for p in parts], dim=1),
            scales=torch.cat([p.scales for p in parts], dim=1),
            zeros=torch.cat([p.zeros for p in parts], dim=1),
            group_size=parts[0].group_size,
        )
        for key, t in get_layout(name).pack(qw).items():
            getattr(fused, key).copy_(t)
    if fused.bias is not None:
        fused.bias.copy_(
            torch.cat([m.bias if m.bias is not None else m.scales.new_zeros(m.out_features) for m in mods])
        )
    fused.set_compute_dtype(getattr(first, "compute_dtype", None))  # e.g. fp32 activations around fp16 scales
    return fused


def _concat_dense(mods: list[nn.Linear]) -> nn.Linear:
    first = mods[0]
    for m in mods[1:]:
        if (m.in_features, m.weight.dtype, m.weight.device) != (
            first.in_features,
            first.weight.dtype,
            first.weight.device,
        ):
            raise FuseError("cannot fuse nn.Linears with different in_features, dtypes or devices")
    has_bias = any(m.bias is not None for m in mods)
    w = first.weight
    fused = nn.Linear(first.in_features, sum(m.out_features for m in mods), has_bias, w.device, w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in mods], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features) for m in mods]))
    fused.requires_grad_(first.weight.requires_grad)
    return fused


def fuse_linears(mods: list[nn.Module]) -> nn.Module:
    """One linear computing ``cat([m(x) for m in mods], -1)``: QuickLinears or plain ``nn.Linear``s."""
    if len(mods) < 2:
        raise FuseError("need at least two linears to fuse")
    if all(isinstance(m, QuickLinear) for m in mods):
        return _concat_quick(mods)
    if all(type(m) is nn.Linear for m in mods):
        return _concat_dense(mods)
    raise FuseError(f"cannot fuse {[type(m).__name__ for m in mods]}: all QuickLinear or all nn.Linear")


def fuse_model(model: nn.Module, family: ModelFamily | None = None) -> int:
    """Fuse every shared-input group of every decoder layer in place; returns the number of fused groups.

    Groups whose members are not all linears of one kind (or already fused) are left alone. Fuse after
    loading: the fused model's ``state_dict`` has the fused names (``self_attn.qkv_proj.linear.*``)."""
    family = family or get_family(model.config)
    done = 0
    for layer in decoder_layers(model, family):
        for group in fuse_groups(family):
            mods = [layer.get_submodule(m) for m in group.members]
            if any(isinstance(m, FusedSlice) for m in mods):
                continue
            if not (all(isinstance(m, QuickLinear) for m in mods) or all(type(m) is nn.Linear for m in mods)):
                continue
            if any(getattr(m, "perm", None) is not None for m in mods):
                continue  # act-order layers: each member has its own input permutation
            fused = fuse_linears(mods)
            owner = FusedProjection(fused, tuple(m.out_features for m in mods), group.members)
            parent_name, _, fused_attr = group.fused.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, fused_attr, owner)
            for i, member in enumerate(group.members):
                setattr(parent, member.rpartition(".")[2], FusedSlice(owner, i))
            done += 1
    return done
