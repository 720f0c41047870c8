"""Decode kernel (M <= 16 tokens) for weights in the ``quick_sm90`` or the ``quick`` layout: ``csrc/quick_dec.cu``.

The wgmma GEMM (:mod:`quick.kernels.quick_sm90`) is issue-bound at decode sizes; this kernel reads the same packed
weights with a fraction of the instructions per weight (mma.sync with the weight as the A operand for
``quick_sm90``, the B operand for ``quick``; the scale applied in fp32 after the mma; weights staged by 16-byte
cp.async). It runs on sm_80 and newer. :func:`quick.kernels.quick_sm90.gemm_w4a16_sm90` calls it for
``M <= DEC_MAX_M`` (``quick::gemm_w4a16_sm90`` op), :func:`quick.kernels.quick_mma.quick_matmul` for
``M <= DEC_QUICK_MAX_M``.

This module holds the compile variants, the launch plan (channel tiles x k splits), and a cached launcher.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from quick.kernels import jit

SOURCE = "quick_dec.cu"
LAYOUTS = ("quick_sm90", "quick")  # index = QD_WB: the weight is the mma A operand (0) or the B operand (1)
KERNEL = "quick_dec"
MAX_M = 16  # two n8 token tiles
SMEM_LIMIT = 227 * 1024
ARCHS = ("sm_80", "sm_90a")


class DecError(ValueError):
    """Inputs the decode kernel cannot take; the message says which and why."""


@dataclass(frozen=True)
class DecConfig:
    """``rb`` channel blocks per CTA (16 channels for ``quick_sm90``, 64 for ``quick``), ``warps`` warps splitting
    the CTA's K range, ``stages`` k64 steps of weights in flight per warp (cp.async ring), ``wb`` = 1 for the
    ``quick`` layout (weight = B operand)."""

    rb: int = 4
    warps: int = 8
    stages: int = 4
    wb: int = 0

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def channels(self) -> int:
        return self.rb * (64 if self.wb else 16)

    def supports(self, group_size: int) -> bool:
        """One lane copies one 16-byte chunk of scales/zeros per k64 step: channels x 4 bytes x rows <= 512."""
        return self.channels * 4 * (2 if group_size == 32 else 1) <= 512

    def ring_bytes(self, group_size: int) -> int:
        gps = 2 if group_size == 32 else 1
        return self.warps * self.stages * (self.channels * 32 + self.channels * 4 * gps)

    def smem_bytes(self, m: int, steps_per_split: int, group_size: int) -> int:
        """The weight ring, then x (M rows of the split's K range, row pitch = 16 mod 128) and a zero line."""
        return self.ring_bytes(group_size) + m * (steps_per_split * 128 + 16) + 16

    def defines(self, m: int, group_size: int, dtype: torch.dtype) -> dict[str, int]:
        return {
            "QD_WB": self.wb,
            "QD_DTYPE": int(dtype == torch.bfloat16),
            "QD_NT": 1 if m <= 8 or self.wb else 2,
            "QD_RB": self.rb,
            "QD_WARPS": self.warps,
            "QD_STAGES": self.stages,
            "QD_G32": int(group_size == 32),
        }


DEFAULTS = {"quick_sm90": DecConfig(4, 8, 4), "quick": DecConfig(1, 8, 4, wb=1)}
DEFAULT = DEFAULTS["quick_sm90"]
# Candidates timed by scripts/dec_check.py; the launcher's choice is DEFAULTS[layout] unless a caller passes one.
CANDIDATES = {
    "quick_sm90": (
        DecConfig(4, 8, 4),
        DecConfig(4, 8, 6),
        DecConfig(2, 8, 6),
        DecConfig(4, 16, 4),
        DecConfig(2, 16, 4),
        DecConfig(8, 8, 3),
    ),
    "quick": (DecConfig(1, 8, 4, wb=1), DecConfig(1, 8, 6, wb=1), DecConfig(1, 16, 4, wb=1), DecConfig(2, 8, 3, wb=1)),
}

VARIANTS: list[tuple[str, str, dict[str, int]]] = []
for _cfg in dict.fromkeys((*DEFAULTS.values(), *CANDIDATES["quick_sm90"], *CANDIDATES["quick"])):
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
    if n % cfg.channels:
        raise DecError(f"N={n} is not a multiple of {cfg.channels} (config {cfg})")
    if not cfg.supports(group_size):
        raise DecError(f"config {cfg} cannot take group size {group_size} (too many channels per CTA)")
    nk = k // 64
    n_tiles = n // cfg.channels
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


_LAUNCH: dict[tuple, tuple] = {}
_LOCK = threading.Lock()
_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _prepare(layout: str, x, qweight, scales, zeros, group_size, bias) -> tuple[torch.Tensor, int, int, int, int]:
    """The layout's own validation (its exception types and messages), then what the launch assumes: CUDA tensors,
    contiguous and 16-byte aligned (x is copied to dense rows if it is not). Returns ``(x, M, N, K, G)``."""
    from quick.kernels import quick_mma, quick_sm90

    if layout == "quick_sm90":
        m, n, k, g = quick_sm90.validate(x, qweight, scales, zeros, group_size, bias)
        if x.device.type != "cuda":
            raise DecError("the decode kernel runs on CUDA tensors only")
        for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
            if t is not None:
                quick_mma._check_tensor(name, t, x.device, DecError)
        return quick_mma._dense_rows(x), m, n, k, g
    if isinstance(x, torch.Tensor) and x.device.type != "cuda":
        raise DecError("the decode kernel runs on CUDA tensors only")
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        x = quick_mma._dense_rows(x)
    m, k, n, g = quick_mma._prepare(x, qweight, scales, zeros, group_size, bias)  # shapes cached per signature
    return x, m, n, k, g


def gemv(
    layout: str,
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
    """``x @ dequant(W) (+ bias)`` for ``x`` [M <= 16, K] and ``W`` packed in ``layout`` (``quick_sm90``/``quick``)."""
    if layout not in LAYOUTS:
        raise DecError(f"the decode kernel takes layouts {LAYOUTS}, got {layout!r}")
    x, m, n, k, g = _prepare(layout, x, qweight, scales, zeros, group_size, bias)
    return run_validated(layout, x, qweight, scales, zeros, bias, m, n, k, g, config, splits, out)


def run_validated(
    layout: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    n: int,
    k: int,
    g: int,
    config: DecConfig | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launch, for callers that have validated already (:func:`gemv`, ``gemm_w4a16_sm90``): CUDA tensors,
    contiguous and 16-byte aligned, shapes ``(M, N, K, G)`` checked for ``layout``."""
    from quick.kernels import quick_mma, quick_sm90

    if m == 0:
        return x.new_empty((0, n))
    if config is not None and config.wb != LAYOUTS.index(layout):
        raise DecError(f"config {config} is for layout {LAYOUTS[config.wb]!r}, not {layout!r}")
    dev = x.device
    key = (layout, m, n, k, g, x.dtype, dev, config, splits)
    hit = _LAUNCH.get(key)
    if hit is None:
        with _LOCK:
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            p = plan(m, n, k, g, quick_mma.num_sms(dev), config or DEFAULTS[layout], splits)
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


def gemv_sm90(x, qweight, scales, zeros, group_size, bias=None, config=None, splits=None, out=None) -> torch.Tensor:
    """:func:`gemv` for the ``quick_sm90`` layout."""
    return gemv("quick_sm90", x, qweight, scales, zeros, group_size, bias, config, splits, out)


def gemv_quick(x, qweight, scales, zeros, group_size, bias=None, config=None, splits=None, out=None) -> torch.Tensor:
    """:func:`gemv` for the paper's ``quick`` layout."""
    return gemv("quick", x, qweight, scales, zeros, group_size, bias, config, splits, out)
