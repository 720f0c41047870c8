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

W4A8 layers (:class:`~quick.nn.linear_w4a8.QuickLinearW4A8`) concatenate the same way in every storage: the
``w4a8`` (k32 x n32 blocks, group scales in blocks of 32) and ``w4a8_sm90`` (k128 x n16, group scales in blocks of
16) layouts store their blocks in N order with per-column data in blocks of the same width, the unpacked ``q`` is
``[N, K]`` and every scale has N last. Members stored differently (a packed ``q_proj`` next to ``k_proj`` /
``v_proj`` too narrow for the layout) or with other group sizes, dtypes or backends stay unfused, with a warning
that says why.

The parent module (e.g. ``LlamaAttention``) still calls ``q_proj``, ``k_proj`` and ``v_proj``: those become
:class:`FusedSlice` stand-ins that return views of the one fused product, computed on the first call for
an input and dropped once every part has been handed out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizedWeight
from quick.models.families import ModelFamily, decoder_layers, get_family
from quick.nn.fused import FusedProjection, FusedSlice
from quick.nn.linear import QuickLinear
from quick.nn.linear_w4a8 import UNPACKED, QuickLinearW4A8, w4a8_layouts

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
    """The family's scale groups with more than one linear: exactly the linears that share an input. Expert linears
    (``*`` in the name: stacked into the grouped kernels' own layout) and groups across parents are not fused."""
    return [
        FuseGroup(_fused_name(g.linears), g.linears)
        for g in family.groups
        if len(g.linears) > 1 and not any("*" in n for n in g.linears)
    ]


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


# The axis of N in each stored W4A8 tensor: unpacked codes are [N, K]; packed codes, channel and group scales
# (packed or not) have N last.
_W4A8_N_AXIS = {"q": 0}


def _concat_w4a8(mods: list[QuickLinearW4A8]) -> QuickLinearW4A8:
    """The stored tensors of every member concatenated along N (exact for every storage, see the module
    docstring): no unpacking, no repacking."""
    first = mods[0]
    for key in ("in_features", "logical_in_features", "group_size", "storage", "dtype", "backend"):
        for m in mods[1:]:
            if getattr(m, key) != getattr(first, key):
                raise FuseError(
                    f"cannot fuse W4A8 layers with different {key}: {getattr(first, key)} vs {getattr(m, key)}"
                )
    devices = {t.device for m in mods for t in m.stored().values()}
    if len(devices) != 1:
        raise FuseError(f"cannot fuse W4A8 layers on several devices: {sorted(map(str, devices))}")
    if first.storage != UNPACKED:
        width = w4a8_layouts()[first.storage].n_multiple
        ragged = [m.out_features for m in mods if m.out_features % width]
        if ragged:  # cannot happen for layers the layout packed; a concatenation would not be the layout's
            raise FuseError(
                f"layout '{first.storage}' interleaves columns in blocks of {width}; out_features {ragged} are not "
                "whole blocks"
            )
    tensors = {
        name: torch.cat([m.stored()[name] for m in mods], dim=_W4A8_N_AXIS.get(name, -1)) for name in first.stored()
    }
    bias = None
    if any(m.bias is not None for m in mods):
        zeros = tensors["channel_scale"].new_zeros  # a member without bias adds zeros
        bias = torch.cat([m.bias if m.bias is not None else zeros(m.out_features, dtype=first.dtype) for m in mods])
    fused = QuickLinearW4A8.from_stored(
        tensors, first.storage, first.group_size, bias, first.dtype, first.logical_in_features
    )
    fused.backend = first.backend
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
    """One linear computing ``cat([m(x) for m in mods], -1)``: QuickLinears, QuickLinearW4A8s or plain
    ``nn.Linear``s (one kind)."""
    if len(mods) < 2:
        raise FuseError("need at least two linears to fuse")
    if all(isinstance(m, QuickLinear) for m in mods):
        return _concat_quick(mods)
    if all(isinstance(m, QuickLinearW4A8) for m in mods):
        return _concat_w4a8(mods)
    if all(type(m) is nn.Linear for m in mods):
        return _concat_dense(mods)
    raise FuseError(
        f"cannot fuse {[type(m).__name__ for m in mods]}: all QuickLinear, all QuickLinearW4A8 or all nn.Linear"
    )


