"""The W4A8 (QQQ-style) number format: what the quantizer produces, what the kernels consume, and the reference.

One contract shared by the quantization algorithms (``quick.algorithms.qqq``), the packing layout and the kernels:

* **Activations**, per token (row) symmetric int8, computed in fp32 at run time:
  ``amax[m] = max_k |x[m, k]|``, ``inv = 127 / amax`` (0 when ``amax == 0``),
  ``x_q = clamp(rint(x * inv), -127, 127)`` (round half to even), ``s_x[m] = amax / 127``.
* **Weights**, ``q[N, K]`` signed int4 in ``[-8, 7]`` (stored in an int8 tensor before packing) with
  - per-channel (``group_size == -1``): ``W[n, k] = s_ch[n] * q[n, k]``;
  - per-group (``group_size == 128`` etc.): a second-level *integer* group scale ``s_g[K/G, N]`` in
    ``[1, 127]`` (QQQ's int8 level), ``W[n, k] = s_ch[n] * s_g[k // G, n] * q[n, k]``. The quantizers write
    ``s_g <= 16`` (:data:`WIDEN_GROUP_SCALE_MAX`): then every ``q * s_g`` is itself an int8 (``-8 * 16 = -128``),
    so a kernel widens the int4 codes to ``q * s_g`` in registers and sums all groups in one int32 accumulator
    (QQQ's kernel design), with no per-group rescaling; larger scales (accepted for older checkpoints) take the
    per-group fold.
* **Product**: ``y[m, n] = s_x[m] * s_ch[n] * sum_k x_q[m, k] * q[n, k] * s_g[k // G, n]`` (+ bias[n]). The sum
  is an exact integer (int32 accumulation cannot overflow for K <= 32768 with these ranges), so kernels that
  scale per-group int32 partials and kernels that widen ``q * s_g`` to int8 first agree bit for bit before the
  float epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quick.formats.weights import QuantizationError

QMIN, QMAX = -8, 7
GROUP_SCALE_MAX = 127
# Largest group scale with q * s_g in int8 for every code q in [-8, 7]: what the quantizers produce, and what lets
# the kernels widen the weights to int8 in registers instead of folding per group.
WIDEN_GROUP_SCALE_MAX = 16
SUPPORTED_W4A8_GROUPS = (-1, 128)


@dataclass
class W4A8Weight:
    """Unpacked W4A8 weights of one linear layer ``y = x @ W.T`` (``W`` is ``[N, K]``, nn.Linear order)."""

    q: torch.Tensor  # [N, K] int8, values in [-8, 7]
    channel_scale: torch.Tensor  # [N] float32
    group_scale: torch.Tensor | None  # [K // G, N] int16 in [1, 127], or None for per-channel
    group_size: int  # -1 (per-channel) or G

    def __post_init__(self) -> None:
        validate_w4a8(self)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``W [N, K]`` in ``dtype``: the weights the integer arithmetic represents exactly."""
        w = self.q.to(torch.float64)
        if self.group_scale is not None:
            w = w * self.group_scale.to(torch.float64).t().repeat_interleave(self.group_size, dim=1)
        return (w * self.channel_scale.to(torch.float64)[:, None]).to(dtype)


