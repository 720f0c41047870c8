"""Activation-aware weight quantization (AWQ, Lin et al. 2023), layer by layer on calibration data.

Why it works: a few input channels of each linear carry much larger activations than the rest, and the
4-bit rounding error of the weights in those channels dominates the output error. Multiplying the weight's
input channel ``j`` by ``s_j > 1`` (and dividing the activation by ``s_j``, folded into the op that produces
it) shrinks that channel's *relative* rounding error. AWQ picks ``s = mean|x| ** ratio`` (normalised), with
``ratio`` chosen on a grid by the output error of the fake-quantized block, then shrinks each group's
clipping range where that lowers the output error, then rounds to nearest.

How this implementation runs:

* The decoder layers run one at a time (only the current layer on the compute device). The inputs of the
  first layer, and the keyword arguments every layer receives (rotary position embeddings, attention mask;
  Gemma3 passes different ones to sliding-window and global layers), are captured by temporarily
  replacing every layer with a catcher that records its call and passes the hidden states through
  (:mod:`quick.algorithms.calibration`, the pass QQQ runs too).
* Statistics of every linear's input are gathered in one pass over all calibration tokens: ``mean|x|`` and
  the Gram matrix ``X^T X``. For a scale group whose compared module is a single linear (``o_proj``,
  ``down_proj``) the output MSE of any candidate weight ``W'`` is exactly ``tr((W'-W) X^T X (W'-W)^T)``, so
  the grid search needs no further passes over the tokens. The clipping search uses the diagonal
  ``G x G`` blocks of the same Gram matrix, i.e. every calibration token (AutoAWQ subsamples 512).
* Attention and MLP groups are searched by running the module, on ``search_samples`` of the calibration
  samples (all of them by default).
* The next layer's inputs are the float outputs of the current layer, as in AutoAWQ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quick.algorithms.calibration import calibrate_layers, calibration_setup
from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizationError, quantize, resolve_group_size
from quick.models import moe
from quick.models.families import ModelFamily, ScaleGroup, active_groups, decoder_layers
from quick.nn.dtypes import round_dense_, set_compute_dtype
from quick.nn.linear import QuickLinear, padded_in_features

log = logging.getLogger(__name__)

N_GRID = 20
MAX_SHRINK = 0.5
# Calibration samples the attention/MLP grid search runs on when computing on CPU (all of them on GPU):
# 20 forward passes of the block per group over 65k tokens take minutes per layer on a CPU, while the
# loss ranking of the 20 candidates is already stable on 8k tokens.
CPU_SEARCH_SAMPLES = 16


def _layer_output(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5 and a tuple before."""
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------- stats


