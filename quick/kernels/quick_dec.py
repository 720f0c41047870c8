"""Decode kernel (M <= 16 tokens) for weights in the ``quick_sm90`` layout: ``csrc/quick_dec.cu``.

The wgmma GEMM (:mod:`quick.kernels.quick_sm90`) is issue-bound at decode sizes; this kernel reads the same packed
weights with a fraction of the instructions per weight (mma.sync with the weight as the A operand, the scale
applied in fp32 after the mma, weights staged by 16-byte cp.async). It runs on sm_80 and newer.
:func:`quick.kernels.quick_sm90.gemm_w4a16_sm90` calls it for ``M <= DEC_MAX_M`` (``quick::gemm_w4a16_sm90`` op).

This module holds the compile variants, the launch plan (channel tiles x k splits), and a cached launcher.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from quick.kernels import jit

SOURCE = "quick_dec.cu"
KERNEL = "quick_dec"
MAX_M = 16  # two n8 token tiles
SMEM_LIMIT = 227 * 1024
ARCHS = ("sm_80", "sm_90a")


class DecError(ValueError):
    """Inputs the decode kernel cannot take; the message says which and why."""


@dataclass(frozen=True)
class DecConfig:
    """``rb`` n16 channel blocks per CTA, ``warps`` warps splitting the CTA's K range, ``stages`` k64 steps of
    weights in flight per warp (cp.async ring)."""

    rb: int = 4
    warps: int = 8
    stages: int = 4

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def supports(self, group_size: int) -> bool:
        """One lane copies one 16-byte chunk of scales/zeros per k64 step: rb x rows-per-step x 4 <= 32."""
        return self.rb * (2 if group_size == 32 else 1) * 4 <= 32

    def ring_bytes(self, group_size: int) -> int:
        gps = 2 if group_size == 32 else 1
        return self.warps * self.stages * (self.rb * 512 + self.rb * gps * 64)

    def smem_bytes(self, m: int, steps_per_split: int, group_size: int) -> int:
        """The weight ring, then x (M rows of the split's K range, row pitch = 16 mod 128) and a zero line."""
        return self.ring_bytes(group_size) + m * (steps_per_split * 128 + 16) + 16

    def defines(self, m: int, group_size: int, dtype: torch.dtype) -> dict[str, int]:
        return {
            "QD_DTYPE": int(dtype == torch.bfloat16),
            "QD_NT": 1 if m <= 8 else 2,
            "QD_RB": self.rb,
            "QD_WARPS": self.warps,
            "QD_STAGES": self.stages,
            "QD_G32": int(group_size == 32),
        }


DEFAULT = DecConfig()
# Candidates timed by scripts/dec_check.py; the launcher's choice is DEFAULT unless a caller passes one.
CANDIDATES = (
    DecConfig(4, 8, 4),
    DecConfig(4, 8, 6),
    DecConfig(2, 8, 6),
    DecConfig(4, 16, 4),
    DecConfig(2, 16, 4),
    DecConfig(8, 8, 3),
)

VARIANTS: list[tuple[str, str, dict[str, int]]] = []
for _cfg in dict.fromkeys((DEFAULT, *CANDIDATES)):
    for _m in (1, 16):
        for _g in (128, 32):
            for _dt in (torch.float16, torch.bfloat16):
                _v = (SOURCE, KERNEL, _cfg.defines(_m, _g, _dt))
                if _cfg.supports(_g) and _v not in VARIANTS:
                    VARIANTS.append(_v)


@dataclass(frozen=True)
class DecPlan:
    config: DecConfig
    n_tiles: int
    splits: int
    steps_per_split: int
    smem: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_tiles, self.splits)


