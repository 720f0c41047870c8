"""The ``normquant`` fusion: the RMSNorm before a W4A8 projection also quantizes its output for that projection.

A W4A8 layer quantizes its input (int8 per token + fp32 scale) in a kernel of its own right before the GEMM. In
a decoder layer the inputs of the fused q/k/v and gate/up projections come straight out of an RMSNorm, so
``quick::rms_norm_quant`` (:mod:`quick.kernels.normquant`) writes the int8 activations and scales as it
normalizes, and the projection runs :meth:`~quick.nn.linear_w4a8.QuickLinearW4A8.forward_quantized`: one launch
and one pass over the activations fewer per projection. The fast decode step
(:class:`quick.models.decoder.FastDecoder`) calls it directly (with the residual add); transformers' own layers
(the eager model, prefill included) get it through :func:`attach`, which :func:`quick.models.fuse.fuse_model`
calls: the norm module then hands the quantized activations to its projection along with its (still written)
output. Both are switched by ``QUICK_FUSIONS`` (``normquant``), read per call, and apply on CUDA only, where the
projection's kernel runs (:meth:`~quick.nn.linear_w4a8.QuickLinearW4A8.takes_quantized`).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from quick import settings
from quick.models.families import UnsupportedModel, decoder_layers, get_family, io_groups, norm_eps
from quick.nn.fused import FusedProjection
from quick.nn.linear_w4a8 import QuickLinearW4A8

FUSION = "normquant"
_STATE = "_quick_normquant"  # on a norm module: (parent of the projection, its members' short names, eps, offset)


def enabled() -> bool:
    """Whether the fusion is switched on (``QUICK_FUSIONS``)."""
    return settings.fusion_enabled(FUSION)


def w4a8_layer(proj: object) -> QuickLinearW4A8 | None:
    """The W4A8 layer computing a projection (a fused projection's linear, or the layer itself), else None."""
    lin = proj.linear if isinstance(proj, FusedProjection) else proj
    return lin if isinstance(lin, QuickLinearW4A8) else None


def applies(lin: QuickLinearW4A8 | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the norm of ``x`` with ``weight`` may quantize for ``lin`` now (switch on, kernel path)."""
    if lin is None or weight.dtype != x.dtype or x.dim() < 2 or torch.compiler.is_compiling():
        return False
    return enabled() and lin.takes_quantized(x)


def _projection(parent: nn.Module, short: tuple[str, ...]) -> object:
    if len(short) == 1:
        return getattr(parent, short[0], None)
    for m in parent.children():
        if isinstance(m, FusedProjection) and tuple(n.rpartition(".")[2] for n in m.names) == short:
            return m
    return None


def _norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm module's forward with the fusion: its projection is looked up per call (so unfusing or a swapped
    layer simply falls back to the module's own forward)."""
    parent, short, eps, offset = self.__dict__[_STATE]
    lin = w4a8_layer(_projection(parent, short))
    if applies(lin, x, self.weight):
        xq, sx, _, y = torch.ops.quick.rms_norm_quant(x.reshape(-1, x.shape[-1]), None, self.weight, eps, offset, True)
        y = y.view(x.shape)
        lin.offer_quantized(y, xq.view(x.shape), sx.view(x.shape[:-1]))
        return y
    return type(self).forward(self, x)


def attach(model: nn.Module) -> int:
    """Give every decoder layer's attention and MLP input norms the fused forward (instance attribute: no change
    to the module tree or the state dict); returns how many. Models the fast decode step does not describe are left
    alone (0)."""
    import quick.kernels.ops  # noqa: F401 - defines torch.ops.quick.rms_norm_quant

    try:
        family = get_family(model.config)
        groups = io_groups(family)
        layers = list(decoder_layers(model, family))
    except (UnsupportedModel, AttributeError, KeyError, ValueError):
        return 0
    n = 0
    for layer in layers:
        for g in groups:
            try:
                norm = layer.get_submodule(g.prev)
                parent = layer.get_submodule(g.linears[0].rpartition(".")[0])
                eps = norm_eps(norm)
            except (AttributeError, UnsupportedModel):
                continue
            if not isinstance(getattr(norm, "weight", None), torch.Tensor):
                continue
            short = tuple(name.rpartition(".")[2] for name in g.linears)
            object.__setattr__(norm, _STATE, (parent, short, eps, float(family.norm_offset)))
            norm.forward = types.MethodType(_norm_forward, norm)
            n += 1
    return n


def detach(model: nn.Module) -> int:
    """Undo :func:`attach`; returns how many norms it restored."""
    n = 0
    for m in model.modules():
        if _STATE in m.__dict__:
            del m.__dict__[_STATE]
            m.__dict__.pop("forward", None)
            n += 1
    return n


def norm_quant(
    h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_q, s_x, r)`` of ``RMSNorm(r)`` with ``r = residual + h`` (the fast decode step's add + norm, quantized
    instead of written out)."""
    xq, sx, r, _ = torch.ops.quick.rms_norm_quant(h, residual, weight, eps, offset, False)
    return xq, sx, r