_KINDS = (QuickLinear, QuickLinearW4A8)


def fuse_model(model: nn.Module, family: ModelFamily | None = None) -> int:
    """Fuse every shared-input group of every decoder layer in place; returns the number of fused groups.

    Groups whose members are not all linears of one kind (or already fused) are left alone; groups of one kind
    that cannot be fused (:class:`FuseError`: other group sizes, storages, dtypes ...) too, with one warning per
    reason. Fuse after loading: the fused model's ``state_dict`` has the fused names
    (``self_attn.qkv_proj.linear.*``)."""
    family = family or get_family(model.config)
    done = 0
    refused: dict[str, list[str]] = {}
    for index, layer in enumerate(decoder_layers(model, family)):
        for group in fuse_groups(family):
            try:
                mods = [layer.get_submodule(m) for m in group.members]
            except AttributeError:  # not in this layer: a MoE block's per-expert names, a dense MLP of a MoE model
                continue
            if any(isinstance(m, FusedSlice) for m in mods):
                continue
            kinds = {next((k for k in _KINDS if isinstance(m, k)), type(m)) for m in mods}
            if len(kinds) != 1 or kinds.pop() not in (*_KINDS, nn.Linear):
                continue
            if any(getattr(m, "perm", None) is not None for m in mods):
                continue  # act-order layers: each member has its own input permutation
            try:
                fused = fuse_linears(mods)
            except FuseError as e:
                refused.setdefault(str(e), []).append(f"layer {index} {group.fused}")
                continue
            biased = tuple(getattr(m, "bias", None) is not None for m in mods)
            owner = FusedProjection(fused, tuple(m.out_features for m in mods), group.members, biased)
            parent_name, _, fused_attr = group.fused.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, fused_attr, owner)
            for i, member in enumerate(group.members):
                setattr(parent, member.rpartition(".")[2], FusedSlice(owner, i))
            done += 1
    for reason, where in refused.items():
        more = f" and {len(where) - 1} more" if len(where) > 1 else ""
        warnings.warn(f"kept unfused ({where[0]}{more}): {reason}", RuntimeWarning, stacklevel=2)
    if done:
        from quick.models.normquant import attach

        attach(model)  # the norms before W4A8 projections may quantize for them (QUICK_FUSIONS normquant)
    return done


# ------------------------------------------------------------------------------------------------- unfusing


