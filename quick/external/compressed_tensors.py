"""compressed-tensors ``pack-quantized`` W4A16 (what llm-compressor writes for W4A16 / W4A16_ASYM).

Per linear: ``weight_packed`` int32 ``[N, ceil(K/8)]`` (element ``k`` at bits ``4*(k%8)`` of word ``k//8``, stored
as ``q + 8`` for signed codes ``q`` in ``[-8, 7]``), ``weight_scale`` ``[N, groups]``, ``weight_zero_point``
(asymmetric only) int32 ``[ceil(N/8), groups]`` packed the same way along N, ``weight_shape`` ``[N, K]`` and,
for the retired group act-order, ``weight_g_idx`` ``[K]``. The library dequantizes ``(q - zp) * scale``; with
unsigned nibbles ``q + 8`` and ``zp + 8`` that is exactly this project's ``(code - zero) * scale``: codes are the
stored nibbles, zero points the stored zero nibbles, and a symmetric scheme is a zero point of 8.
"""

from __future__ import annotations

from typing import Any

import torch

from quick.external.base import ExternalFormatError, ImportedLinear, build_linear, check_group_size, scale_dtype
from quick.formats.interleave import unpack_nibbles

FORMAT = "pack-quantized"
STRATEGIES = ("group", "channel")


def _weights_args(qc: dict[str, Any]) -> dict[str, Any]:
    """The one weight scheme of the config's groups (they must agree: layers are told apart by tensors only)."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise ExternalFormatError("compressed-tensors quantization_config has no config_groups")
    seen: dict[str, Any] | None = None
    for gname, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise ExternalFormatError(f"config_groups.{gname}.weights is missing; only weight quantization is read")
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise ExternalFormatError(
                f"config_groups.{gname}.format = {fmt!r} is not supported; only '{FORMAT}' (int4 packed in int32)"
            )
        for act in ("input_activations", "output_activations"):
            if group.get(act):
                raise ExternalFormatError(
                    f"config_groups.{gname}.{act} is set: activation quantization (W4A8, W8A8, ...) is not "
                    "supported; only W4A16 schemes (weights only)"
                )
        w = group["weights"]
        key = {k: w.get(k) for k in ("num_bits", "type", "strategy", "group_size", "symmetric")}
        if seen is not None and key != seen:
            raise ExternalFormatError(
                f"config_groups use different weight schemes ({seen} vs {key}); one scheme per checkpoint is supported"
            )
        seen = key
        for field, value in w.items():
            if field == "dynamic" and value:
                raise ExternalFormatError(f"config_groups.{gname}.weights.dynamic = {value!r} is not supported")
    assert seen is not None
    return seen


class CompressedTensorsImporter:
    marker = ".weight_packed"
    tensor_names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    scale_name = "weight_scale"

    def __init__(self, qc: dict[str, Any]) -> None:
        fmt = qc.get("format")
        if fmt not in (None, FORMAT, "mixed-precision"):
            raise ExternalFormatError(
                f"compressed-tensors format = {fmt!r} is not supported; only '{FORMAT}' (W4A16 int4)"
            )
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ExternalFormatError(
                f"compressed-tensors quantization_status = {status!r}: weights are not stored packed; "
                "save the model compressed (save_compressed=True)"
            )
        for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if qc.get(field):
                raise ExternalFormatError(f"compressed-tensors {field} is set; it is not supported (W4A16 only)")
        w = _weights_args(qc)
        if w["num_bits"] != 4:
            raise ExternalFormatError(f"weights.num_bits = {w['num_bits']!r} is not supported; only 4-bit weights")
        if str(w["type"]).lower() != "int":
            raise ExternalFormatError(f"weights.type = {w['type']!r} is not supported; only 'int'")
        strategy = str(w["strategy"]).lower()
        if strategy not in STRATEGIES:
            raise ExternalFormatError(
                f"weights.strategy = {w['strategy']!r} is not supported; only {list(STRATEGIES)} (4-bit per group "
                "or per output channel)"
            )
        self.strategy = strategy
        self.symmetric = bool(w["symmetric"])
        self.group_size = -1 if strategy == "channel" else check_group_size(w["group_size"], "weights.group_size")
        self.ignore = list(qc.get("ignore") or [])

    def describe(self) -> str:
        kind = "channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"compressed-tensors pack-quantized int4, {kind}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def convert(
        self, name: str, tensors: dict[str, torch.Tensor], k: int, n: int, layout: str, dtype: torch.dtype
    ) -> ImportedLinear:
        for t in ("weight_packed", "weight_scale"):
            if t not in tensors:
                raise ExternalFormatError(f"missing tensor '{name}.{t}'")
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        shape = tensors.get("weight_shape")
        if shape is not None and [int(v) for v in shape.reshape(-1).tolist()] != [n, k]:
            raise ExternalFormatError(
                f"'{name}.weight_shape' = {shape.tolist()} but the model's layer is [out, in] = [{n}, {k}]"
            )
        words = -(-k // 8)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
            raise ExternalFormatError(
                f"'{name}.weight_packed' is {packed.dtype} {tuple(packed.shape)}, expected int32 {(n, words)}"
            )
        groups = 1 if self.group_size == -1 else -(-k // self.group_size)
        if tuple(scale.shape) != (n, groups) or not scale.is_floating_point():
            raise ExternalFormatError(
                f"'{name}.weight_scale' is {scale.dtype} {tuple(scale.shape)}, expected float {(n, groups)} "
                f"({self.describe()})"
            )
        q = unpack_nibbles(packed)[:, :k].t()
        zeros = self._zeros(name, tensors.get("weight_zero_point"), n, groups)
        g_idx = tensors.get("weight_g_idx")
        return build_linear(name, q, scale.t(), zeros, self.group_size, layout, scale_dtype(scale, dtype), g_idx)

    def _zeros(self, name: str, zp: torch.Tensor | None, n: int, groups: int) -> torch.Tensor:
        """Unsigned zero points ``[groups, N]`` (stored signed zero point + 8)."""
        if self.symmetric:
            if zp is not None and zp.numel() and bool((zp != 0).any()):
                raise ExternalFormatError(f"'{name}.weight_zero_point' is non-zero but the scheme is symmetric")
            return torch.full((groups, n), 8, dtype=torch.uint8)
        if zp is None:
            raise ExternalFormatError(f"missing tensor '{name}.weight_zero_point' (the scheme is asymmetric)")
        if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n // 8), groups):  # packed along N
            return unpack_nibbles(zp.t().contiguous())[:, :n]
        if tuple(zp.shape) == (n, groups) and not zp.is_floating_point():  # unpacked signed values
            z = zp.to(torch.int32)
            if z.numel() and (int(z.min()) < -8 or int(z.max()) > 7):
                raise ExternalFormatError(f"'{name}.weight_zero_point' holds values outside the int4 range [-8, 7]")
            return (z + 8).t().to(torch.uint8)
        if zp.dtype == torch.int32 and tuple(zp.shape) == (n, -(-groups // 8)):  # older files: packed along groups
            return unpack_nibbles(zp)[:, :groups].t()
        raise ExternalFormatError(
            f"'{name}.weight_zero_point' is {zp.dtype} {tuple(zp.shape)}; expected int32 {(-(-n // 8), groups)} "
            f"(int4 packed along the output dimension)"
        )
