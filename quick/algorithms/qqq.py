"""W4A8 quantization in the QQQ way (Zhang et al. 2024): adaptive smoothing, then GPTQ, layer by layer.

Why: with 8-bit activations the per-token int8 grid is set by each token's largest channel, so a few outlier
channels (LLMs have them after every norm) crush the resolution of all the others. Smoothing moves that range
into the weights (``x / s``, ``W * s``, folded into the preceding norm or linear, exact in float), where GPTQ
then absorbs the extra 4-bit rounding error by updating the not-yet-quantized columns with the inverse Hessian.

* **Smoothing**, per scale group of :mod:`quick.models.families` (q/k/v after the attention norm, gate/up after
  the MLP norm, down after up, o after v where shapes allow): ``s = amax_x**alpha / amax_w**(1 - alpha)`` for
  ``alpha`` on a grid, plus ``s = 1``; the group's module is run with its linears fake-quantized in W4A8
  (weights round-to-nearest in the target format, inputs per-token int8) and the ``alpha`` with the smallest
  output MSE against the float module wins.
* **GPTQ** (Frantar et al. 2022) on ``H = X^T X`` of the smoothed calibration inputs (the factor 2/T of
  ``2 X^T X / T`` cancels), 1 % dampening, optional act-order, blocks of 128 columns, upper Cholesky factor of
  ``H^-1``. Per-channel: ``W = s_ch * q``. Per-group (QQQ's two levels): the channel scale is fixed first
  from the whole row (``amax / 7.5 / 16``), and each group's *integer* scale ``s_g in [1, 16]`` is chosen when
  the sweep reaches the group (16 levels as in QQQ: ``q * s_g`` is an int8, which the kernels use), from the
  error-updated weights, so ``W = s_ch * s_g * q`` exactly as :mod:`quick.formats.w4a8` stores it.
* **RTN** (no calibration): the same two-level grid with round-to-nearest, for quick tests.

The calibration pass (:mod:`quick.algorithms.calibration`) and the scale folding (:mod:`quick.algorithms.awq`)
are AWQ's. The next layer's inputs are the outputs of the *quantized* layer (GPTQ's
sequential mode), so later layers see and compensate the error of earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quick.algorithms.awq import (
    Probe,
    _first_tensor,
    _layer_output,
    fold_scale,
    layer_linears,
    run_layer_with_probes,
)
from quick.algorithms.calibration import calibrate_layers, calibration_setup
from quick.formats.w4a8 import (
    W4A8Weight,
    _finish,
    _round_q,
    channel_scale_for,
    check_group_size,
    fake_quant_activations,
    fake_quant_weight,
    group_scale_for,
    quantize_w4a8_rtn,
)
from quick.formats.weights import QuantizationError
from quick.models.families import ModelFamily, ScaleGroup, active_groups

N_GRID = 20
DAMP = 0.01
BLOCK_SIZE = 128
# Calibration samples the smoothing search runs on when computing on CPU (all of them on GPU), as for AWQ.
CPU_SEARCH_SAMPLES = 16


# ------------------------------------------------------------------------------------------------- GPTQ

CLIP_GRID = 10  # clip search: ranges max|w| * (1 - i / 20), i < 10, i.e. down to 55 %


def clipped_amax(
    w: torch.Tensor, weight: torch.Tensor, to_step: Callable[[torch.Tensor], torch.Tensor], grid: int = CLIP_GRID
) -> torch.Tensor:
    """Per row of ``w [N, c]``, the range ``a <= max|w|`` whose grid ``to_step(a)`` gives the smallest rounding
    error weighted by ``weight [c]`` (the Hessian diagonal: how much each input channel moves the output).
    The first candidate is the full range, so the weighted error never grows."""
    amax = w.abs().amax(dim=1)
    best_a, best_e = amax, None
    for i in range(grid):
        a = amax * (1 - i / (2 * grid))
        st = to_step(a)[:, None]
        e = ((w - _round_q(w, st) * st).pow(2) * weight).sum(dim=1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_a, best_e = torch.where(better, a, best_a), torch.where(better, e, best_e)
    return best_a


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (fp32); more damping if H is singular."""
    h = hessian.double()
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean_diag = float(torch.diagonal(h).mean()) or 1.0
    for _ in range(6):
        low, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0:
                return up.float()
        damp *= 10
    raise QuantizationError("the calibration Hessian is not positive definite even with heavy dampening")


