"""What every checkpoint importer shares: the format detection, the imported-linear record, group and scale checks.

Each importer turns one linear's stored tensors into the project's unpacked :class:`QuantizedWeight` (codes
``[K, N]`` in ``[0, 15]``, ``w = (q - zero) * scale``) plus an optional input permutation (act-order), which the
loader then packs into any layout. This package depends only on the lower layers (``quant``, ``packing``, ``nn``);
the checkpoint loader (:mod:`quick.checkpoint`) drives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from quick.formats.weights import SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, QuantizedWeight
from quick.nn.linear import padded_in_features

# quant_method values -> format name; 'quick' and 'awq' are read by quick.checkpoint itself
FORMATS = {"quick": "quick", "awq": "awq", "compressed-tensors": "compressed-tensors", "gptq": "gptq"}


class ExternalFormatError(ValueError):
    """A checkpoint of another library that this project cannot represent, or whose tensors are inconsistent."""


@dataclass
class ImportedLinear:
    """One linear ready to pack: ``qw`` holds ``[K', N]`` codes (K' >= K, zero weights in the padded rows),
    ``perm`` the input permutation (``x[..., perm]`` meets row ``i`` of ``qw``) or ``None``."""

    qw: QuantizedWeight
    logical_in_features: int
    perm: torch.Tensor | None = None


class Importer(Protocol):
    """What :func:`quick.checkpoint.load_quantized` needs from a format."""

    marker: str  # tensor suffix that marks a quantized linear, e.g. ".qweight"
    tensor_names: tuple[str, ...]  # per-layer tensors the importer reads (others of the layer: bias)
    scale_name: str
    symmetric: bool
    group_size: int

    def convert(
        self, name: str, tensors: dict[str, torch.Tensor], k: int, n: int, layout: str, dtype: torch.dtype
    ) -> ImportedLinear: ...

    def describe(self) -> str: ...


def detect_format(qc: dict[str, Any]) -> str:
    """The format of a ``quantization_config``: 'quick', 'awq', 'compressed-tensors' or 'gptq'."""
    if not isinstance(qc, dict):
        raise ExternalFormatError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise ExternalFormatError(
            f"quantization_config.quant_method = {qc.get('quant_method')!r} is not supported; "
            f"supported: {sorted(FORMATS)} (4-bit weights only)"
        )
    return FORMATS[method]


def check_group_size(group_size: int, field: str) -> int:
    """A group size the layouts hold (-1 = one group over K), else an error naming the field."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ExternalFormatError(
            f"{field} = {group_size!r} cannot be represented: QUICK layouts take group sizes "
            f"{[g for g in SUPPORTED_GROUP_SIZES if g > 0]} or per-channel"
        )
    return group_size


def scale_dtype(scales: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """Scales stay in their stored fp16/bf16; other float scales (fp32) go to ``fallback``."""
    if scales.dtype in SUPPORTED_DTYPES:
        return scales.dtype
    if not scales.is_floating_point():
        raise ExternalFormatError(f"scales must be floating point, got {scales.dtype}")
    return fallback


def build_linear(
    name: str,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    layout: str,
    dtype: torch.dtype,
    g_idx: torch.Tensor | None = None,
) -> ImportedLinear:
    """Codes ``q [K, N]`` (uint8, 0..15), per-group ``scales``/``zeros`` ``[groups, N]`` and, for act-order, the
    group of each input row ``g_idx [K]``: sort rows so that groups are contiguous (the permutation goes on the
    layer), then pad K with zero weights (``q = zero``) to whole groups and the layout's block."""
    k, n = q.shape
    groups = scales.shape[0]
    g = k if group_size == -1 else group_size
    if not torch.isfinite(scales).all():
        raise ExternalFormatError(f"'{name}': scales hold NaN or inf; the checkpoint is corrupt")
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).reshape(-1)
        if g_idx.numel() != k:
            raise ExternalFormatError(f"'{name}': g_idx has {g_idx.numel()} entries, the layer has K = {k} inputs")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ExternalFormatError(f"'{name}': g_idx values must lie in [0, {groups - 1}] (one per scale row)")
        counts = torch.bincount(g_idx, minlength=groups).tolist()
        want = [min(g, k - i * g) for i in range(groups)]
        if counts != want:
            raise ExternalFormatError(
                f"'{name}': g_idx gives groups of {sorted(set(counts))} rows; QUICK layouts need {g} rows per group "
                f"(the last may be shorter), so this act-order assignment cannot be represented"
            )
        perm = torch.argsort(g_idx, stable=True)
        if torch.equal(perm, torch.arange(k)):
            perm = None
        else:
            q = q.index_select(0, perm)
    elif groups != -(-k // g):
        raise ExternalFormatError(f"'{name}': {groups} scale groups do not match K = {k} with group size {g}")
    kp = padded_in_features(k, group_size, layout)
    if kp != k:
        extra = (kp // g if group_size != -1 else 1) - groups
        if extra > 0:  # whole padding groups: any scale, zero point 8, codes 8 -> weight 0
            scales = torch.cat([scales, scales.new_ones(extra, n)])
            zeros = torch.cat([zeros, zeros.new_full((extra, n), 8)])
        rows = torch.arange(k, kp) // g if group_size != -1 else torch.zeros(kp - k, dtype=torch.int64)
        q = torch.cat([q, zeros.index_select(0, rows).to(q.dtype)])
    qw = QuantizedWeight(
        q=q.to(torch.uint8).contiguous(),
        scales=scales.to(dtype).contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        group_size=group_size,
    )
    return ImportedLinear(qw, k, perm)