def _columns(t: torch.Tensor, n: int, start: int, size: int, dim: int = -1) -> torch.Tensor:
    """Columns ``[start, start + size)`` of the ``n`` output columns that ``t`` stores along ``dim`` (a packed
    tensor stores a fixed share of ``t.shape[dim]`` per column, e.g. 1/8 of an int32 word: whole words for the
    block-aligned members of a fused layer)."""
    width = t.shape[dim]
    return t.narrow(dim, start * width // n, size * width // n).contiguous()


def _split_quick(fused: QuickLinear, sizes: tuple[int, ...], biased: tuple[bool, ...]) -> list[QuickLinear]:
    k, g, name, n = fused.in_features, fused.group_size, fused.layout_name, fused.out_features
    concat = name in CONCAT_SAFE_LAYOUTS
    whole = None if concat else fused.unpack()
    out, start = [], 0
    for size, has_bias in zip(sizes, biased, strict=True):
        mod = QuickLinear(k, size, has_bias, g, name, fused.dtype, fused.qweight.device, fused.logical_in_features)
        mod.backend = fused.backend
        if concat:
            tensors = {key: _columns(t, n, start, size) for key, t in fused.packed().items()}
        else:  # the inverse of the generic fusion: through the unpacked codes (exact)
            part = QuantizedWeight(
                q=whole.q[:, start : start + size],
                scales=whole.scales[:, start : start + size],
                zeros=whole.zeros[:, start : start + size],
                group_size=whole.group_size,
            )
            tensors = get_layout(name).pack(part)
        for key, t in tensors.items():
            getattr(mod, key).copy_(t)
        if has_bias:
            mod.bias.copy_(fused.bias[start : start + size])
        mod.set_compute_dtype(getattr(fused, "compute_dtype", None))
        out.append(mod)
        start += size
    return out


def _split_w4a8(fused: QuickLinearW4A8, sizes: tuple[int, ...], biased: tuple[bool, ...]) -> list[QuickLinearW4A8]:
    out, start, n = [], 0, fused.out_features
    for size, has_bias in zip(sizes, biased, strict=True):
        tensors = {key: _columns(t, n, start, size, _W4A8_N_AXIS.get(key, -1)) for key, t in fused.stored().items()}
        bias = fused.bias[start : start + size] if has_bias else None
        mod = QuickLinearW4A8.from_stored(
            tensors, fused.storage, fused.group_size, bias, fused.dtype, fused.logical_in_features
        )
        mod.backend = fused.backend
        out.append(mod)
        start += size
    return out


def _split_dense(fused: nn.Linear, sizes: tuple[int, ...], biased: tuple[bool, ...]) -> list[nn.Linear]:
    out, start, w = [], 0, fused.weight
    for size, has_bias in zip(sizes, biased, strict=True):
        mod = nn.Linear(fused.in_features, size, has_bias, w.device, w.dtype)
        with torch.no_grad():
            mod.weight.copy_(w[start : start + size])
            if has_bias:
                mod.bias.copy_(fused.bias[start : start + size])
        mod.requires_grad_(w.requires_grad)
        out.append(mod)
        start += size
    return out


def split_linear(owner: FusedProjection) -> list[nn.Module]:
    """The member linears of a fused projection, exactly as they were fused (codes, scales, biases, storage)."""
    lin = owner.linear
    if isinstance(lin, QuickLinear):
        return _split_quick(lin, owner.sizes, owner.biased)
    if isinstance(lin, QuickLinearW4A8):
        return _split_w4a8(lin, owner.sizes, owner.biased)
    if type(lin) is nn.Linear:
        return _split_dense(lin, owner.sizes, owner.biased)
    raise FuseError(f"cannot split a fused {type(lin).__name__}")


def _fused_owners(model: nn.Module) -> list[tuple[nn.Module, str, FusedProjection]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, FusedProjection)
    ]


def unfuse_needed(model: nn.Module) -> bool:
    """Whether ``model`` holds fused projections (:func:`fuse_model`)."""
    return any(isinstance(m, FusedProjection) for m in model.modules())


def _unfuse(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module | None]]:
    """Put the member linears back in place of every fused projection; returns ``(parent, attribute, previous
    module or None)`` for each change, in order."""
    changes: list[tuple[nn.Module, str, nn.Module | None]] = []
    for parent, name, owner in _fused_owners(model):
        for member, mod in zip(owner.names, split_linear(owner), strict=True):
            attr = member.rpartition(".")[2]
            changes.append((parent, attr, getattr(parent, attr, None)))
            setattr(parent, attr, mod)
        changes.append((parent, name, owner))
        delattr(parent, name)
    return changes


def unfuse_model(model: nn.Module) -> int:
    """Undo :func:`fuse_model` in place (exact: the members' own codes, scales and biases); returns the number of
    fused projections split."""
    return sum(isinstance(old, FusedProjection) for _, _, old in _unfuse(model))


@contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its fused projections split into the member linears while the block runs (what a checkpoint
    stores: the checkpoint's own linear names), the fused ones restored after it."""
    changes = _unfuse(model)
    try:
        yield model
    finally:
        for parent, attr, old in reversed(changes):
            if old is None:
                delattr(parent, attr)
            else:
                setattr(parent, attr, old)
