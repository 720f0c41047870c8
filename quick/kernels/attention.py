"""Decode attention over a static KV cache: ``csrc/quick_attn.cu`` as the custom op ``quick::attn_decode``.

One query token per sequence attends to cache positions ``0..pos`` (``pos`` a device scalar, so one captured CUDA
graph serves every step), split over several CTAs per (sequence, key/value head) so that batch 1 fills the GPU, the
query heads of one key/value head sharing each K/V row load (grouped-query attention). Positions after ``pos`` are
never read: the fast decode step's causal mask hides them anyway, and at batch 64 they are a quarter of the cache
on average. The fast decode step (:func:`quick.models.decoder.attend`) calls it on CUDA where :func:`supports`
says yes, and SDPA elsewhere.
"""

# No `from __future__ import annotations`: torch.library infers the op schema from real annotations.

import ctypes
import math

import torch
from torch import Tensor

from quick import settings
from quick.kernels import jit

SOURCE = "quick_attn.cu"
KERNEL = "quick_attn_decode"
ARCHS = ("sm_80", "sm_90a")


def variant_archs(defines: dict) -> tuple[str, ...]:
    """The archs a variant is built for (compile check): ``QA_PDL`` variants run on sm_90 only."""
    return ("sm_90a",) if defines.get("QA_PDL") else ARCHS


HEAD_DIMS = (64, 128, 256)
GROUPS = tuple(range(1, 9))  # query heads per key/value head (SmolLM2 has 3, Qwen2-7B 7)
DTYPES = (torch.float16, torch.bfloat16)
THREADS = 128
MAX_SPLITS = 16
TARGET_CTAS_PER_SM = 12
# compile_check: every variant, both archs
_FLAGS = ({}, {"QA_ROPE": 1}, {"QA_ROPE": 1, "QA_PDL": 1})  # plain, QA_ROPE, QA_ROPE as a PDL launch (QA_PDL)
VARIANTS = [
    (SOURCE, KERNEL, {"QA_D": d, "QA_G": g, "QA_DTYPE": t, **f})
    for f in _FLAGS
    for d in HEAD_DIMS
    for g in GROUPS
    for t in range(2)
]

_COUNTERS: dict = {}  # arrival counters per (device, stream): mma._counters keeps and locks them


class AttnError(ValueError):
    """Inputs the decode attention kernel cannot take; the message says which and why."""


