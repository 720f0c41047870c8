"""Swap a model's ``nn.Linear`` layers for packed :class:`QuickLinear` ones."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizationError
from quick.models.linears import DEFAULT_SKIP, parent_of, quantizable_linears
from quick.nn.linear import QuickLinear, padded_in_features


def quantize_model_rtn(
    model: nn.Module,
    group_size: int = 128,
    layout: str = "quick",
    zero_point: bool = True,
    dtype: torch.dtype | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
    progress: bool = True,
) -> nn.Module:
    """Round-to-nearest quantize every eligible linear in place and pack it into ``layout``; the experts of a
    mixture-of-experts family become :class:`~quick.nn.moe.QuickMoEExperts` (its router stays dense).

    Every layer is checked against the layout first, so a model is never left half converted."""
    from quick.models import moe

    linears = quantizable_linears(model, skip)
    experts = {n: m for n, m in moe.experts_modules(model).items() if not any(s in n for s in skip)}
    lay = get_layout(layout)
    for name, lin in linears:
        try:
            lay.check(padded_in_features(lin.in_features, group_size, layout), lin.out_features, group_size)
        except ValueError as e:
            raise QuantizationError(f"{name}: {e}") from None
    moe.check_experts(experts, group_size, layout)
    for name, lin in tqdm(linears, desc="quantize (RTN)", disable=not progress):
        q = QuickLinear.from_linear(lin, group_size, layout, zero_point, dtype)
        parent, child = parent_of(model, name)
        setattr(parent, child, q)
    moe.quantize_experts_rtn_(model, experts, group_size, layout, zero_point, dtype)
    return model


def quantize_model_rtn_w4a8(
    model: nn.Module,
    group_size: int = -1,
    dtype: torch.dtype | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
    progress: bool = True,
) -> nn.Module:
    """Round-to-nearest W4A8 (QQQ format, no calibration) of every eligible linear, in place."""
    from quick.formats.w4a8 import check_group_size
    from quick.models import moe
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    check_group_size(group_size)
    moe.refuse_experts(model, "W4A8")
    for name, lin in tqdm(quantizable_linears(model, skip), desc="quantize (W4A8 RTN)", disable=not progress):
        parent, child = parent_of(model, name)
        setattr(parent, child, QuickLinearW4A8.from_linear(lin, group_size, dtype))
    return model
