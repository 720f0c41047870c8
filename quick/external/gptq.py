"""GPTQ checkpoints (GPTQModel, AutoGPTQ, transformers/optimum): ``quant_method: "gptq"``, 4-bit, int32 packing.

Per linear: ``qweight`` int32 ``[ceil(K/8), N]`` (input row ``k`` at bits ``4*(k%8)`` of row ``k//8``), ``qzeros``
int32 ``[groups, ceil(N/8)]`` (column ``n`` at bits ``4*(n%8)``), ``scales`` ``[groups, N]``, ``g_idx`` ``[K]`` (the
group of each input row) and ``w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.

Zero points: the classic ``gptq`` (v1) format stores ``zero - 1``; GPTQModel writes it by subtracting
``0x11111111`` from each int32 word, so a zero point of 0 borrows from the next nibble. Adding the same constant
to the word undoes that exactly (carries restore the borrows), which is what GPTQModel does when it reads v1.
``gptq_v2`` stores the zero points as they are. Symmetric GPTQ stores a zero point of 8 like asymmetric ones.

Act-order (``desc_act``) checkpoints have a ``g_idx`` that is not ``k // G``; sorting the rows by it makes groups
contiguous (as the Marlin and ExLlama kernels do) and the layer keeps the sorting permutation for its input.
"""

from __future__ import annotations

from typing import Any

import torch

from quick.external.base import ExternalFormatError, ImportedLinear, build_linear, check_group_size, scale_dtype
from quick.formats.interleave import unpack_nibbles

V1_FORMATS = ("gptq",)
V2_FORMATS = ("gptq_v2",)
_V1_OFFSET = 0x11111111


def v1_to_v2_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """Add 1 to every packed zero point of v1 ``qzeros`` (int32 word arithmetic, wrapping like the writer's)."""
    w = (qzeros.to(torch.int64) + _V1_OFFSET) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


class GptqImporter:
    marker = ".qweight"
    tensor_names = ("qweight", "qzeros", "scales", "g_idx")
    scale_name = "scales"

    def __init__(self, qc: dict[str, Any]) -> None:
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ExternalFormatError(f"GPTQ bits = {bits!r} is not supported; only 4-bit GPTQ checkpoints")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in V1_FORMATS + V2_FORMATS:
            raise ExternalFormatError(
                f"GPTQ checkpoint_format = {fmt!r} is not supported; only {list(V1_FORMATS + V2_FORMATS)} "
                "(Marlin, BitBLAS and other repacked GPTQ formats store the weights differently)"
            )
        self.v1 = fmt in V1_FORMATS
        pack_dtype = str(qc.get("pack_dtype", "int32")).lower().removeprefix("torch.")
        if pack_dtype != "int32":
            raise ExternalFormatError(f"GPTQ pack_dtype = {pack_dtype!r} is not supported; only int32")
        if qc.get("dynamic"):
            raise ExternalFormatError("GPTQ 'dynamic' per-module overrides are not supported (one scheme per model)")
        group = qc.get("group_size", 128)
        self.group_size = check_group_size(int(group) if isinstance(group, (int, float, str)) else group, "group_size")
        self.symmetric = bool(qc.get("sym", True))
        self.desc_act = bool(qc.get("desc_act", False))
        self.format = fmt

    def describe(self) -> str:
        kind = "channel" if self.group_size == -1 else f"group {self.group_size}"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"GPTQ ({self.format}) int4, {kind}, {sym}{', act-order' if self.desc_act else ''}"

    def convert(
        self, name: str, tensors: dict[str, torch.Tensor], k: int, n: int, layout: str, dtype: torch.dtype
    ) -> ImportedLinear:
        for t in ("qweight", "qzeros", "scales"):
            if t not in tensors:
                raise ExternalFormatError(f"missing tensor '{name}.{t}'")
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        groups = 1 if self.group_size == -1 else -(-k // self.group_size)
        expect = {
            "qweight": (qweight, torch.int32, (-(-k // 8), n)),
            "qzeros": (qzeros, torch.int32, (groups, -(-n // 8))),
        }
        for tname, (t, dt, shape) in expect.items():
            if t.dtype != dt or tuple(t.shape) != shape:
                raise ExternalFormatError(
                    f"'{name}.{tname}' is {t.dtype} {tuple(t.shape)}, expected {dt} {shape} for a [{n}, {k}] layer "
                    f"({self.describe()})"
                )
        if tuple(scales.shape) != (groups, n) or not scales.is_floating_point():
            raise ExternalFormatError(
                f"'{name}.scales' is {scales.dtype} {tuple(scales.shape)}, expected float {(groups, n)}"
            )
        q = unpack_nibbles(qweight.t().contiguous())[:, :k].t()
        zeros = unpack_nibbles(v1_to_v2_zeros(qzeros) if self.v1 else qzeros)[:, :n]
        g_idx = tensors.get("g_idx")
        return build_linear(name, q, scales, zeros, self.group_size, layout, scale_dtype(scales, dtype), g_idx)