@torch.no_grad()
def gptq_w4a8(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = -1,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    act_order: bool = False,
    clip: bool = False,
) -> W4A8Weight:
    """GPTQ of one linear's weight ``[N, K]`` given ``H = X^T X`` ``[K, K]`` of its inputs, in the W4A8 format.

    Columns are quantized one at a time; each one's rounding error, divided by its diagonal entry of the
    inverse-Hessian factor, is spread over the columns not yet quantized (inside the block immediately, to the
    rest after the block). With ``act_order`` the columns go in order of decreasing ``H_jj`` and the group
    scales are fixed up front (a group's columns are then visited out of order). ``clip``: choose each row's
    (per-channel) or group's (per-group) range by :func:`clipped_amax` instead of the plain ``max |w|``.
    """
    check_group_size(group_size)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise QuantizationError(f"Hessian shape {tuple(hessian.shape)} does not match K={k}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise QuantizationError("weight or Hessian contains NaN or inf; refusing to quantize")
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grouped = group_size != -1
    hd = torch.diagonal(h).float().to(w.device)
    if clip and not grouped:
        s_ch = channel_scale_for(clipped_amax(w, hd, lambda a: channel_scale_for(a, -1)), -1)
    else:
        s_ch = channel_scale_for(w.abs().amax(dim=1), group_size)

    def group_scale(block: torch.Tensor, cols: slice) -> torch.Tensor:
        if clip:
            amax = clipped_amax(block, hd[cols], lambda a: s_ch * group_scale_for(a, s_ch))
        else:
            amax = block.abs().amax(dim=1)
        return group_scale_for(amax, s_ch)

    ng = -(-k // group_size) if grouped else 1
    s_g = torch.ones(ng, n, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        if grouped:  # static groups, from the weights before any update
            for g in range(ng):
                cols = slice(g * group_size, min((g + 1) * group_size, k))
                s_g[g] = group_scale(w[:, cols], cols)
        w, h = w[:, perm], h[perm][:, perm]
        order = perm.tolist()
    else:
        perm, order = None, list(range(k))
    u = inverse_hessian_factor(h, damp).to(w.device)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            if grouped:
                g = col // group_size
                if not act_order and col % group_size == 0:
                    ahead = torch.cat([w1[:, i : i + group_size], w[:, i2 : i2 + group_size]], dim=1)[:, :group_size]
                    s_g[g] = group_scale(ahead, slice(col, col + ahead.shape[1]))
                scale = s_ch * s_g[g]
            else:
                scale = s_ch
            col_w = w1[:, i]
            col_q = _round_q(col_w, scale)
            q[:, i1 + i] = col_q
            e = (col_w - col_q * scale).div_(u1[i, i])
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return _finish(q, s_ch, s_g if grouped else None, group_size)


# ------------------------------------------------------------------------------------------- smoothing


@dataclass
class _Site:
    """Statistics of one linear input (shared by the linears that read it): per-channel ``max |x|`` and
    ``X^T X`` over all calibration tokens, and the smoothing scale applied to it so far."""

    amax: torch.Tensor
    gram: torch.Tensor
    tokens: int = 0
    scale: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.amax = torch.maximum(self.amax, x.abs().amax(dim=0))
        self.gram += (x.t() @ x).double()
        self.tokens += x.shape[0]

    def rescale(self, s: torch.Tensor) -> None:
        """The input became ``x / s``: update the statistics instead of recomputing them."""
        s = s.to(self.amax.device)
        self.amax = self.amax / s
        sd = s.double()
        self.gram /= sd[:, None] * sd[None, :]
        self.scale = s if self.scale is None else self.scale * s


def probe_module_name(group: ScaleGroup) -> str:
    """The attention/MLP block for multi-linear groups, the linear itself for single-linear ones."""
    return group.inspect if group.inspect is not None else group.linears[0]


def smoothing_candidates(
    amax_x: torch.Tensor, amax_w: torch.Tensor, n_grid: int = N_GRID
) -> list[tuple[float, torch.Tensor]]:
    """``(alpha, s)`` for ``alpha = i / n_grid``, ``i = 0..n_grid``, and ``(nan, 1)`` (no smoothing).

    ``s`` is normalised by ``sqrt(max s * min s)``: a common factor changes neither the per-token activation
    grid nor the per-row weight grid, but keeps the folded norm weights in a sane range.
    """
    ax = amax_x.float().clamp(min=1e-5)
    aw = amax_w.float().clamp(min=1e-5)
    out: list[tuple[float, torch.Tensor]] = [(math.nan, torch.ones_like(ax))]
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = ax.pow(alpha) / aw.pow(1 - alpha)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1.0
        out.append((alpha, s))
    return out


@dataclass
class SmoothResult:
    scales: torch.Tensor
    alpha: float  # nan when no smoothing (s = 1) won
    loss: float
    identity_loss: float


def _w4a8_block_loss(module: nn.Module, probe: Probe) -> float:
    err, count = 0.0, 0
    for x, ref, kw in zip(probe.inputs, probe.outputs, probe.kwargs, strict=True):
        out = _first_tensor(module(x, **kw))
        err += float((out.float() - ref.float()).pow(2).sum())
        count += ref.numel()
    return err / max(count, 1)


@torch.no_grad()
def search_smoothing(
    layer: nn.Module,
    group: ScaleGroup,
    amax_x: torch.Tensor,
    probe: Probe,
    group_size: int,
    n_grid: int = N_GRID,
) -> SmoothResult:
    """Pick the migration strength of one scale group by the output MSE of its W4A8-quantized block.

    Each candidate runs the block with the group's linears holding RTN W4A8 weights ``fq(W * s)`` and their
    inputs replaced by ``fq_int8(x / s)``; nothing is changed when this returns.
    """
    linears = [layer.get_submodule(n) for n in group.linears]
    module = layer.get_submodule(probe_module_name(group))
    originals = [lin.weight.data.clone() for lin in linears]
    amax_w = torch.stack([w.float().abs().amax(dim=0) for w in originals]).amax(dim=0)
    best: SmoothResult | None = None
    identity = math.inf
    current: dict[str, Any] = {}

    def act_hook(_m: nn.Module, args: tuple) -> tuple:
        # q/k/v (gate/up) read the same tensor: quantize it once per candidate and input
        x = args[0]
        if current.get("x") is not x:
            current["x"], current["xq"] = x, fake_quant_activations(x / current["s"].to(x.dtype))
        return (current["xq"], *args[1:])

    handles = [lin.register_forward_pre_hook(act_hook) for lin in linears]
    try:
        for alpha, s in smoothing_candidates(amax_x.to(originals[0].device), amax_w, n_grid):
            current.clear()
            current["s"] = s
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.data = fake_quant_weight(w.float() * s[None, :], group_size).to(w.dtype)
            loss = _w4a8_block_loss(module, probe)
            if math.isnan(alpha):
                identity = loss
            if best is None or loss < best.loss:
                best = SmoothResult(s, alpha, loss, math.nan)
    finally:
        current.clear()
        for h in handles:
            h.remove()
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.data = w
    assert best is not None
    best.identity_loss = identity
    return best


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class QqqSettings:
    group_size: int = -1
    smooth: bool = True
    gptq: bool = True
    n_grid: int = N_GRID
    damp: float = DAMP
    block_size: int = BLOCK_SIZE
    act_order: bool = True
    n_search_chunks: int | None = None
    sequential: bool = True
    clip: bool = True


@dataclass
class QqqLayerReport:
    """Per-group smoothing choice (alpha, loss, no-smoothing loss) of one decoder layer."""

    index: int
    groups: dict[str, dict[str, float]] = field(default_factory=dict)


def _collect(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], groups: list[ScaleGroup],
    linears: dict[str, nn.Linear], site_of: dict[str, str], n_search: int, device: torch.device,
) -> tuple[list[torch.Tensor], dict[str, _Site], dict[str, Probe]]:  # fmt: skip
    """One pass of the float layer: its outputs, every input site's statistics, and the groups' probes."""
    sites = {
        s: _Site(
            torch.zeros(linears[s].in_features, device=device),
            torch.zeros(linears[s].in_features, linears[s].in_features, dtype=torch.float64, device=device),
        )
        for s in set(site_of.values())
    }
    inputs_of = {linears[s]: (lambda x, _searching, st=st: st.add(x)) for s, st in sites.items()}  # every chunk counts
    probe_names = [probe_module_name(g) for g in groups]
    outputs, probes = run_layer_with_probes(layer, hidden, kwargs, device, n_search, inputs_of, probe_names)
    return outputs, sites, probes


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module)


@torch.no_grad()
def qqq_layer(
    layer: nn.Module, family: ModelFamily, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
    settings: QqqSettings, device: torch.device, module_dtype: torch.dtype, index: int = 0,
) -> tuple[list[torch.Tensor], QqqLayerReport]:  # fmt: skip
    """Smooth, GPTQ-quantize and swap in :class:`QuickLinearW4A8` for every linear of one float decoder layer.

    Returns the next layer's inputs (the quantized layer's outputs when ``settings.sequential``) and the report.
    """
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    groups = active_groups(layer, family) if settings.smooth else []
    linears = layer_linears(layer, family)
    site_of: dict[str, str] = {}
    for g in groups:
        for n in g.linears:
            site_of.setdefault(n, g.linears[0])
    for n in linears:
        site_of.setdefault(n, n)
    n_search = len(hidden) if settings.n_search_chunks is None else settings.n_search_chunks
    outputs, sites, probes = _collect(layer, hidden, kwargs, groups, linears, site_of, n_search, device)

    report = QqqLayerReport(index)
    for g in groups:
        site = sites[site_of[g.linears[0]]]
        res = search_smoothing(layer, g, site.amax, probes[probe_module_name(g)], settings.group_size, settings.n_grid)
        if not math.isnan(res.alpha):
            fold_scale(layer, g, res.scales, family.norm_offset)
            site.rescale(res.scales)
        report.groups[",".join(g.linears)] = {"alpha": res.alpha, "loss": res.loss, "identity_loss": res.identity_loss}
    del probes

    for n, lin in linears.items():
        if settings.gptq:
            qw = gptq_w4a8(
                lin.weight.data,
                sites[site_of[n]].gram,
                settings.group_size,
                settings.damp,
                settings.block_size,
                settings.act_order,
                settings.clip,
            )
        else:
            qw = quantize_w4a8_rtn(lin.weight.data, settings.group_size)
        bias = lin.bias.data if lin.bias is not None else None
        _replace(layer, n, QuickLinearW4A8(qw, bias, dtype=module_dtype, logical_in_features=lin.in_features))
    del sites
    if settings.sequential:
        outputs = [_layer_output(layer(x.to(device), **kwargs[c])).to(x.device) for c, x in enumerate(hidden)]
    return outputs, report


@torch.no_grad()
def quantize_model_qqq(
    model: nn.Module,
    samples: torch.Tensor,
    group_size: int = -1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    smooth: bool = True,
    gptq: bool = True,
    act_order: bool = True,
    n_grid: int = N_GRID,
    damp: float = DAMP,
    search_samples: int | None = None,
    batch_size: int = 8,
    sequential: bool = True,
    clip: bool = True,
    family: ModelFamily | None = None,
    progress: bool = True,
    reports: list[QqqLayerReport] | None = None,
) -> nn.Module:
    """Quantize every decoder-layer linear of ``model`` in place to W4A8 (QQQ) as :class:`QuickLinearW4A8`.

    ``samples``: calibration token ids ``[n, seqlen]``. ``dtype``: the layers' GPU activation/output dtype and
    the dense dtype of a checkpoint (default: the model's when fp16/bf16, else fp16). ``search_samples``: samples
    the smoothing search runs on (default: all on GPU, ``CPU_SEARCH_SAMPLES`` on CPU); the statistics and
    Hessians always use every sample. ``clip``: GPTQ picks each row's (group's) range by a Hessian-weighted
    search instead of ``max |w|``; ``act_order``: GPTQ visits columns by decreasing Hessian diagonal. Both are on
    by default: on SmolLM2-135M (CPU, 16 x 512 calibration) they took W4A8 perplexity from 28.0 to 21.5
    (per-channel) and from 22.2 to 19.6 (g128); clipping alone gave 22.6 / 19.9
    (benchmarks/results/quality-w4a8-smollm2-cpu-2026-11-23.json). Dense parameters are rounded to ``dtype``
    (what a checkpoint stores).
    """
    from quick.models.moe import refuse_experts
    from quick.nn.dtypes import round_dense_

    check_group_size(group_size)
    refuse_experts(model, "W4A8 (QQQ)")
    family, device, dtype, n_search_chunks = calibration_setup(
        model, samples, family, device, dtype, batch_size, search_samples, CPU_SEARCH_SAMPLES, "W4A8 layer dtype"
    )
    settings = QqqSettings(
        group_size, smooth, gptq, n_grid, damp, BLOCK_SIZE, act_order, n_search_chunks, sequential, clip
    )

    def step(idx: int, layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        hidden, report = qqq_layer(layer, family, hidden, kwargs, settings, device, dtype, idx)
        if reports is not None:
            reports.append(report)
        return hidden

    calibrate_layers(model, samples, family, device, batch_size, dtype, step, "QQQ", progress)
    round_dense_(model, dtype)
    return model