def _padded_k(k: int, group_size: int, k_padded: int | None = None) -> int:
    """K zero-padded to whole groups, and to at least ``k_padded`` (a packed layer's padded width)."""
    return max(k if group_size == -1 else -(-k // group_size) * group_size, k_padded or 0)


@dataclass
class InputStats:
    """Statistics of one linear's input.

    ``abs_sum``: ``sum |x|`` per channel over all calibration tokens (AWQ's activation magnitude).
    ``blocks``: the diagonal ``G x G`` blocks of ``X^T X`` over all tokens ``[K'/G, G, G]`` (K zero-padded to
    whole groups) -- all the clipping search needs. ``gram``: the full ``X^T X`` over the search tokens only,
    kept for inputs of single-linear scale groups, whose output error it gives exactly.
    """

    abs_sum: torch.Tensor
    blocks: torch.Tensor
    gram: torch.Tensor | None = None
    tokens: int = 0
    gram_tokens: int = 0

    @classmethod
    def empty(cls, k: int, group_size: int, full_gram: bool, device: torch.device) -> InputStats:
        kp = _padded_k(k, group_size)
        g = kp if group_size == -1 else group_size
        f64 = torch.float64
        return cls(
            torch.zeros(k, dtype=f64, device=device),
            torch.zeros(kp // g, g, g, dtype=f64, device=device),
            torch.zeros(k, k, dtype=f64, device=device) if full_gram else None,
        )

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def add(self, x: torch.Tensor, search: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t, k = x.shape
        self.abs_sum += x.abs().sum(0).double()
        ng, g, _ = self.blocks.shape
        xg = F.pad(x, (0, ng * g - k)).reshape(t, ng, g).transpose(0, 1)  # [ng, T, G]
        self.blocks += torch.bmm(xg.transpose(1, 2), xg).double()
        self.tokens += t
        if search and self.gram is not None:
            self.gram += (x.t() @ x).double()
            self.gram_tokens += t

    def rescale(self, scales: torch.Tensor) -> None:
        """The input became ``x / s``: update the statistics instead of recomputing them."""
        s = scales.double().to(self.abs_sum.device)
        self.abs_sum /= s
        ng, g, _ = self.blocks.shape
        sp = F.pad(s, (0, ng * g - s.numel()), value=1.0).reshape(ng, g)
        self.blocks /= sp[:, :, None] * sp[:, None, :]
        if self.gram is not None:
            self.gram /= s[:, None] * s[None, :]


@dataclass
class Probe:
    """Captured inputs, kwargs and outputs of a compared module (attention, MLP or a linear) on the search chunks."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------ quantization


def fake_quant(
    weight: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype, k_padded: int | None = None
) -> torch.Tensor:
    """Round-to-nearest then dequantize ``[N, K]`` on exactly the grid :func:`quantize` + ``dequantize`` use.

    Same formulas as :mod:`quick.formats.weights` (fp32 math, scales rounded to ``scale_dtype`` before the
    codes are chosen), evaluated row-major without the transposes, integer casts and checks of the packing
    path, because the grid searches call it hundreds of times per layer; ``tests/test_awq.py`` checks
    that both give bit-identical weights. K is zero-padded to ``k_padded`` (default: whole groups), as
    :meth:`QuickLinear.from_linear` stores it (see :func:`padded_in_features`), so a ragged last group and a
    per-channel group over a padded K quantize exactly as in the packed layer.
    """
    n, k = weight.shape
    kp = _padded_k(k, group_size, k_padded)
    g = kp if group_size == -1 else group_size
    w = F.pad(weight.float(), (0, kp - k)).reshape(n, kp // g, g)
    if zero_point:
        wmax = w.amax(dim=-1, keepdim=True)
        wmin = w.amin(dim=-1, keepdim=True)
        s = ((wmax - wmin).clamp(min=1e-5) / 15).to(scale_dtype).float()
        z = (-torch.round(wmin / s)).clamp(0, 15)
    else:
        s = (w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 7).to(scale_dtype).float()
        z = torch.full_like(s, 8.0)
    q = (torch.round(w / s) + z).clamp(0, 15)
    return ((q - z) * s).reshape(n, kp)[:, :k].to(weight.dtype)


def reference_fake_quant(
    weight: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype, k_padded: int | None = None
) -> torch.Tensor:
    """:func:`fake_quant` through the primitives (quantize -> dequantize), the definition it must match."""
    n, k = weight.shape
    kp = _padded_k(k, group_size, k_padded)
    qw = quantize(F.pad(weight, (0, kp - k)), group_size, zero_point=zero_point, dtype=scale_dtype)
    return qw.dequantize(torch.float32).t()[:, :k].to(weight.dtype)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int = N_GRID
) -> list[tuple[float, torch.Tensor, bool]]:
    """AWQ's grid: ``s = x_mean**r`` (or ``x_mean**r / w_mean**(1-r)`` with duo scaling), ``r = i / n_grid``.

    Each candidate is normalised by ``sqrt(max * min)`` so the scales straddle 1 (AutoAWQ's normalisation;
    it keeps the folded norm weights and the scaled weights in a sane range). ``r = 0`` without duo scaling
    is the identity, i.e. plain round-to-nearest, so the search can never pick something worse than RTN on
    its data; with duo scaling the identity is added explicitly for the same reason.
    Returns ``(ratio, scales, is_identity)`` triples.
    """
    x_mean = x_mean.float()
    out = []
    for i in range(n_grid):
        r = i / n_grid
        if w_mean is None:
            s = x_mean.pow(r).clamp(min=1e-4)
        else:
            s = (x_mean.pow(r) / (w_mean.float().pow(1 - r) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1.0
        out.append((r, s, w_mean is None and i == 0))
    if w_mean is not None:
        out.append((math.nan, torch.ones_like(x_mean), True))
    return out


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's per-input-channel weight magnitude: |w| / group absmax, averaged over output rows."""
    w = torch.cat([t.float() for t in weights], dim=0)
    n, k0 = w.shape
    k = k0 if group_size == -1 else -(-k0 // group_size) * group_size
    g = resolve_group_size(group_size, k)
    wg = F.pad(w.abs(), (0, k - k0)).reshape(n, k // g, g)
    wg = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
    return wg.reshape(n, k)[:, :k0].mean(0)


@torch.no_grad()
def fold_scale(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Multiply the group's linears' input channels by ``scales`` and divide the preceding op's output by them.

    Exact in real arithmetic: ``(x / s) @ (W * s)^T == x @ W^T``; ``group.also_scale`` modules get ``W * s`` as well.
    For a norm ``y = n(x) * (offset + w)`` the
    new weight is ``(offset + w) / s - offset`` (Gemma stores ``w`` around 0 and multiplies by ``1 + w``).
    """
    prev = layer.get_submodule(group.prev)
    s = scales.to(device=prev.weight.device, dtype=torch.float32)
    k = s.numel()
    if isinstance(prev, nn.Linear):
        w = prev.weight.data
        w[-k:] = (w[-k:].float() / s[:, None]).to(w.dtype)
        if prev.bias is not None:
            prev.bias.data[-k:] = (prev.bias.data[-k:].float() / s).to(prev.bias.dtype)
    else:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.shape != (k,):
            raise QuantizationError(
                f"cannot fold scales into '{group.prev}' ({type(prev).__name__}): expected a norm with a weight of "
                f"shape ({k},)"
            )
        weight.data = ((weight.data.float() + norm_offset) / s - norm_offset).to(weight.dtype)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (bias.data.float() / s).to(bias.dtype)
    for name in (*group.linears, *group.also_scale):  # also_scale: 16-bit readers of the same input (a MoE router)
        lin = layer.get_submodule(name)
        lin.weight.data = (lin.weight.data.float() * s[None, :]).to(lin.weight.dtype)


def _gram_loss(delta: torch.Tensor, gram: torch.Tensor, tokens: int) -> float:
    """Mean squared output error ``||X delta^T||^2 / (T * N)`` from the Gram matrix ``X^T X``."""
    d = delta.double()
    return float(((d @ gram) * d).sum() / (max(tokens, 1) * delta.shape[0]))


@torch.no_grad()
def search_scale(
    layer: nn.Module, group: ScaleGroup, stats: InputStats, probe: Probe | None, group_size: int, zero_point: bool,
    scale_dtype: torch.dtype, n_grid: int = N_GRID, duo_scaling: bool = False, layout: str = "quick",
) -> tuple[torch.Tensor, float, float]:  # fmt: skip
    """Best scales for one group; returns ``(scales, best_loss, identity_loss)`` (the latter is RTN's)."""
    linears = [layer.get_submodule(n) for n in group.linears]
    originals = [lin.weight.data.clone() for lin in linears]
    w_mean = weight_mean(originals, group_size) if duo_scaling else None
    x_mean = stats.mean_abs.to(originals[0].device)
    kp = padded_in_features(originals[0].shape[1], group_size, layout)
    best: tuple[float, torch.Tensor] | None = None
    identity_loss = math.inf
    try:
        for _r, s, is_identity in candidate_scales(x_mean, w_mean, n_grid):
            s = s.to(originals[0].device)
            new = [
                fake_quant(w.float() * s[None, :], group_size, zero_point, scale_dtype, kp) / s[None, :]
                for w in originals
            ]
            if group.inspect is None:
                assert stats.gram is not None
                loss = _gram_loss(new[0] - originals[0].float(), stats.gram.to(new[0].device), stats.gram_tokens)
            else:
                assert probe is not None
                module = layer.get_submodule(group.inspect)
                for lin, w in zip(linears, new, strict=True):
                    lin.weight.data = w.to(lin.weight.dtype)
                err, count = 0.0, 0
                for x, ref, kw in zip(probe.inputs, probe.outputs, probe.kwargs, strict=True):
                    out = _first_tensor(module(x, **kw))
                    err += float((out.float() - ref.float()).pow(2).sum())
                    count += ref.numel()
                loss = err / max(count, 1)
            if is_identity:
                identity_loss = loss
            if best is None or loss < best[0]:
                best = (loss, s)
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.data = w
    assert best is not None
    return best[1], best[0], identity_loss


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, blocks: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype,
    n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK, layout: str = "quick",
) -> torch.Tensor:  # fmt: skip
    """Per (row, group) clipping bound minimising that group's contribution to the output error.

    AutoAWQ's auto_clip: clamp the weight to ``+-max|w| * (1 - i / n_grid)`` for ``i < max_shrink * n_grid``,
    fake-quantize, and keep per group the bound with the smallest ``E[(x_g . (w_g' - w_g))^2]``. That error is
    ``d H_g d^T`` with ``H_g = blocks[g]`` the group's diagonal block of the input Gram matrix.
    Returns ``[N, K'/G, 1]``.
    """
    n, k = weight.shape
    ng, g, _ = blocks.shape
    w = F.pad(weight.float(), (0, ng * g - k)).reshape(n, ng, g)
    kp = padded_in_features(k, group_size, layout)
    h = blocks.to(device=w.device, dtype=torch.float32)
    org_max = w.abs().amax(dim=-1, keepdim=True)
    best_max = org_max.clone()
    best_err = torch.full((n, ng), math.inf, device=w.device)
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.maximum(torch.minimum(w, max_val), -max_val)
        d = fake_quant(cur.reshape(n, ng * g), group_size, zero_point, scale_dtype, kp)[:, : ng * g]
        d = d.reshape(n, ng, g) - w
        err = (torch.bmm(d.transpose(0, 1), h) * d.transpose(0, 1)).sum(-1).t()  # [N, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], max_val, best_max)
    return best_max


def apply_clip(linear: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of the weight to ``+-max_val`` ``[N, groups, 1]`` (ragged last group allowed)."""
    n, k = linear.weight.shape
    ng = max_val.shape[1]
    g = k if group_size == -1 else group_size
    if ng != -(-k // g):
        raise QuantizationError(f"{ng} clipping groups do not match K={k} with group size {group_size}")
    bound = max_val.expand(n, ng, g).reshape(n, ng * g)[:, :k]
    w = linear.weight.data.float()
    linear.weight.data = torch.maximum(torch.minimum(w, bound), -bound).to(linear.weight.dtype)


# ------------------------------------------------------------------------------------------------ driver


def _skip(name: str, skip: tuple[str, ...]) -> bool:
    return any(s in name for s in skip)


def layer_linears(layer: nn.Module, family: ModelFamily) -> dict[str, nn.Linear]:
    """The decoder layer's linears that get quantized (relative names)."""
    return {
        n: m
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not _skip(n, family.modules_to_not_convert)
    }


def check_quantizable(model: nn.Module, family: ModelFamily, group_size: int, layout: str) -> None:
    """Fail before any work if a decoder linear cannot be stored in ``layout`` (error names the module)."""
    lay = get_layout(layout)
    for i, layer in enumerate(decoder_layers(model, family)):
        for name, m in layer_linears(layer, family).items():
            try:
                lay.check(padded_in_features(m.in_features, group_size, layout), m.out_features, group_size)
            except ValueError as e:
                raise QuantizationError(f"{family.layers_path}.{i}.{name}: {e}") from None


@dataclass
class LayerReport:
    """Per-group search results of one layer: AWQ's chosen loss and the identity (RTN) loss. ``tokens``: calibration
    tokens each linear saw (fewer than the layer's for MoE experts); ``rtn_fallback``: linears that saw fewer than
    ``min_tokens`` and were rounded to nearest without their own scale or clipping search."""

    index: int
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)


@dataclass
class AwqSettings:
    group_size: int = 128
    zero_point: bool = True
    scale_dtype: torch.dtype = torch.float16
    n_grid: int = N_GRID
    clip: bool = True
    duo_scaling: bool = False
    n_search_chunks: int | None = None
    layout: str = "quick"
    min_tokens: int = 0


def run_layer_with_probes(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    device: torch.device,
    n_search: int,
    inputs_of: dict[nn.Module, Callable[[torch.Tensor, bool], None]],
    probe_names: Iterable[str],
) -> tuple[list[torch.Tensor], dict[str, Probe]]:
    """One pass of the float layer over all calibration chunks (AWQ and QQQ both start a layer with it).

    ``inputs_of[module](x, searching)`` sees every input of that linear (``searching``: the chunk is one of the
    first ``n_search``); each module named in ``probe_names`` records its inputs, kwargs and outputs on those
    search chunks. Returns the layer's outputs (the next layer's inputs) and the probes."""
    probes = {name: Probe() for name in probe_names}
    state = {"record": False}

    def make_hooks(pr: Probe) -> tuple[Callable, Callable]:
        def pre(_m: nn.Module, args: tuple, kw: dict) -> None:
            if state["record"]:
                pr.inputs.append((args[0] if args else kw["hidden_states"]).detach())
                pr.kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})

        def post(_m: nn.Module, _args: tuple, _kw: dict, out: Any) -> None:
            if state["record"]:
                pr.outputs.append(_first_tensor(out).detach())

        return pre, post

    handles = [
        mod.register_forward_pre_hook(lambda _m, args, f=f: f(args[0], state["record"])) for mod, f in inputs_of.items()
    ]
    for name, pr in probes.items():
        mod = layer.get_submodule(name)
        pre, post = make_hooks(pr)
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    outputs = []
    try:
        for c, x in enumerate(hidden):
            state["record"] = c < n_search
            outputs.append(_layer_output(layer(x.to(device), **kwargs[c])).to(x.device))
    finally:
        for h in handles:
            h.remove()
    return outputs, probes


def _collect(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], groups: list[ScaleGroup],
    linears: dict[str, nn.Linear], site_of: dict[str, str], n_search: int, group_size: int, device: torch.device,
) -> tuple[list[torch.Tensor], dict[str, InputStats], dict[str, Probe]]:  # fmt: skip
    """One pass of the float layer over all chunks: its outputs, input statistics, compared-module probes."""
    full = {site_of[g.linears[0]] for g in groups if g.inspect is None}
    width = {site_of[n]: lin.in_features for n, lin in linears.items()}
    width.update({g.stats_from: linears[g.linears[0]].in_features for g in groups if g.stats_from})
    stats = {s: InputStats.empty(k, group_size, s in full, device) for s, k in width.items()}
    inputs_of = {layer.get_submodule(s): st.add for s, st in stats.items()}
    probe_names = [g.inspect for g in groups if g.inspect is not None]
    outputs, probes = run_layer_with_probes(layer, hidden, kwargs, device, n_search, inputs_of, probe_names)
    return outputs, stats, probes


@torch.no_grad()
def awq_layer(
    layer: nn.Module, family: ModelFamily, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
    settings: AwqSettings, device: torch.device, index: int = 0,
) -> tuple[list[torch.Tensor], LayerReport]:  # fmt: skip
    """Search and fold the scales of one float decoder layer, then clip its weights (no packing yet).

    Returns the layer's float outputs (the next layer's inputs) and the per-group search report.
    """
    groups = active_groups(layer, family)
    linears = layer_linears(layer, family)
    # One statistics site per distinct input: q/k/v share one, gate/up share one. Where each linear sees only its
    # routed tokens (stats_from), only the linears of one module (one expert's gate/up) share a site.
    site_of: dict[str, str] = {}
    for g in groups:
        for n in g.linears:
            parent = n.rpartition(".")[0]
            first = next(m for m in g.linears if not g.stats_from or m.rpartition(".")[0] == parent)
            site_of.setdefault(n, first)
    for n in linears:
        site_of.setdefault(n, n)
    n_search = len(hidden) if settings.n_search_chunks is None else settings.n_search_chunks
    outputs, stats, probes = _collect(
        layer, hidden, kwargs, groups, linears, site_of, n_search, settings.group_size, device
    )

    report = LayerReport(index, tokens={n: stats[site_of[n]].tokens for n in linears})
    # A linear that saw fewer tokens than min_tokens (and fewer than the layer: an expert) gets no search of its own.
    layer_tokens = sum(h.numel() // h.shape[-1] for h in hidden)
    starved = {n for n, t in report.tokens.items() if t < min(settings.min_tokens, layer_tokens)}
    report.rtn_fallback = sorted(starved)
    for g in groups:
        if g.inspect is None and any(n in starved for n in g.linears):
            continue
        site = stats[g.stats_from or site_of[g.linears[0]]]
        s, loss, rtn_loss = search_scale(
            layer,
            g,
            site,
            probes.get(g.inspect) if g.inspect else None,
            settings.group_size,
            settings.zero_point,
            settings.scale_dtype,
            settings.n_grid,
            settings.duo_scaling,
            settings.layout,
        )
        fold_scale(layer, g, s, family.norm_offset)
        for name in {g.stats_from, *(site_of[n] for n in g.linears)} - {None}:
            stats[name].rescale(s)
        report.groups[",".join(g.linears)] = {"loss": loss, "rtn_loss": rtn_loss}
    del probes
    if settings.clip:
        for n, lin in linears.items():
            if _skip(n, family.no_clip) or n in starved:
                continue
            blocks = stats[site_of[n]].blocks
            max_val = search_clip(
                lin.weight.data,
                blocks,
                settings.group_size,
                settings.zero_point,
                settings.scale_dtype,
                settings.n_grid,
                layout=settings.layout,
            )
            apply_clip(lin, max_val, settings.group_size)
    return outputs, report


@torch.no_grad()
def quantize_model_awq(
    model: nn.Module,
    samples: torch.Tensor,
    group_size: int = 128,
    zero_point: bool = True,
    layout: str = "quick",
    scale_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    n_grid: int = N_GRID,
    clip: bool = True,
    duo_scaling: bool = False,
    search_samples: int | None = None,
    batch_size: int = 8,
    family: ModelFamily | None = None,
    progress: bool = True,
    reports: list[LayerReport] | None = None,
    quantize_weights: bool = True,
    on_layer: Callable[[int, nn.Module], None] | None = None,
    min_expert_tokens: int | None = None,
) -> nn.Module:
    """Quantize every decoder-layer linear of ``model`` in place with AWQ and pack it as ``QuickLinear``.

    ``samples``: calibration token ids ``[n, seqlen]``. ``scale_dtype``: dtype of the stored scales and of
    the packed layers (default: the model's dtype when fp16/bf16, else fp16). ``search_samples``: how many
    calibration samples the attention/MLP grid search runs on (default: all on GPU, ``CPU_SEARCH_SAMPLES``
    on CPU). The single-linear groups (o_proj, down_proj) are scored on the same samples through their
    Gram matrix; activation magnitudes and the clipping search always use every sample.
    ``quantize_weights=False`` stops after scaling and clipping (a float model, for inspection).
    Mixture-of-experts families (``family.moe``): the experts are calibrated as one linear per expert projection,
    each on the tokens routed to it, and packed as :class:`~quick.nn.moe.QuickMoEExperts`; an expert that receives
    fewer than ``min_expert_tokens`` (default :data:`quick.models.moe.MIN_EXPERT_TOKENS`) calibration tokens gets no
    search of its own (rounded to nearest, listed in its layer's ``LayerReport.rtn_fallback`` and logged).
    Dense parameters outside the packed layers keep the model's dtype, rounded to ``scale_dtype`` (what a
    checkpoint stores); packed layers cast activations at their boundary (see ``set_compute_dtype``).
    """
    family, device, scale_dtype, n_search_chunks = calibration_setup(
        model, samples, family, device, scale_dtype, batch_size, search_samples, CPU_SEARCH_SAMPLES, "scale dtype"
    )
    model_dtype = next(model.parameters()).dtype
    check_quantizable(model, family, group_size, layout)
    moe.check_experts(moe.experts_modules(model, family), group_size, layout)
    settings = AwqSettings(
        group_size,
        zero_point,
        scale_dtype,
        n_grid,
        clip,
        duo_scaling,
        n_search_chunks,
        layout,
        moe.MIN_EXPERT_TOKENS if min_expert_tokens is None else min_expert_tokens,
    )

    def step(idx: int, layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        moe.unfuse_experts_(layer, family)
        hidden, report = awq_layer(layer, family, hidden, kwargs, settings, device, idx)
        if reports is not None:
            reports.append(report)
        starved = moe.expert_tokens({n: report.tokens[n] for n in report.rtn_fallback}, family)
        if starved:
            log.warning(
                "layer %d: %d experts received fewer than %d calibration tokens and are rounded to nearest: %s",
                idx, len(starved), settings.min_tokens, sorted(starved),
            )  # fmt: skip
        if quantize_weights:
            moe.pack_experts_(layer, family, group_size, layout, zero_point, scale_dtype)
            for n, lin in layer_linears(layer, family).items():
                parent_name, _, child = n.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, QuickLinear.from_linear(lin, group_size, layout, zero_point, scale_dtype))
        else:
            moe.refuse_experts_(layer, family)
        return hidden

    calibrate_layers(model, samples, family, device, batch_size, scale_dtype, step, "AWQ", progress, on_layer)
    if quantize_weights:
        round_dense_(model, scale_dtype)
        set_compute_dtype(model, model_dtype)
    return model
