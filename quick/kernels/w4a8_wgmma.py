"""Hopper (sm_90a) W4A8 kernel: ``wgmma`` s8 with the interleaved int4 weights as the register A operand.

``y[M, N] = s_x[m] * s_ch[n] * sum_k x_q[m, k] * q[n, k] (* s_g[k // 128, n]) (+ bias)``, the number format of
:mod:`quick.formats.w4a8`, for weights packed in layout ``w4a8_sm90`` (:class:`quick.formats.layouts.
W4A8Sm90Layout`). ``csrc/quick_w4a8_sm90.cu`` holds two kernels: the per-row activation quantization
(``x -> x_q int8, s_x fp32``) and the GEMM (transposed product: weights = wgmma A from registers, converted
int4 -> int8 in registers; ``x_q`` = wgmma B by TMA; int32 accumulation; scales in the epilogue).

This module: validation, the TMA map, tile/split-k plan, compile variants (``VARIANTS``), the op
``quick::gemm_w4a8_sm90`` (fake impl for torch.compile) and the dispatcher entry for layout ``w4a8_sm90``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from quick.formats.w4a8 import SUPPORTED_W4A8_GROUPS, WIDEN_GROUP_SCALE_MAX, widens_to_int8
from quick.formats.weights import SUPPORTED_DTYPES
from quick.kernels import jit
from quick.kernels.wgmma import (
    LaunchPlan,
    WarpgroupTile,
    _counters,
    build_plan,
    check_x_qweight,
    encode_rowmajor_map,
    is_available,
    num_sms,
)

SOURCE = "quick_w4a8_sm90.cu"
KERNEL = "quick_w4a8_sm90_gemm"
LAYOUT = "w4a8_sm90"
ARCHS = ("sm_90a",)
TOKEN_TILES = (8, 16, 32, 64, 128, 256)  # wgmma N values instantiated in the kernel
GROUP_TILES = (8, 16, 32, 64, 128)  # per group, 256 tokens spill (a partial set next to the accumulators)
BK = 128  # k per pipeline step (one TMA stage, one weight row-block, one scale group)
SMEM_LIMIT = 227 * 1024


class W4A8Sm90Error(ValueError):
    """Inputs the sm_90 W4A8 kernel cannot take (shape, dtype, device, layout); the message says which and why."""


@dataclass(frozen=True)
class W4A8Sm90Config(WarpgroupTile):
    """One compiled variant (:class:`~quick.kernels.wgmma.WarpgroupTile`: ``nt``, ``nwg``, ``stages`` of ``x_q``,
    k128 x nt bytes each): ``pref`` k128 steps of weights in flight (ring depth, or steps per load group), ``pipe``
    the weight pipeline (0 ring; 1 ping-pong load groups; 2 the same with ld.relaxed.gpu loads, which ptxas keeps
    at the group boundary: the sm90 W4A16 kernel's decode winner; 3 the producer bulk-copies the weights into the
    shared-memory stages next to x, consumers read them with LDS.128: weight latency hidden by the whole TMA
    pipeline depth, no ring registers; ``pref`` unused)."""

    pref: int = 4
    pipe: int = 0
    order: int = 0  # two consumer warpgroups issue their wgmmas in turn (QW_ORDER)
    q1: int = 0  # per group: int8 weights q instead of 16 q (QW_Q1: no shift in the per-group fold)
    # per group with every s_g <= 16 (QW_WIDEN): weights widened to the int8 q * s_g in registers, one int32
    # accumulator for all groups (QQQ's design): no per-group partials, fold or wgmma drain per k128 step.
    widen: int = 0

    def smem_bytes(self, group_size: int = -1) -> int:
        """Dynamic shared memory: alignment slack, x stages (+ weight stages for pipe 3), epilogue staging,
        mbarriers and flags."""
        return self._smem(self.nwg * (4096 + (64 if group_size > 0 else 0)) if self.pipe == 3 else 0)

    def defines(self, group_size: int, dtype: torch.dtype) -> dict[str, int]:
        return {
            **self._tile_defines("QW_"),
            "QW_PREF": self.pref,
            "QW_GROUP": int(group_size > 0),
            "QW_BF16": int(dtype == torch.bfloat16),
            "QW_PIPE": self.pipe,
            "QW_ORDER": self.order,
            "QW_Q1": self.q1,
            "QW_WIDEN": self.widen,
        }


# Pipeline 0 (weights global -> registers, ring of `pref` k128 steps) per token tile: x stages that fit shared
# memory, the ring depth that fits the registers without spills (-Xptxas -v; compile_check keeps it so).
RING = {
    nt: W4A8Sm90Config(nt, 2, st, pf)
    for nt, st, pf in ((8, 8, 4), (16, 8, 4), (32, 8, 4), (64, 8, 4), (128, 6, 4), (256, 4, 2))
}
# Pipeline 3 (weights bulk-copied into the shared-memory stages next to x): stages that fit 227 KB next to the
# epilogue staging. H100, K = N = 8192: M = 4096 358 us per-channel (ring 397), 604 us g128 (ring 772);
# M = 1024 97 / 157 us (ring 101 / 204).
SMEMW = {
    nt: W4A8Sm90Config(nt, 2, st, 1, pipe=3) for nt, st in ((8, 12), (16, 12), (32, 10), (64, 8), (128, 6), (256, 3))
}
# Ordered issue (ping-pong turns of the two consumer warpgroups), for the tiles where the per-group fold and the
# conversion compete with the tensor cores.
ORDERED = {nt: W4A8Sm90Config(nt, 2, st, 1, pipe=3, order=1) for nt, st in ((64, 8), (128, 6), (256, 3))}
# Per group, ordered and with q (not 16 q) weights: the fold is one IMAD per accumulator.
ORDERED_Q1 = {nt: W4A8Sm90Config(nt, 2, st, 1, pipe=3, order=1, q1=1) for nt, st in ((64, 8), (128, 6))}
# Per group with s_g <= 16 (what the quantizers write): the per-channel pipelines with the weights widened to
# q * s_g in registers; no partial set, so every token tile up to 256 fits.
WIDEN_SMEMW = {nt: replace(c, widen=1) for nt, c in SMEMW.items()}
WIDEN_RING = {nt: replace(c, widen=1) for nt, c in RING.items()}
WIDEN_ORDERED = {nt: replace(c, widen=1) for nt, c in ORDERED.items()}


def token_tiles(group_size: int, widen: bool = False) -> tuple[int, ...]:
    """Token tiles a weight format can take: per group with a partial set (no widening) stops at 128."""
    return GROUP_TILES if group_size > 0 and not widen else TOKEN_TILES


def default_config(m: int, group_size: int = -1, widen: bool = False) -> W4A8Sm90Config:
    """Pipeline 3 with the smallest token tile that holds M (up to 256; 128 per group without widening)."""
    tiles = token_tiles(group_size, widen)
    nt = next((t for t in tiles if t >= m), tiles[-1])
    return WIDEN_SMEMW[nt] if widen and group_size > 0 else SMEMW[nt]


def candidates(m: int, group_size: int = -1, widen: bool = False) -> list[W4A8Sm90Config]:
    """Configs worth timing for batch size M (the sweep of scripts/w4a8_sm90_check.py)."""
    widen = widen and group_size > 0
    tiles = token_tiles(group_size, widen)
    smemw, ring, ordered = (WIDEN_SMEMW, WIDEN_RING, WIDEN_ORDERED) if widen else (SMEMW, RING, ORDERED)
    d = default_config(m, group_size, widen)
    out = [d, ring[d.nt]]
    if m >= 256:  # the next smaller tile too (more CTAs, less register pressure)
        out += [smemw[t] for t in tiles if t == d.nt // 2]
    if d.nt in ordered:
        out.append(ordered[d.nt])
    if group_size > 0 and not widen and d.nt in ORDERED_Q1:
        out.append(ORDERED_Q1[d.nt])
    return list(dict.fromkeys(out))


# Measured choices per batch size bucket: (max M, config, rounds) as in wgmma.TUNED, from a sweep of
# scripts/w4a8_sm90_check.py (H100, K = N = 8192, fp16, GEMM only, us; docs/w4a8.md). Where
# candidates differed by less than 1 % (ordered issue / q weights at M = 64) the plain default is kept; split
# rounds = 2 was slower than choose_splits at every decode size (None).
TUNED: dict[str, list[tuple[int, W4A8Sm90Config, int | None]]] = {
    "channel": [
        (8, SMEMW[8], None),  # M = 1: 24.0 (ring 25.5)
        (16, SMEMW[16], None),  # M = 16: 24.3 (ring 26.0); M >= 17: model_choice
    ],
    "group": [
        (8, SMEMW[8], None),  # M = 1: 24.6 (ring 28.4)
        (32, SMEMW[16], None),  # M = 16: 24.8 (ring 28.7)
        (128, SMEMW[64], None),  # M = 64: 26.1 (ordered + q 25.9, ring 32.7)
        (2048, SMEMW[128], None),  # M = 256: 43.9 (nt 64: 57.9); M = 1024: 158.9 (ordered 160.8, nt 64: 214.9)
        (1 << 30, ORDERED[128], None),  # M = 4096: 616.5 (plain 643.4, ordered + q 630.6, nt 64: 830.3)
    ],
    # Widened per-group weights (scales <= 16) run the per-channel pipeline plus one IMAD per register. Swept on
    # the H200 (K = N = 8192, GEMM only, us; the fold on the same weights in brackets; larger M in docs/w4a8.md):
    # the per-channel choices won.
    "group_widen": [
        (8, WIDEN_SMEMW[8], None),  # M = 1: 20.6 (ring 25.7) [fold 20.1]
        (16, WIDEN_SMEMW[16], None),  # M = 16: 20.7 (ring 25.9) [20.3]; M >= 17: model_choice below
    ],
}


def tuned_key(group_size: int, widen: bool) -> str:
    return "channel" if group_size < 0 else ("group_widen" if widen else "group")


# Above the decode sizes the token tile and the split-k factor are chosen together by a cost model of one launch,
# fitted (least squares on relative error, 1,000+ timings) to a sweep on the H200 (16 Llama-shape cells,
# M = 32 .. 4096, per-channel and widened g128, every pipeline-3 tile x splits 1..6;
# benchmarks/results/w4a8-plan-sweep-h200-2026-12-04.json):
#   t = rounds * (k128 steps per unit * STEP_US[nt] + ROUND_US) + PARTIAL_US_PER_MB * (MB of int32 partials)
#       + SPLIT_US * (splits > 1)
# (median error 6.5 %; its choice was within 1.8 % of the best measured on average, 21 % at worst). The bucket
# table it replaced lost up to 2x (4096 x 11008, M = 128: 36.3 us against 18.8 for nt = 128 without split-k):
# split-k partials are int32 (twice the output bytes) and every extra token tile re-streams the weights.
PLAN_MODEL_MIN_M = 17  # M <= 16: the measured decode configs of TUNED
STEP_US = {
    "channel": {8: 0.200, 16: 0.211, 32: 0.230, 64: 0.261, 128: 0.355, 256: 0.754},
    "group_widen": {8: 0.286, 16: 0.295, 32: 0.310, 64: 0.331, 128: 0.432, 256: 0.791},
}
ROUND_US, PARTIAL_US_PER_MB, SPLIT_US = 2.63, 0.635, 4.87
MODEL_MAX_SPLITS = 8
# Token tiles per M (past the largest tile's count): the sweep's winners never had more than 4 (each tile re-streams
# the weights), and at M <= 128 the model's 4-tile picks lost on 4096^2 (g128 M = 64 nt = 16 19.7 us against 16.6
# for the bucket table's nt = 64; M = 128 nt = 32 20.2 against 18.9). There one tile holds
# all tokens, as in every sweep winner at M <= 128.
MODEL_MAX_M_TILES = 4


def model_us(m: int, n: int, k: int, sms: int, cfg: W4A8Sm90Config, splits: int, key: str) -> float:
    """Predicted GEMM time (us) of one launch of ``cfg`` with ``splits`` (see the comment above); the tiles,
    the effective split count and the rounds are the launch plan's own (:func:`plan`)."""
    p = plan(m, n, k, sms, cfg, splits)
    t = -(-p.units // sms) * (p.steps_per_split * STEP_US[key][cfg.nt] + ROUND_US)
    if p.splits > 1:
        t += PARTIAL_US_PER_MB * p.splits * p.m_tiles * cfg.nt * n * 4 / 1e6 + SPLIT_US
    return t


def model_choice(m: int, n: int, k: int, sms: int, group_size: int, widen: bool) -> tuple[W4A8Sm90Config, int]:
    """(pipeline-3 config, splits) with the smallest :func:`model_us` (per-channel or widened per-group)."""
    key = tuned_key(group_size, widen)
    smemw = WIDEN_SMEMW if key == "group_widen" else SMEMW
    max_m_tiles = max(MODEL_MAX_M_TILES if m > 128 else 1, -(-m // max(smemw)))
    best = min(
        (model_us(m, n, k, sms, cfg, s, key), nt, s)
        for nt, cfg in smemw.items()
        if -(-m // nt) <= max_m_tiles
        for s in range(1, min(MODEL_MAX_SPLITS, k // BK) + 1)
    )
    return smemw[best[1]], best[2]


def auto_config(
    m: int, n: int, k: int, sms: int, group_size: int, widen: bool
) -> tuple[W4A8Sm90Config, int | None, int | None]:
    """What the op runs without an explicit config: ``(config, splits, rounds)``. Per-channel and widened
    per-group weights above the decode sizes: :func:`model_choice`; otherwise the measured table (TUNED)."""
    if m >= PLAN_MODEL_MIN_M and tuned_key(group_size, widen) in STEP_US:
        cfg, splits = model_choice(m, n, k, sms, group_size, widen)
        return cfg, splits, None
    cfg, rounds = tuned_config(m, group_size, widen)
    return cfg, None, rounds


def _all_configs(group_size: int) -> list[W4A8Sm90Config]:
    """Every variant the compile check builds and the GPU tests run for a group size (widened ones included)."""
    ok = (lambda c: c.widen or c.nt in GROUP_TILES) if group_size > 0 else (lambda c: True)
    cfgs = [*RING.values(), *SMEMW.values(), *ORDERED.values()]
    if group_size > 0:
        cfgs += [*ORDERED_Q1.values(), *WIDEN_SMEMW.values(), *WIDEN_RING.values(), *WIDEN_ORDERED.values()]
    return [c for c in dict.fromkeys(cfgs) if ok(c)]


CONFIGS: dict[int, list[W4A8Sm90Config]] = {g: _all_configs(g) for g in SUPPORTED_W4A8_GROUPS}

VARIANTS: list[tuple[str, str, dict[str, int]]] = [
    (SOURCE, KERNEL, cfg.defines(g, dt))
    for g in SUPPORTED_W4A8_GROUPS
    for cfg in CONFIGS[g]
    for dt in (torch.float16, torch.bfloat16)
]


def plan(
    m: int, n: int, k: int, sms: int, config: W4A8Sm90Config | None = None, splits: int | None = None,
    group_size: int = -1, rounds: int | None = None,
) -> LaunchPlan:  # fmt: skip
    """Tiles, split-k and grid for one problem (pure arithmetic, testable without a GPU). choose_splits counts
    steps with a fixed cost per unit: a k128 step is about two k64 steps, so the cost is 2 of them."""
    cfg = config or default_config(m, group_size)
    return build_plan(m, n, k // BK, sms, cfg, splits, rounds, unit_overhead=2.0)


def validate(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None = None,
) -> tuple[int, int, int]:  # fmt: skip
    """Check everything the kernel assumes; returns ``(M, N, K)``. Raises :class:`W4A8Sm90Error`."""
    m, k = check_x_qweight(x, qweight, W4A8Sm90Error, "[K/128, 16N] (layout w4a8_sm90)")
    if channel_scale.dim() != 1 or channel_scale.dtype != torch.float32:
        raise W4A8Sm90Error(
            f"channel_scale must be float32 [N], got {channel_scale.dtype} {tuple(channel_scale.shape)}"
        )
    n = channel_scale.shape[0]
    if k % BK or n % 64 or k == 0 or n == 0:
        raise W4A8Sm90Error(f"the sm_90 W4A8 kernel needs K a multiple of 128 and N of 64, got K={k}, N={n}")
    if tuple(qweight.shape) != (k // BK, 16 * n):
        raise W4A8Sm90Error(f"qweight has shape {tuple(qweight.shape)}, expected {(k // BK, 16 * n)} for K={k}, N={n}")
    if group_size not in SUPPORTED_W4A8_GROUPS:
        raise W4A8Sm90Error(f"group_size must be one of {SUPPORTED_W4A8_GROUPS}, got {group_size}")
    if group_size > 0:
        if group_scale is None:
            raise W4A8Sm90Error(f"group_size {group_size} needs group_scale int8 [{k // group_size}, {n}]")
        if group_scale.dtype != torch.int8 or tuple(group_scale.shape) != (k // group_size, n):
            raise W4A8Sm90Error(
                f"group_scale must be int8 {(k // group_size, n)}, got {group_scale.dtype} {tuple(group_scale.shape)}"
            )
    elif group_scale is not None:
        raise W4A8Sm90Error("per-channel weights (group_size=-1) take no group_scale")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise W4A8Sm90Error(f"bias must be [{n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    tensors = [x, qweight, channel_scale] + [t for t in (group_scale, bias) if t is not None]
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise W4A8Sm90Error(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return m, n, k


# ------------------------------------------------------------------------------ TMA descriptor (driver, ctypes)


def encode_xq_map(xq: Tensor, nt: int):
    """Tensor map of ``x_q`` [M, K] int8 (row-major): boxes of 128 k x ``nt`` tokens, 128-byte swizzle (the
    K-major SW128 operand layout of the wgmma descriptor), rows past M read as zeros."""
    if xq.data_ptr() % 16 or xq.stride(0) % 16 or xq.stride(1) != 1:
        raise W4A8Sm90Error("x_q must be 16-byte aligned with unit column stride and a row stride of a multiple of 16")
    return encode_rowmajor_map(xq, 1, BK, nt)


# ------------------------------------------------------------------------------ launch


def quantize_activations_sm90(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int8 of ``x`` [M, K] on the GPU (``csrc/quick_actquant.cu``, shared with the sm_80 W4A8 kernel),
    bit-identical to ``w4a8.quantize_activations`` on the same CUDA tensor."""
    from quick.kernels import w4a8_mma

    if x.dim() != 2 or x.dtype not in SUPPORTED_DTYPES or not x.is_cuda:
        raise W4A8Sm90Error(f"x must be a 2-D float16/bfloat16 CUDA tensor, got {x.dtype} {tuple(x.shape)} {x.device}")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return w4a8_mma.quantize_activations_cuda(x)


def tuned_config(m: int, group_size: int, widen: bool = False) -> tuple[W4A8Sm90Config, int | None]:
    for bound, cfg, rounds in TUNED[tuned_key(group_size, widen)]:
        if m <= bound:
            return cfg, rounds
    return default_config(m, group_size, widen), None


def gemm_w4a8_sm90_q(
    xq: Tensor,
    sx: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    group_size: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: W4A8Sm90Config | None = None,
    splits: int | None = None,
    out: Tensor | None = None,
    rounds: int | None = None,
    widen: bool = False,
) -> Tensor:
    """The GEMM on already quantized activations (``xq`` int8 [M, K], ``sx`` fp32 [M]); [M, N] in out_dtype.

    ``widen``: the caller vouches that every group scale is <= 16 (``w4a8.widens_to_int8``), which lets
    the widened variants run; a widened ``config`` without it is refused (it would compute wrong sums)."""
    m, k = xq.shape
    n = channel_scale.shape[0]
    dev = xq.device
    widen = bool(widen) and group_size > 0
    cfg = config
    if cfg is None:
        cfg, auto_splits, rounds = auto_config(m, n, k, num_sms(dev), group_size, widen)
        splits = auto_splits if splits is None else splits
    if group_size > 0 and cfg.widen and not widen:
        raise W4A8Sm90Error(
            f"config {cfg} widens q * s_g to int8, which needs every group scale <= {WIDEN_GROUP_SCALE_MAX}"
        )
    if group_size > 0 and cfg.nt not in token_tiles(group_size, bool(cfg.widen)):
        raise W4A8Sm90Error(f"per-group weights without widening take token tiles {GROUP_TILES}, got {cfg.nt}")
    smem = cfg.smem_bytes(group_size)
    if smem > SMEM_LIMIT:
        raise W4A8Sm90Error(f"config {cfg} needs {smem} bytes of shared memory (limit {SMEM_LIMIT})")
    p = plan(m, n, k, num_sms(dev), cfg, splits, group_size, rounds)
    with torch.cuda.device(dev):
        kern = jit.load_kernel(SOURCE, KERNEL, cfg.defines(group_size, out_dtype), dev.index, "sm_90a")
        out = jit.out_buffer(out, m, n, out_dtype, dev, W4A8Sm90Error)
        ws = torch.empty(max(p.workspace_elems(), 1), dtype=torch.int32, device=dev)
        cnt = _counters(dev, p.counters())
        _buf, desc = encode_xq_map(xq, cfg.nt)
        null = ctypes.c_void_p(0)
        kern(
            (p.grid,),
            (cfg.threads(),),
            [
                desc,
                qweight,
                channel_scale,
                group_scale if group_scale is not None else null,
                sx,
                bias if bias is not None else null,
                out,
                ws,
                cnt,
                m,
                n,
                k,
                p.splits,
                p.steps_per_split,
                p.n_tiles,
                p.m_tiles,
            ],
            smem=smem,
        )
    return out


def gemm_w4a8_sm90(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None = None, config: W4A8Sm90Config | None = None, splits: int | None = None,
    out: Tensor | None = None, widen: bool | None = None,
) -> Tensor:  # fmt: skip
    """``y = W4A8(x)`` (activation quantization + GEMM) with weights in layout ``w4a8_sm90``; [M, N] in x's dtype.

    ``config``/``splits`` override the tuned choice (benchmarks, tests); ``out`` lets tests hand in a poisoned
    buffer. ``widen``: whether every group scale is <= 16 (the widened kernels then apply); ``None`` reads the
    scales (one device sync: layers pass the flag they computed at load time instead).
    """
    m, n, k = validate(x, qweight, channel_scale, group_scale, group_size, bias)
    if x.device.type != "cuda":
        raise W4A8Sm90Error("the sm_90 W4A8 kernel runs on CUDA tensors only")
    if m == 0:
        return x.new_empty((0, n))
    qweight, channel_scale = qweight.contiguous(), channel_scale.contiguous()
    group_scale = group_scale.contiguous() if group_scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    if widen is None:
        widen = group_size > 0 and widens_to_int8(group_scale)
    xq, sx = quantize_activations_sm90(x)
    return gemm_w4a8_sm90_q(
        xq, sx, qweight, channel_scale, group_scale, group_size, bias, x.dtype, config, splits, out, widen=widen
    )


def takes_input(x: Tensor) -> bool:
    """Whether this layout's kernel can take ``x`` on its device (the dispatcher's availability check)."""
    return isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES and is_available(x.device)
