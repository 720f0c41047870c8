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
import os

import torch

from quick.kernels import jit

SOURCE = "quick_attn.cu"
KERNEL = "quick_attn_decode"
ARCHS = ("sm_80", "sm_90a")
HEAD_DIMS = (64, 128, 256)
GROUPS = tuple(range(1, 9))  # query heads per key/value head (SmolLM2 has 3, Qwen2-7B 7)
DTYPES = (torch.float16, torch.bfloat16)
THREADS = 128
MAX_SPLITS = 16
TARGET_CTAS_PER_SM = 12
# compile_check: every variant, both archs
VARIANTS = [
    (SOURCE, KERNEL, {"QA_D": d, "QA_G": g, "QA_DTYPE": t}) for d in HEAD_DIMS for g in GROUPS for t in range(2)
]

_COUNTERS: dict = {}  # arrival counters per (device, stream): quick_mma._counters keeps and locks them


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


def is_available(device: torch.device | None = None) -> bool:
    """An sm_80+ CUDA device and nvcc to build the kernel, unless ``QUICK_ATTN_KERNEL=0`` (then SDPA)."""
    from quick.kernels import quick_mma

    if os.environ.get("QUICK_ATTN_KERNEL", "1") == "0" or not torch.cuda.is_available():
        return False
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda" or quick_mma.capability(dev)[0] < 8:
        return False
    return jit.nvcc_available()


def positions_per_step(head_dim: int, groups: int = 1) -> int:
    """Cache positions one CTA covers per step of its loop: 4 warps x 32 / (head_dim / 8) lanes per position, times
    the kernel's UNROLL (4, or 2 from 4 query heads per kv head up)."""
    return 4 * 32 // (head_dim // 8) * (4 if groups < 4 else 2)


def choose_splits(batch: int, kv_heads: int, length: int, head_dim: int, num_sms: int, groups: int = 1) -> int:
    """CTAs per (sequence, kv head): up to ``TARGET_CTAS_PER_SM`` CTAs per SM in all, never more splits than loop
    steps of the cache. A CTA walking the cache alone is latency-bound (each loop step a memory round trip), extra
    splits cost a combine: on the H200 (Llama-2-7B, window 6) batch 16 ran 4 % faster with 4 splits than with 1,
    batches 64 and 256 2-9 % slower; this rule gives 8, 4, 1, 1 splits at batch 1, 16, 64, 256 there."""
    steps = max(1, -(-length // positions_per_step(head_dim, groups)))
    by_fill = -(-TARGET_CTAS_PER_SM * num_sms // (batch * kv_heads))
    return max(1, min(MAX_SPLITS, steps, by_fill))


def validate(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None
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
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over cache positions ``0..pos``: q ``[B, H, D]`` -> ``[B, H, D]``.
    ``splits`` overrides the heuristic (tests); ``out`` may be a caller's (poisoned) buffer."""
    from quick.kernels import quick_mma

    b, h, kv, length, d = validate(q, keys, values, pos, mask)
    if q.device.type != "cuda":
        raise AttnError("the decode attention kernel runs on CUDA tensors only")
    if not math.isfinite(scale):
        raise AttnError(f"scale must be finite, got {scale}")
    dev = q.device
    q = q.contiguous()
    if b == 0:
        return torch.empty_like(q)
    groups = h // kv
    s = splits or choose_splits(b, kv, length, d, quick_mma.num_sms(dev), groups)
    if not 1 <= s <= MAX_SPLITS:
        raise AttnError(f"splits must be in [1, {MAX_SPLITS}], got {s}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous() or out.device != dev:
        raise AttnError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {dev}")
    m_ptr, m_stride = 0, 0
    if mask is not None:
        mask = mask.reshape(b, length) if mask.dim() == 4 else mask
        if mask.dtype != q.dtype or mask.stride(-1) != 1:
            mask = mask.to(q.dtype).contiguous()
        m_ptr, m_stride = mask.data_ptr(), mask.stride(0)
    idx = quick_mma._dev_index(dev)
    with torch.cuda.device(dev):
        defines = {"QA_D": d, "QA_G": groups, "QA_DTYPE": DTYPES.index(q.dtype)}
        kern = jit.load_kernel(SOURCE, KERNEL, defines, idx, jit.arch_for_device(idx))
        stream = torch.cuda.current_stream(dev).cuda_stream
        ws = torch.empty(b * kv * s * groups * (d + 2) if s > 1 else 1, dtype=torch.float32, device=dev)
        cnt = quick_mma._counters(dev, b * kv, stream, _COUNTERS)
        kern(
            (s, kv, b),
            (THREADS,),
            [q, keys, values, ctypes.c_void_p(m_ptr), pos, out, ws, cnt, kv, length, m_stride, scale / math.log(2)],
        )
    return out


@torch.library.custom_op("quick::attn_decode", mutates_args=())
def attn_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """:func:`decode_attention` as one opaque op (torch.compile, CUDA graphs)."""
    return decode_attention(q, keys, values, pos, mask, scale)


@attn_decode.register_fake
def _(q, keys, values, pos, mask, scale):
    validate(q, keys, values, pos, mask)
    return q.new_empty(q.shape)