def validate_w4a8(w: W4A8Weight) -> None:
    """Raise ``ValueError`` naming the first field that breaks the format contract."""
    if w.q.dim() != 2 or w.q.dtype != torch.int8:
        raise ValueError(f"q must be a 2-D int8 tensor [N, K], got {w.q.dtype} {tuple(w.q.shape)}")
    n, k = w.q.shape
    if w.q.numel() and (int(w.q.min()) < QMIN or int(w.q.max()) > QMAX):
        raise ValueError(f"q values must lie in [{QMIN}, {QMAX}]")
    if w.channel_scale.shape != (n,) or not w.channel_scale.is_floating_point():
        raise ValueError(f"channel_scale must be a float tensor of shape ({n},), got {tuple(w.channel_scale.shape)}")
    if w.group_size == -1:
        if w.group_scale is not None:
            raise ValueError("per-channel W4A8 (group_size=-1) takes no group_scale")
        return
    if w.group_size <= 0 or k % w.group_size:
        raise ValueError(f"group_size {w.group_size} must be -1 or a positive divisor of K={k}")
    if w.group_scale is None:
        raise ValueError(f"group_size {w.group_size} needs a group_scale [K/G, N] = [{k // w.group_size}, {n}]")
    if w.group_scale.shape != (k // w.group_size, n) or w.group_scale.is_floating_point():
        raise ValueError(
            f"group_scale must be an integer tensor of shape ({k // w.group_size}, {n}), "
            f"got {w.group_scale.dtype} {tuple(w.group_scale.shape)}"
        )
    if w.group_scale.numel() and (int(w.group_scale.min()) < 1 or int(w.group_scale.max()) > GROUP_SCALE_MAX):
        raise ValueError(f"group_scale values must lie in [1, {GROUP_SCALE_MAX}]")


def widens_to_int8(group_scale: torch.Tensor | None) -> bool:
    """True when ``q * s_g`` fits int8 for every code (all scales <= :data:`WIDEN_GROUP_SCALE_MAX`)."""
    return group_scale is None or group_scale.numel() == 0 or int(group_scale.max()) <= WIDEN_GROUP_SCALE_MAX


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``x [..., K]`` exactly as the kernels do it (fp32): ``(x_q int8, s_x fp32 [...])``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.clamp(torch.round(xf * inv[..., None]), -127, 127).to(torch.int8)
    return xq, amax / 127.0


def w4a8_reference(x: torch.Tensor, w: W4A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``y [..., N]`` of the W4A8 arithmetic above (activation quantization included)."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has K={x.shape[-1]}, weights expect K={w.in_features}")
    xq, sx = quantize_activations(x)
    y = (xq.to(torch.float64) @ w.dequantize(torch.float64).t().to(xq.device)) * sx.to(torch.float64)[..., None]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


# ---------------------------------------------------------------------------------------- round to nearest

# 2 * amax / 15 maps [-amax, amax] onto [-7.5, 7.5]: the int4 code range [-8, 7] with half a step clipped at +amax.
STEP_PER_AMAX = 2.0 / 15.0
_TINY = 1e-10


def check_group_size(group_size: int) -> None:
    if group_size not in SUPPORTED_W4A8_GROUPS:
        raise QuantizationError(
            f"W4A8 group size {group_size} is not supported; choose one of {SUPPORTED_W4A8_GROUPS} (-1 = per channel)"
        )


# The W4A8 GPU kernels take K in multiples of 128 (quick.kernels.w4a8_mma.is_available, the sm90 layout's k
# block), so every layer is stored zero-padded to that (SmolLM2's 576 -> 640); zero columns cost no accuracy.
K_ALIGN = 128


def padded_k_w4a8(k: int, group_size: int) -> int:
    """Stored K: a multiple of the group size and of :data:`K_ALIGN`."""
    step = math.lcm(K_ALIGN, group_size if group_size > 0 else 1)
    return -(-k // step) * step


# ---------------------------------------------------------------------------------------- weight grids


def channel_scale_for(amax_row: torch.Tensor, group_size: int) -> torch.Tensor:
    """First-level (float) scale per output row: the int4 step itself per-channel, 1/16 of the largest group
    step per-group (so that the largest group gets ``s_g = 16``: the most resolution with ``q * s_g`` in int8)."""
    step = amax_row.float() * STEP_PER_AMAX
    if group_size != -1:
        step = step / WIDEN_GROUP_SCALE_MAX
    return step.clamp(min=_TINY)


def group_scale_for(amax_group: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """Second-level integer scale ``ceil(step / s_ch)`` in ``[1, 16]`` for groups' ``amax [..., N]``.

    Rounding up keeps every weight of the group within half a step of the grid (rounding to nearest would clip
    the group's largest weights by up to half a unit of ``s_g``, a lot for small ``s_g``); the 1e-3 slack stops
    float noise from adding a whole unit."""
    step = amax_group.float() * STEP_PER_AMAX
    return torch.ceil(step / channel_scale - 1e-3).clamp(1, WIDEN_GROUP_SCALE_MAX)


def _round_q(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), QMIN, QMAX)


def _finish(q: torch.Tensor, channel_scale: torch.Tensor, group_scale: torch.Tensor | None, group_size: int):
    """Pad ``q [N, K]`` (and the group scales) to the stored K and build the validated :class:`W4A8Weight`."""
    n, k = q.shape
    kp = padded_k_w4a8(k, group_size)
    q = F.pad(q, (0, kp - k)).to(torch.int8).contiguous()
    gs = None
    if group_scale is not None:
        ng = kp // group_size
        gs = F.pad(group_scale, (0, 0, 0, ng - group_scale.shape[0]), value=1.0).to(torch.int16).contiguous()
    return W4A8Weight(q, channel_scale.float().contiguous(), gs, group_size)


def _rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Round-to-nearest of fp32 ``w [N, K]``: codes ``[N, K]``, ``s_ch [N]``, ``s_g [groups, N]`` or None, and
    the effective step of every element broadcastable to ``[N, groups, G]`` (per group) or ``[N, 1]``."""
    n, k = w.shape
    s_ch = channel_scale_for(w.abs().amax(dim=1), group_size)
    if group_size == -1:
        step = s_ch[:, None]
        return _round_q(w, step), s_ch, None, step
    ng = -(-k // group_size)
    wg = F.pad(w, (0, ng * group_size - k)).reshape(n, ng, group_size)
    s_g = group_scale_for(wg.abs().amax(dim=-1), s_ch[:, None])  # [N, ng]
    step = (s_ch[:, None] * s_g)[..., None]
    return _round_q(wg, step).reshape(n, ng * group_size)[:, :k], s_ch, s_g.t(), step


def quantize_w4a8_rtn(weight: torch.Tensor, group_size: int = -1) -> W4A8Weight:
    """Round-to-nearest W4A8 weights of an ``nn.Linear`` weight ``[N, K]`` (K padded to whole groups)."""
    check_group_size(group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"expected a 2-D float weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise QuantizationError("weight contains NaN or inf; refusing to quantize")
    q, s_ch, s_g, _ = _rtn(weight.detach().float(), group_size)
    return _finish(q, s_ch, s_g, group_size)


def fake_quant_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """RTN W4A8 weights dequantized back to ``[N, K]`` in fp32 (what the smoothing search scores); equal to
    ``quantize_w4a8_rtn(weight).dequantize()`` up to fp32 rounding, without building the stored format."""
    w = weight.detach().float()
    n, k = w.shape
    q, _, _, step = _rtn(w, group_size)
    if group_size == -1:
        return q * step
    ng = step.shape[1]
    return (F.pad(q, (0, ng * group_size - k)).reshape(n, ng, group_size) * step).reshape(n, -1)[:, :k]


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 quantize-dequantize of ``x`` in its own dtype, with the kernels' exact rounding."""
    xq, sx = quantize_activations(x)
    return (xq.float() * sx[..., None]).to(x.dtype)
