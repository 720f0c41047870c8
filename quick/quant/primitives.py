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


def resolve_group_size(group_size: int, k: int) -> int:
    """Map the per-channel marker -1 to K and check the group size divides K."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(
            f"unsupported group size {group_size}; supported: {SUPPORTED_GROUP_SIZES} (-1 = per-channel)"
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
    k, n = q.shape
    g = resolve_group_size(group_size, k)
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