def plan(
    m: int,
    n: int,
    k: int,
    group_size: int,
    num_sms: int,
    config: DecConfig | None = None,
    splits: int | None = None,
    waves: float = 1.0,
) -> DecPlan:
    """Channel tiles x k splits (pure arithmetic, testable without a GPU).

    Splits: the fewest that give ``waves`` x ``num_sms`` CTAs, at least one k64 step per warp, and x of a split
    fitting in shared memory next to the ring. Every split is non-empty."""
    cfg = config or DEFAULT
    if not 1 <= m <= MAX_M:
        raise DecError(f"the decode kernel takes 1 <= M <= {MAX_M} rows, got M={m}")
    if n % (16 * cfg.rb):
        raise DecError(f"N={n} is not a multiple of {16 * cfg.rb} (config {cfg})")
    if not cfg.supports(group_size):
        raise DecError(f"config {cfg} cannot take group size {group_size} (at most 4 channel blocks)")
    nk = k // 64
    n_tiles = n // (16 * cfg.rb)
    if splits is None:
        splits = max(1, math.ceil(waves * num_sms / n_tiles))
        splits = min(splits, max(1, nk // cfg.warps))
    s = max(1, min(splits, nk))
    while True:
        steps = -(-nk // s)
        s = -(-nk // steps)
        smem = cfg.smem_bytes(m, steps, group_size)
        if smem <= SMEM_LIMIT or s >= nk:
            break
        s += 1
    if smem > SMEM_LIMIT:
        raise DecError(f"config {cfg} needs {smem} bytes of shared memory for M={m}, K={k}")
    return DecPlan(cfg, n_tiles, s, steps, smem)


def is_available(device: torch.device) -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        jit.find_nvcc()
    except jit.KernelUnavailable:
        return False
    return True


_LAUNCH: dict[tuple, tuple] = {}
_LOCK = threading.Lock()


def gemv_sm90(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: DecConfig | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W) (+ bias)`` for ``x`` [M <= 16, K] and ``W`` in the ``quick_sm90`` layout."""
    from quick.kernels import quick_mma, quick_sm90

    try:
        m, n, k, g = quick_sm90.validate(x, qweight, scales, zeros, group_size, bias)
    except quick_sm90.Sm90Error as e:
        raise DecError(str(e)) from None
    if x.device.type != "cuda":
        raise DecError("the decode kernel runs on CUDA tensors only")
    if m == 0:
        return x.new_empty((0, n))
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    tensors = {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias}
    for name, t in tensors.items():
        if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
            raise DecError(f"{name} must be contiguous and 16-byte aligned; .contiguous()/.clone() it")
    dev = x.device
    key = (m, n, k, g, x.dtype, dev, config, splits)
    hit = _LAUNCH.get(key)
    if hit is None:
        with _LOCK:
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            p = plan(m, n, k, g, quick_mma.num_sms(dev), config, splits)
            arch = jit.arch_for_device(idx, arch_specific=True)
            kern = jit.load_kernel(SOURCE, KERNEL, p.config.defines(m, g, x.dtype), idx, arch)
            gshift = quick_sm90.group_shift(g, k)
            launch = quick_mma._FastLaunch(
                kern, p.grid, (p.config.threads,), p.smem, [None] * 8 + [m, n, k, gshift, p.steps_per_split]
            )
            hit = (launch, p)
            if len(_LAUNCH) > 4096:
                _LAUNCH.clear()
            _LAUNCH[key] = hit
    launch, p = hit
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=dev)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or not out.is_contiguous() or out.device != dev:
        raise DecError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {dev}")
    stream = torch.cuda.current_stream(dev).cuda_stream
    ws_ptr = cnt_ptr = 0
    if p.splits > 1:
        ws = torch.empty((p.splits, m, n), dtype=torch.float32, device=dev)
        cnt = quick_mma._counters(dev, p.n_tiles, stream, _COUNTERS)
        ws_ptr, cnt_ptr = ws.data_ptr(), cnt.data_ptr()
    bptr = bias.data_ptr() if bias is not None else 0
    launch(
        [x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bptr, out.data_ptr(), ws_ptr, cnt_ptr],
        stream,
    )
    return out


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
