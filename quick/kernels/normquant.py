"""(Residual add +) RMSNorm + per-token int8 activation quantization in one launch, for the W4A8 layers that read a
norm's output (a decoder layer's fused q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``).

``rms_norm_quant(x, weight, eps, offset, residual, normed)`` returns :class:`NormQuant`: ``x_q`` int8 [M, K] and
``s_x`` fp32 [M] in the format the W4A8 GEMMs consume (:func:`quick.formats.w4a8.quantize_activations`), the new
residual ``r = residual + x`` when a residual is given, and the normed rows when asked for. The arithmetic is the
unfused path's: :func:`quick.kernels.decode.rms_norm` (transformers' fp32 norm with its casts to the model dtype)
of ``r``, then the activation quantization. On CUDA ``csrc/quick_normquant.cu`` (one CTA per row) computes it;
elsewhere :func:`reference` does, with torch. The kernel agrees with the unfused CUDA path bit for bit except
where the fp32 sum of squares (summed in another order than torch's) moves a normed element across a rounding
boundary of the model dtype: that element's ``x_q`` (and, if it is the row's maximum, ``s_x``) can then differ by
one step. The new residual is always bit-identical.

``VARIANTS`` lists the compiled variants (``python -m quick.kernels.compile_check``).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from quick.formats.w4a8 import quantize_activations
from quick.formats.weights import SUPPORTED_DTYPES

SOURCE = "quick_normquant.cu"
ARCHS = ("sm_80", "sm_90a")
THREADS = 512  # must match THREADS in csrc/quick_normquant.cu
ENTRY = {torch.float16: "quick_normquant_f16", torch.bfloat16: "quick_normquant_bf16"}
VARIANTS: list[tuple[str, dict[str, int], tuple[str, ...]]] = [(SOURCE, {}, ARCHS)]


class NormQuantError(ValueError):
    """Inputs the norm + quantization kernel cannot take; the message says which and why."""


class NormQuant(NamedTuple):
    xq: Tensor  # int8 [M, K]
    sx: Tensor  # fp32 [M]
    residual: Tensor | None  # residual + x [M, K] in the model dtype, when a residual was given
    normed: Tensor | None  # RMSNorm(r) [M, K] in the model dtype, when asked for


def validate(
    x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, residual: Tensor | None = None
) -> tuple[int, int]:
    """``(M, K)``; raises ``TypeError`` (types, dtypes) or :class:`NormQuantError` (shapes, values, devices).
    Works on meta / fake tensors (no device requirement)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0 or x.shape[1] % 8:
        raise NormQuantError(f"x must be 2-D [M, K] with K a positive multiple of 8, got shape {tuple(x.shape)}")
    m, k = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or tuple(weight.shape) != (k,):
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise NormQuantError(f"norm weight must be a [{k}] {x.dtype} tensor, got {got}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype != x.dtype or residual.shape != x.shape:
            got = f"{residual.dtype} {tuple(residual.shape)}" if isinstance(residual, torch.Tensor) else residual
            raise NormQuantError(f"residual must be a [{m}, {k}] {x.dtype} tensor like x, got {got}")
    if not isinstance(eps, float | int) or not math.isfinite(eps) or eps < 0:
        raise NormQuantError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(offset, float | int) or not math.isfinite(offset):
        raise NormQuantError(f"offset must be a finite number, got {offset!r}")
    devices = {t.device for t in (x, weight, residual) if t is not None}
    if len(devices) != 1:
        raise NormQuantError(
            f"x, the norm weight and the residual must share a device, got {sorted(map(str, devices))}"
        )
    return m, k


def reference(
    x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, residual: Tensor | None = None, normed: bool = False
) -> NormQuant:
    """The same arithmetic with torch ops: the unfused path (add in the model dtype, ``decode.rms_norm``,
    ``quantize_activations``); any device."""
    from quick.kernels.decode import rms_norm

    validate(x, weight, eps, offset, residual)
    r = residual + x if residual is not None else x
    y = rms_norm(r, weight, float(eps), float(offset))
    xq, sx = quantize_activations(y)
    return NormQuant(xq, sx, r if residual is not None else None, y if normed else None)


def is_available(x: Tensor) -> bool:
    """A CUDA fp16/bf16 tensor on an sm_80+ device, and nvcc to build the kernel."""
    from quick.kernels import jit

    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    return jit.nvcc_available()


_LAUNCH: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _launch(m: int, k: int, eps: float, offset: float, dtype: torch.dtype, dev: torch.device):
    from quick.kernels import jit, mma

    key = (m, k, eps, offset, dtype, dev)
    hit = _LAUNCH.get(key)
    if hit is None:
        with _LOCK:
            kern = jit.load_kernel(SOURCE, ENTRY[dtype], {}, mma._dev_index(dev))
            # pointers: x, resid, weight, x_q, s_x, r_out, normed; scalars: M, K, eps, offset
            hit = mma._FastLaunch(kern, (m,), (THREADS,), 0, [None] * 7 + [m, k, float(eps), float(offset)])
            mma._remember(_LAUNCH, key, hit)
    return hit


def _dense(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def _check_out(name: str, t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device) -> None:
    ok = isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype and t.device == dev
    if not ok or not t.is_contiguous() or t.data_ptr() % 16:
        raise NormQuantError(f"out.{name} must be a contiguous 16-byte aligned {list(shape)} {dtype} tensor on {dev}")


def rms_norm_quant_cuda(
    x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, residual: Tensor | None = None,
    normed: bool = False, out: NormQuant | None = None,
) -> NormQuant:  # fmt: skip
    """The kernel on CUDA tensors. ``out``: the caller's output buffers (e.g. poisoned ones in tests), with
    ``residual`` / ``normed`` given exactly where they are produced."""
    m, k = validate(x, weight, eps, offset, residual)
    if x.device.type != "cuda":
        raise NormQuantError(f"x is on {x.device}: the norm + quantization kernel runs on CUDA tensors")
    dev = x.device
    x, weight = _dense(x), _dense(weight)
    residual = _dense(residual) if residual is not None else None
    if out is None:
        out = NormQuant(
            torch.empty((m, k), dtype=torch.int8, device=dev),
            torch.empty((m,), dtype=torch.float32, device=dev),
            torch.empty_like(x) if residual is not None else None,
            torch.empty_like(x) if normed else None,
        )
    else:
        _check_out("xq", out.xq, (m, k), torch.int8, dev)
        _check_out("sx", out.sx, (m,), torch.float32, dev)
        for name, want, t in (("residual", residual is not None, out.residual), ("normed", normed, out.normed)):
            if want:
                _check_out(name, t, (m, k), x.dtype, dev)
            elif t is not None:
                raise NormQuantError(f"out.{name} given but not produced")
    if m:
        stream = torch.cuda.current_stream(dev).cuda_stream
        ptrs = [x.data_ptr(), residual.data_ptr() if residual is not None else 0, weight.data_ptr()]
        ptrs += [out.xq.data_ptr(), out.sx.data_ptr()]
        ptrs += [t.data_ptr() if t is not None else 0 for t in (out.residual, out.normed)]
        _launch(m, k, float(eps), float(offset), x.dtype, dev)(ptrs, stream)
    return out


def rms_norm_quant(
    x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, residual: Tensor | None = None, normed: bool = False
) -> NormQuant:
    """The kernel for CUDA tensors it can run, else :func:`reference`."""
    if is_available(x):
        return rms_norm_quant_cuda(x, weight, eps, offset, residual, normed)
    return reference(x, weight, eps, offset, residual, normed)
