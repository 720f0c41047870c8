"""Group-wise 4-bit quantization primitives (round-to-nearest), computed the way AWQ does it.

Conventions used everywhere in the package:

* An ``nn.Linear`` weight is ``[N, K]`` (out, in). Quantized tensors are stored transposed, ``[K, N]``,
  because that is the order of AutoAWQ's checkpoints and of the GEMM ``y = x @ W``.
* Groups run along K (the input dimension): group ``g`` covers rows ``g*G .. g*G+G-1`` of ``[K, N]``.
* ``q`` holds unsigned codes in ``[0, 2**bits - 1]``; ``zeros`` holds the integer zero point per
  (group, column); ``w = (q - zero) * scale``. A symmetric quantizer is the special case
  ``zero = 2**(bits-1)`` for every group, so every layout and kernel handles one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


class QuantizationError(ValueError):
    """Raised for inputs the quantizer cannot handle (shape, dtype, group size, bit width)."""


@dataclass
class QuantizedWeight:
    """Unpacked quantized weight: codes ``q`` [K, N] uint8, ``scales``/``zeros`` [K/G, N]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[K, N]`` weight ``(q - zero) * scale`` in ``dtype`` (computed in fp32 or fp64)."""
        return dequantize(self.q, self.scales, self.zeros, self.group_size, dtype)


def check_quantized(qw: QuantizedWeight) -> tuple[int, int, int]:
    """Check that ``qw`` is what every layout packs: 2-D integer codes and zero points in [0, 15], float16 or
    bfloat16 scales, and ``[K/G, N]`` scales/zeros; returns ``(K, N, G)``. Packing out-of-range codes would
    silently corrupt the neighbouring nibbles, so this is checked before every pack."""
    q, scales, zeros = qw.q, qw.scales, qw.zeros
    if not all(isinstance(t, torch.Tensor) for t in (q, scales, zeros)):
        raise QuantizationError("QuantizedWeight q, scales and zeros must be tensors")
    if q.dim() != 2:
        raise QuantizationError(f"codes q must be 2-D [K, N], got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise QuantizationError(f"codes q must have an integer dtype (uint8), got {q.dtype}")
    k, n = q.shape
    g = resolve_group_size(qw.group_size, k)
    if qw.bits != 4:
        raise QuantizationError(f"only 4-bit weights are supported, got bits={qw.bits}")
    if scales.dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(f"scales must be float16 or bfloat16, got {scales.dtype}")
    check_group_shapes(scales, zeros, k, n, g, qw.group_size)
    if q.numel():
        lo, hi = (int(v) for v in torch.aminmax(q))
        if lo < 0 or hi > 15:
            raise QuantizationError(f"codes must lie in [0, 15], got [{lo}, {hi}]")
    if zeros.numel():
        z = zeros.to(torch.float32)
        lo, hi = (float(v) for v in torch.aminmax(z))
        if not (0 <= lo and hi <= 15) or not torch.equal(z, z.round()):
            raise QuantizationError("zero points must be integers in [0, 15]")
    return k, n, g


def check_group_shapes(
    scales: torch.Tensor, zeros: torch.Tensor, k: int, n: int, g: int, group_size: int,
    error: type[ValueError] = QuantizationError,
) -> None:  # fmt: skip
    """``scales`` and ``zeros`` must be ``[K/G, N]`` (``g``: the resolved ``group_size``), else ``error``."""
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (k // g, n):
            raise error(
                f"{name} has shape {tuple(t.shape)}, expected [K/G, N] = {(k // g, n)} for K={k}, N={n}, "
                f"group_size={group_size}"
            )


def resolve_group_size(group_size: int, k: int) -> int:
    """Map the per-channel marker -1 to K and check the group size divides K."""
    if isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(
            f"unsupported group size {group_size!r}; supported: {SUPPORTED_GROUP_SIZES} (-1 = per-channel)"
        )
    g = k if group_size == -1 else group_size
    if k % g != 0:
        raise QuantizationError(f"in_features K={k} is not a multiple of the group size {g}")
    return g


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale`` broadcast over groups; math in fp64 when asked for fp64, else fp32."""
    if q.dim() != 2:
        raise QuantizationError(f"codes q must be 2-D [K, N], got shape {tuple(q.shape)}")
    k, n = q.shape
    g = resolve_group_size(group_size, k)
    check_group_shapes(scales, zeros, k, n, g, group_size)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales.to(work).repeat_interleave(g, dim=0)
    z = zeros.to(work).repeat_interleave(g, dim=0)
    return ((q.to(work) - z) * s).to(dtype)


def quantize(
    weight: torch.Tensor,
    group_size: int = 128,
    bits: int = 4,
    zero_point: bool = True,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Round-to-nearest group quantization of an ``nn.Linear`` weight ``[N, K]``.

    Asymmetric (``zero_point=True``, AWQ's default): ``scale = (max - min) / (2**bits - 1)``,
    ``zero = round(-min / scale)`` clamped to the code range. Symmetric: ``scale = absmax / (2**(bits-1) - 1)``
    with a fixed zero of ``2**(bits-1)``. Scales are rounded to ``dtype`` *before* the codes are computed,
    so that the stored scales reproduce exactly the grid the codes were chosen on.
    """
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D linear weight [out, in], got shape {tuple(weight.shape)}")
    if bits != 4:
        raise QuantizationError(f"only 4-bit weights are supported, got bits={bits}")
    if not weight.is_floating_point():
        raise QuantizationError(f"weight must be floating point, got {weight.dtype}")
    dtype = dtype or (weight.dtype if weight.dtype in SUPPORTED_DTYPES else torch.float16)
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(f"scale dtype must be float16 or bfloat16, got {dtype}")
    if weight.device.type == "meta":
        raise QuantizationError("weight is on the meta device (not materialized); load its values first")
    if weight.numel() == 0:
        raise QuantizationError(f"weight is empty (shape {tuple(weight.shape)}); nothing to quantize")
    if not torch.isfinite(weight).all():
        raise QuantizationError("weight contains NaN or inf; refusing to quantize")
    n, k = weight.shape
    g = resolve_group_size(group_size, k)
    w = weight.detach().to(torch.float32).t().reshape(k // g, g, n)  # [groups, G, N]
    max_int = 2**bits - 1
    if zero_point:
        wmax = w.amax(dim=1)
        wmin = w.amin(dim=1)
        scales = ((wmax - wmin).clamp(min=1e-5) / max_int).to(dtype)
        s32 = scales.to(torch.float32)
        zeros = (-torch.round(wmin / s32)).clamp(0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = (w.abs().amax(dim=1).clamp(min=1e-5) / (half - 1)).to(dtype)
        s32 = scales.to(torch.float32)
        zeros = torch.full_like(s32, float(half))
    if not torch.isfinite(scales).all():
        top = weight.detach().abs().max().item()
        raise QuantizationError(
            f"weight range too large for {dtype} scales (max |w| = {top:.3g}, a scale overflows); "
            "quantize with dtype=torch.bfloat16"
        )
    q = (torch.round(w / s32[:, None, :]) + zeros[:, None, :]).clamp(0, max_int)
    return QuantizedWeight(
        q=q.reshape(k, n).to(torch.uint8).contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        group_size=group_size,
        bits=bits,
    )


def fake_quantize(weight: torch.Tensor, group_size: int = 128, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize an ``[N, K]`` weight, keeping its shape and dtype (used by AWQ's search)."""
    qw = quantize(weight, group_size, zero_point=zero_point)
    return qw.dequantize(torch.float32).t().to(weight.dtype)
