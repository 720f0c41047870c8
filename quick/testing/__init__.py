"""Shared helpers for kernel correctness checks: random quantized weights and a float64 reference."""

from __future__ import annotations

import torch

from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizedWeight, resolve_group_size


def random_quantized(
    k: int,
    n: int,
    group_size: int,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    scale: float = 0.02,
) -> QuantizedWeight:
    """Random codes, positive scales around ``scale / 8`` and random zero points (not a fixed 8)."""
    g = resolve_group_size(group_size, k)
    gen = generator
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // g, n, generator=gen) * 0.75 + 0.25) * (scale / 8)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.uint8)
    return QuantizedWeight(q.to(device), scales.to(dtype).to(device), zeros.to(device), group_size)


def pack(qw: QuantizedWeight, layout: str) -> dict[str, torch.Tensor]:
    return get_layout(layout).pack(qw)


def reference_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``x @ dequant(W) (+ bias)`` on the tensors' device (the ground truth of every kernel test)."""
    w = qw.dequantize(torch.float64)
    out = x.to(torch.float64) @ w.to(x.device)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``||out - ref|| / ||ref||``; inf if ``out`` has any NaN/inf."""
    o = out.to(torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    denom = ref.to(torch.float64).norm().item()
    return (o - ref.to(torch.float64)).norm().item() / max(denom, 1e-30)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An output buffer filled with NaN, so that any element a kernel fails to write is caught."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# Error bounds: fp32 accumulation of fp16/bf16 products; the dominant error is rounding x and the
# dequantized weight to the 16-bit type (about 2^-11 relative for fp16, 2^-8 for bf16, per element, and
# the errors average out over K). These bounds are a few times the expected value and fail on any
# indexing or layout mistake (which gives errors of order 1).
REL_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def route_errors(logits: torch.Tensor, top_k: int, renormalize: bool, rounded: bool, ids, weights) -> str:
    """What is wrong with a router's choice ``(ids, weights) [T, top_k]`` of ``logits [T, E]`` ("" if nothing): k
    in-range experts per row in decreasing logit order with exact ties broken by the lower id, no expert left out that
    ranks before the last chosen in that order, and weights equal to the chosen float64 softmax probabilities (divided
    by their sum with ``renormalize``; rounded through the logits' dtype with ``rounded``). Rows with a non-finite
    logit are skipped (their weights: the caller's check)."""
    t, e = logits.shape
    shapes_ok = tuple(ids.shape) == tuple(weights.shape) == (t, top_k)
    if ids.dtype != torch.int64 or weights.dtype != torch.float32 or not shapes_ok:
        return f"ids {ids.dtype} {tuple(ids.shape)} / weights {weights.dtype} {tuple(weights.shape)}"
    if not bool(((ids >= 0) & (ids < e)).all()):
        return "an expert id out of range"
    rows = torch.isfinite(logits.double()).all(1)
    x, ids, weights = logits.double()[rows], ids[rows], weights[rows]
    lx = x.gather(1, ids)
    # consecutive choices: a larger logit, or an equal one with a larger id (distinct ids follow from the order)
    ordered = (lx[:, :-1] > lx[:, 1:]) | ((lx[:, :-1] == lx[:, 1:]) & (ids[:, :-1] < ids[:, 1:]))
    if not bool(ordered.all()):
        return "choices out of order (or an expert chosen twice)"
    last_l, last_i = lx[:, -1:], ids[:, -1:]
    expert = torch.arange(e, device=x.device).expand_as(x)
    beats = (x > last_l) | ((x == last_l) & (expert < last_i))
    if bool(beats.scatter(1, ids, False).any()):
        return "an expert left out that ranks before the last chosen"
    chosen = torch.softmax(x, -1).gather(1, ids)
    want = chosen / chosen.sum(1, keepdim=True) if renormalize else chosen
    rtol, atol = 2e-6, 4e-36
    if rounded:  # half an ulp of the dtype, whose subnormal steps are absolute (fp16: 6e-8)
        if not torch.equal(weights, weights.to(logits.dtype).float()):
            return "weights not rounded through the logits' dtype"
        fi = torch.finfo(logits.dtype)
        rtol, atol = fi.eps, fi.smallest_normal * fi.eps
    err = ((weights.double() - want).abs() - rtol * want.abs()).max() if want.numel() else torch.tensor(0.0)
    return f"weights off by {float(err):.3e} beyond rtol {rtol:.1e}" if float(err) > atol else ""