def supports(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel has a variant for this attention (the caller falls back to SDPA otherwise)."""
    return (
        kv_heads > 0
        and heads % kv_heads == 0
        and heads // kv_heads in GROUPS
        and head_dim in HEAD_DIMS
        and dtype in DTYPES
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding of the first ``cos.shape[-1]`` channels of each head (all of them, or a part:
    Phi-4's partial rotary); the rest pass through. The math the ``QA_ROPE`` kernel does (over all channels)."""
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = r // 2
    out = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


def is_available(device: torch.device | None = None) -> bool:
    """An sm_80+ CUDA device and nvcc to build the kernel, unless ``QUICK_ATTN_KERNEL=0`` (then SDPA)."""
    from quick.kernels import mma

    if not settings.attention_kernel_enabled() or not torch.cuda.is_available():
        return False
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda" or mma.capability(dev)[0] < 8:
        return False
    return jit.nvcc_available()


def rope_fusion_enabled() -> bool:
    """Whether the fast decode step folds the rotary and the cache append into the kernel (``QA_ROPE``, the ``rope``
    fusion)."""
    return settings.fusion_enabled("rope")


def positions_per_step(head_dim: int, groups: int = 1) -> int:
    """Cache positions one CTA covers per step of its loop: 4 warps x 32 / (head_dim / 8) lanes per position, times
    the kernel's UNROLL (4, or 2 from 4 query heads per kv head up)."""
    return 4 * 32 // (head_dim // 8) * (4 if groups < 4 else 2)


def choose_splits(batch: int, kv_heads: int, length: int, head_dim: int, num_sms: int, groups: int = 1) -> int:
    """CTAs per (sequence, kv head): up to ``TARGET_CTAS_PER_SM`` CTAs per SM in all, never more splits than loop
    steps of the cache. A CTA walking the cache alone is latency-bound (each loop step a memory round trip), extra
    splits cost a combine: on the H200 (Llama-2-7B) batch 16 ran 4 % faster with 4 splits than with 1,
    batches 64 and 256 2-9 % slower; this rule gives 8, 4, 1, 1 splits at batch 1, 16, 64, 256 there."""
    steps = max(1, -(-length // positions_per_step(head_dim, groups)))
    by_fill = -(-TARGET_CTAS_PER_SM * num_sms // (batch * kv_heads))
    return max(1, min(MAX_SPLITS, steps, by_fill))


def validate(
    q: Tensor, keys: Tensor, values: Tensor, pos: Tensor, mask: Tensor | None
) -> tuple[int, int, int, int, int]:
    """``(B, H, KV, L, D)`` or :class:`AttnError` (shapes, dtypes, devices, layout; no GPU work)."""
    for name, t in (("q", q), ("keys", keys), ("values", values), ("pos", pos)):
        if not isinstance(t, torch.Tensor):
            raise AttnError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 3 or keys.dim() != 4:
        raise AttnError(f"q must be [B, H, D] and keys [B, KV, L, D], got {tuple(q.shape)} and {tuple(keys.shape)}")
    b, h, d = q.shape
    bk, kv, length, dk = keys.shape
    if values.shape != keys.shape:
        raise AttnError(f"values {tuple(values.shape)} != keys {tuple(keys.shape)}")
    if bk != b or dk != d:
        raise AttnError(f"keys {tuple(keys.shape)} do not match q {tuple(q.shape)} (batch, head dim)")
    if q.dtype not in DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype:
        got = f"{q.dtype}, {keys.dtype}, {values.dtype}"
        raise AttnError(f"q, keys, values must share one dtype of {DTYPES}, got {got}")
    if not supports(h, kv, d, q.dtype):
        raise AttnError(
            f"no kernel for {h} query heads over {kv} kv heads of dim {d} (dims {HEAD_DIMS}, groups {GROUPS})"
        )
    if pos.numel() != 1 or pos.dtype != torch.int64:
        raise AttnError(f"pos must be one int64 element, got {pos.numel()} of {pos.dtype}")
    if length < 1:
        raise AttnError("the cache holds no positions")
    if b > 65535 or kv > 65535:  # grid y / z
        raise AttnError(f"batch {b} and kv heads {kv} must each be at most 65535")
    if mask is not None:
        if mask.shape[-1] != length or mask.numel() != b * length or mask.dim() not in (2, 4):
            raise AttnError(f"mask must be [B, L] or [B, 1, 1, L] with L = {length}, got {tuple(mask.shape)}")
        if not mask.is_floating_point():
            raise AttnError(f"mask must be additive (floating point), got {mask.dtype}")
    devs = {t.device for t in (q, keys, values, pos, *(() if mask is None else (mask,)))}
    if len(devs) != 1:
        raise AttnError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    if not keys.is_contiguous() or not values.is_contiguous():
        raise AttnError("keys and values must be contiguous [B, KV, L, D] caches")
    return b, h, kv, length, d


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, pos: Tensor, mask: Tensor | None, scale: float,
    splits: int | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``softmax(q k^T * scale + mask) v`` over cache positions ``0..pos``: q ``[B, H, D]`` -> ``[B, H, D]``.
    ``splits`` overrides the heuristic (tests); ``out`` may be a caller's (poisoned) buffer."""
    b, h, kv, length, d = validate(q, keys, values, pos, mask)
    return _launch(q.contiguous(), keys, values, pos, mask, scale, splits, out, (b, h, kv, length, d), None)


def validate_rope(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
    mask: Tensor | None,
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """:func:`validate` for :func:`decode_attention_rope`'s inputs: q ``[B, H*D]``, k / v ``[B, KV*D]``, cos / sin
    ``[B, D]``, each with unit stride along its row (rows may be strided: views of one fused q/k/v product)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise AttnError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise AttnError(f"{name} must be 2-D [B, columns], got shape {tuple(t.shape)}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        raise AttnError(f"keys must be a [B, KV, L, D] tensor, got {getattr(keys, 'shape', type(keys).__name__)}")
    d = keys.shape[-1]
    if d == 0 or q.shape[-1] % d:
        raise AttnError(f"q's {q.shape[-1]} columns are not a whole number of heads of dim {d}")
    b, h, kv, length, d = validate(q.view(q.shape[0], -1, d), keys, values, pos, mask)
    for name, t, cols in (("k", k, kv * d), ("v", v, kv * d), ("cos", cos, d), ("sin", sin, d)):
        if tuple(t.shape) != (b, cols):
            raise AttnError(f"{name} must be [{b}, {cols}], got {tuple(t.shape)} (full rotary only: cos over all D)")
        if t.dtype != q.dtype:
            raise AttnError(f"{name} must be {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise AttnError(f"{name} is on {t.device}, q on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if b > 1 and t.stride(0) < t.shape[1] or t.stride(1) != 1:
            raise AttnError(f"{name} rows must be dense (unit column stride), got strides {t.stride()}")
    return b, h, kv, length, d


def decode_attention_rope(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
    mask: Tensor | None, scale: float, splits: int | None = None, out: Tensor | None = None, pdl: bool | None = None,
) -> Tensor:  # fmt: skip
    """One decode step's rotary + cache append + attention in one launch (``QA_ROPE``): rotate q ``[B, H*D]`` and
    the new key k ``[B, KV*D]`` with this step's cos / sin ``[B, D]``, write the key and v into ``keys`` / ``values``
    at ``pos`` (in place; nothing where ``pos >= L``), and return the attention of the rotated q over positions
    ``0..pos`` as ``[B, H*D]``. On CPU tensors: the same math in torch (the reference). ``pdl``: the ``QA_PDL``
    variant, a programmatic dependent launch (None: :func:`quick.kernels.jit.pdl_enabled`)."""
    b, h, kv, length, d = validate_rope(q, k, v, keys, values, pos, cos, sin, mask)
    if q.device.type != "cuda":
        return _rope_reference(q, k, v, keys, values, pos, cos, sin, mask, scale, (b, h, kv, length, d))
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if t.data_ptr() % 16 or (b > 1 and t.stride(0) % 8):
            raise AttnError(f"{name} must start 16-byte aligned with a row stride that is a multiple of 8 elements")
    if b > 1 and (k.stride(0) != v.stride(0) or cos.stride(0) != sin.stride(0)):
        raise AttnError("k and v (and cos and sin) must share one row stride")
    if out is not None and out.shape == (b, h * d):
        out = out.view(b, h, d)
    rope_args = (k, v, cos, sin, q.stride(0), k.stride(0), cos.stride(0))
    res = _launch(q, keys, values, pos, mask, scale, splits, out, (b, h, kv, length, d), rope_args, pdl)
    return res.view(b, h * d)


def _rope_reference(q, k, v, keys, values, pos, cos, sin, mask, scale, dims) -> Tensor:
    """:func:`decode_attention_rope`'s math with torch ops (CPU): rotate in the model dtype, append, SDPA."""
    b, h, kv, length, d = dims
    qr = rope(q.view(b, h, d), cos[:, None], sin[:, None])
    kr = rope(k.view(b, kv, d), cos[:, None], sin[:, None])
    p = int(pos.item())
    if p < length:
        keys[:, :, p] = kr
        values[:, :, p] = v.view(b, kv, d)
    n = min(p, length - 1) + 1
    m = None if mask is None else mask.reshape(b, 1, 1, length)[..., :n].to(q.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(
        qr.view(b, kv, h // kv, d), keys[:, :, :n], values[:, :, :n], attn_mask=m, scale=scale
    )
    return o.reshape(b, h * d)


def _launch(q, keys, values, pos, mask, scale, splits, out, dims, rope_args, pdl=None) -> Tensor:
    """The kernel launch for validated inputs; ``rope_args``: ``(k, v, cos, sin, q_stride, kv_stride, cs_stride)``
    for the ``QA_ROPE`` variant (q then ``[B, H*D]`` rows of stride ``q_stride``), else ``None``; ``pdl`` (``QA_ROPE``
    only): the ``QA_PDL`` variant (None: :func:`quick.kernels.jit.pdl_enabled`)."""
    from quick.kernels import mma

    b, h, kv, length, d = dims
    if q.device.type != "cuda":
        raise AttnError("the decode attention kernel runs on CUDA tensors only")
    if not math.isfinite(scale):
        raise AttnError(f"scale must be finite, got {scale}")
    dev = q.device
    if b == 0:
        return q.new_empty((0, h, d))
    groups = h // kv
    s = splits or choose_splits(b, kv, length, d, mma.num_sms(dev), groups)
    if not 1 <= s <= MAX_SPLITS:
        raise AttnError(f"splits must be in [1, {MAX_SPLITS}], got {s}")
    if out is None:
        out = q.new_empty((b, h, d))
    elif tuple(out.shape) != (b, h, d) or out.dtype != q.dtype or not out.is_contiguous() or out.device != dev:
        raise AttnError(f"out must be a contiguous {(b, h, d)} {q.dtype} tensor on {dev}")
    m_ptr, m_stride = 0, 0
    if mask is not None:
        mask = mask.reshape(b, length) if mask.dim() == 4 else mask
        if mask.dtype != q.dtype or mask.stride(-1) != 1:
            mask = mask.to(q.dtype).contiguous()
        m_ptr, m_stride = mask.data_ptr(), mask.stride(0)
    idx = mma._dev_index(dev)
    with torch.cuda.device(dev):
        defines = {"QA_D": d, "QA_G": groups, "QA_DTYPE": DTYPES.index(q.dtype)}
        pdl = rope_args is not None and (jit.pdl_enabled(dev) if pdl is None else pdl)
        if rope_args is not None:
            defines["QA_ROPE"] = 1
        if pdl:
            defines["QA_PDL"] = 1
        kern = jit.load_kernel(SOURCE, KERNEL, defines, idx, jit.arch_for_device(idx))
        stream = torch.cuda.current_stream(dev).cuda_stream
        ws = torch.empty(b * kv * s * groups * (d + 2) if s > 1 else 1, dtype=torch.float32, device=dev)
        cnt = mma._counters(dev, b * kv, stream, _COUNTERS)
        extra = list(rope_args) if rope_args is not None else [ctypes.c_void_p(0)] * 4 + [0, 0, 0]
        kern(
            (s, kv, b),
            (THREADS,),
            [q, keys, values, ctypes.c_void_p(m_ptr), pos, out, ws, cnt, kv, length, m_stride, scale / math.log(2)]
            + extra,
            pdl=pdl,
        )
    return out


@torch.library.custom_op("quick::attn_decode", mutates_args=())
def attn_decode(q: Tensor, keys: Tensor, values: Tensor, pos: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """:func:`decode_attention` as one opaque op (torch.compile, CUDA graphs)."""
    return decode_attention(q, keys, values, pos, mask, scale)


@attn_decode.register_fake
def _(q, keys, values, pos, mask, scale):
    validate(q, keys, values, pos, mask)
    return q.new_empty(q.shape)


@torch.library.custom_op("quick::attn_decode_rope", mutates_args=("keys", "values"))
def attn_decode_rope(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
    mask: Tensor | None, scale: float,
) -> Tensor:  # fmt: skip
    """:func:`decode_attention_rope` as one op that declares its cache writes (torch.compile, CUDA graphs)."""
    return decode_attention_rope(q, k, v, keys, values, pos, cos, sin, mask, scale)


@attn_decode_rope.register_fake
def _(q, k, v, keys, values, pos, cos, sin, mask, scale):
    b, h, _kv, _length, d = validate_rope(q, k, v, keys, values, pos, cos, sin, mask)
    return q.new_empty((b, h * d))
