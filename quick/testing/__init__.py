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


def route_errors(
    logits: torch.Tensor, top_k: int, renormalize: bool, ids: torch.Tensor, weights: torch.Tensor, rel: float = 4e-6
) -> str:
    """What is wrong with a router's top-k ``(ids, weights)`` of ``logits [T, E]`` (empty: nothing): against the
    softmax in float64, the picks must be a top-k (no expert left out with a larger probability), in decreasing
    order with exact ties broken by the lower id, and the weights the picked probabilities (renormalised: over
    their sum) within ``rel``. Rows with NaN logits are skipped here (their weights must be NaN: checked by the
    caller)."""
    x = logits.detach().to(torch.float64).cpu()
    ids, w = ids.detach().cpu().long(), weights.detach().to(torch.float64).cpu()
    e = x.shape[1]
    if ids.shape != (x.shape[0], top_k) or w.shape != ids.shape:
        return f"ids {tuple(ids.shape)} / weights {tuple(w.shape)} are not [{x.shape[0]}, {top_k}]"
    for t in range(x.shape[0]):
        if torch.isnan(x[t]).any():
            continue
        row, pick = x[t], ids[t]
        if ((pick < 0) | (pick >= e)).any() or pick.unique().numel() != top_k:
            return f"token {t}: ids {pick.tolist()} are not {top_k} distinct experts of {e}"
        key = [(-float(row[i]), int(i)) for i in pick]
        if key != sorted(key):
            return f"token {t}: picks {pick.tolist()} are not in decreasing order (ties by the lower id)"
        rest = torch.ones(e, dtype=torch.bool)
        rest[pick] = False
        if rest.any():
            worst = max(key)  # the last pick's (-logit, id)
            for u in torch.nonzero(rest).flatten().tolist():
                if (-float(row[u]), u) < worst:
                    return f"token {t}: expert {u} (logit {float(row[u])}) beats pick {worst[1]}"
        p = torch.softmax(row, dim=0)[pick]
        want = p / p.sum() if renormalize else p
        err = float(((w[t] - want).abs() / want.abs().clamp_min(1e-30)).max())
        if err > rel:
            return f"token {t}: weights {w[t].tolist()} differ from {want.tolist()} (relative {err:.2e} > {rel})"
    return ""
