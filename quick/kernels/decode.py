"""Decode kernel for weights in the ``quick_sm90`` (M <= 64 tokens) or the ``quick`` layout (M <= 16):
``csrc/quick_dec.cu``.

The wgmma GEMM (:mod:`quick.kernels.wgmma`) is issue-bound at decode sizes; this kernel reads the same packed
weights with a fraction of the instructions per weight (mma.sync with the weight as the A operand for
``quick_sm90``, the B operand for ``quick``; the scale applied in fp32 after the mma; weights staged by 16-byte
cp.async). It runs on sm_80 and newer; :mod:`quick.kernels.select` chooses it (``dec``) for either layout.

This module holds the compile variants, the launch plan (channel tiles x k splits), and a cached launcher.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from quick import settings
from quick.kernels import jit, mma, wgmma

SOURCE = "quick_dec.cu"
LAYOUTS = ("quick_sm90", "quick")  # index = QD_WB: the weight is the mma A operand (0) or the B operand (1)
KERNEL = "quick_dec"
MAX_M_BY_LAYOUT = {"quick_sm90": 64, "quick": 16}  # tokens on the n8 side (up to 8 tiles) / in one m16 tile
MAX_M = max(MAX_M_BY_LAYOUT.values())
SMEM_LIMIT = 227 * 1024 - 1024  # dynamic shared memory on sm_90 (227 KB opt-in), less room for the static part
ARCHS = ("sm_80", "sm_90a")


def variant_archs(defines: dict) -> tuple[str, ...]:
    """The archs a variant is built for (compile check): the act / norm / PDL variants are launched only through the
    ``quick_sm90`` routes (and PDL needs sm_90), so sm_90 only."""
    return ("sm_90a",) if any(defines.get(f) for f in ("QD_ACT", "QD_NORM", "QD_PDL")) else ARCHS


class DecError(ValueError):
    """Inputs the decode kernel cannot take; the message says which and why."""


def token_tiles(m: int, wb: int = 0) -> int:
    """n8 token tiles of the A-side kernel for M tokens (1, 2, 4 or 8); the B-side holds all 16 in its m16 tile."""
    return 1 if wb else 1 << max(0, math.ceil(math.log2(max(m, 1) / 8)))


@dataclass(frozen=True)
class DecConfig:
    """``rb`` channel blocks per warp (16 channels for ``quick_sm90``, 64 for ``quick``), ``warps`` warps splitting
    the CTA's K range, ``stages`` k64 steps of weights in flight per warp (cp.async ring), ``wb`` = 1 for the
    ``quick`` layout (weight = B operand), ``nw`` groups of ``warps`` warps side by side over channels (a CTA owns
    ``nw x rb`` blocks: more channels share the x held in shared memory, for M = 32/64)."""

    rb: int = 4
    warps: int = 8
    stages: int = 4
    wb: int = 0
    nw: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.warps * self.nw

    @property
    def warp_channels(self) -> int:
        return self.rb * (64 if self.wb else 16)

    @property
    def channels(self) -> int:
        """Channels per CTA."""
        return self.nw * self.warp_channels

    def supports(self, group_size: int) -> bool:
        """One lane copies one 16-byte chunk of scales/zeros per k64 step: a warp's channels x 4 B x rows <= 512."""
        return self.warp_channels * 4 * (2 if group_size == 32 else 1) <= 512

    def ring_bytes(self, group_size: int) -> int:
        gps = 2 if group_size == 32 else 1
        return self.warps * self.nw * self.stages * self.warp_channels * (32 + 4 * gps)

    def smem_bytes(self, m: int, steps_per_split: int, group_size: int) -> int:
        """The weight ring, then x (M rows of the split's K range, row pitch = 16 mod 128); at least the k-slice
        reduction's fp32 buffer, which reuses the same memory afterwards."""
        nacc = 8 if self.wb else token_tiles(m)
        red = self.warps * self.nw * self.rb * nacc * 512
        return max(self.ring_bytes(group_size) + m * (steps_per_split * 128 + 16), red)

    def defines(
        self, m: int, group_size: int, dtype: torch.dtype, act: int = 0, norm: int = 0, pdl: int = 0
    ) -> dict[str, int]:
        d = {
            "QD_WB": self.wb,
            "QD_DTYPE": int(dtype == torch.bfloat16),
            "QD_NT": token_tiles(m, self.wb),
            "QD_RB": self.rb,
            "QD_WARPS": self.warps,
            "QD_STAGES": self.stages,
            "QD_G32": int(group_size == 32),
        }
        if self.nw != 1:  # the original variants keep their defines (and cache keys)
            d["QD_NW"] = self.nw
        if act:
            d["QD_ACT"] = act
        if norm:
            d["QD_NORM"] = 1
        if pdl:
            d["QD_PDL"] = 1
        return d


# Per layout: (largest M, config) buckets, smallest first. The launcher's choice is the bucket's default unless a
# caller passes a config; the candidates are what scripts/dec_check.py times (and the compile check builds) per bucket.
DEFAULTS: dict[str, tuple[tuple[int, DecConfig], ...]] = {
    "quick_sm90": ((16, DecConfig(4, 8, 4)), (32, DecConfig(4, 2, 4, nw=4)), (64, DecConfig(2, 1, 4, nw=8))),
    "quick": ((16, DecConfig(1, 8, 4, wb=1)),),
}
CANDIDATES: dict[str, dict[int, tuple[DecConfig, ...]]] = {
    "quick_sm90": {
        16: (
            DecConfig(4, 8, 4),
            DecConfig(4, 8, 6),
            DecConfig(2, 8, 6),
            DecConfig(4, 16, 4),
            DecConfig(2, 16, 4),
            DecConfig(8, 8, 3),
        ),
        32: (DecConfig(4, 2, 4, nw=4), DecConfig(2, 2, 4, nw=4), DecConfig(4, 1, 4, nw=8), DecConfig(2, 4, 4, nw=2)),
        64: (DecConfig(2, 1, 4, nw=8), DecConfig(2, 2, 4, nw=4), DecConfig(2, 1, 3, nw=8), DecConfig(1, 1, 4, nw=8)),
    },
    "quick": {
        16: (DecConfig(1, 8, 4, wb=1), DecConfig(1, 8, 6, wb=1), DecConfig(1, 16, 4, wb=1), DecConfig(2, 8, 3, wb=1)),
    },
}


def bucket(layout: str, m: int) -> int:
    """The smallest M bucket of ``layout`` that holds ``m`` tokens."""
    for top, _cfg in DEFAULTS[layout]:
        if m <= top:
            return top
    raise DecError(f"the decode kernel takes 1 <= M <= {MAX_M_BY_LAYOUT[layout]} rows for {layout!r}, got M={m}")


def default_config(layout: str, m: int) -> DecConfig:
    """The default config for ``m`` tokens of ``layout``."""
    return dict(DEFAULTS[layout])[bucket(layout, m)]


def takes(layout: str, m: int, n: int) -> bool:
    """Whether the automatic routes can send ``m`` x ``n`` to this kernel with its default config (else they keep
    their GEMM): M within the layout's limit and N a multiple of the default config's channels per CTA."""
    return 1 <= m <= MAX_M_BY_LAYOUT[layout] and fits(default_config(layout, m), m, n)


def fits(config: DecConfig, m: int, n: int) -> bool:
    """Whether ``config`` can take ``m`` x ``n`` (M within its layout's limit, N a multiple of its channels)."""
    return 1 <= m <= MAX_M_BY_LAYOUT[LAYOUTS[config.wb]] and n % config.channels == 0


def all_configs(layout: str | None = None) -> list[tuple[int, DecConfig]]:
    """Every (bucket, config) that is a default or a candidate, defaults first, for ``layout`` or both layouts."""
    out: dict[tuple[int, DecConfig], None] = {}
    for lay in (layout,) if layout else LAYOUTS:
        out.update(dict.fromkeys(DEFAULTS[lay]))
        for top, cfgs in CANDIDATES[lay].items():
            out.update(dict.fromkeys((top, c) for c in cfgs))
    return list(out)


VARIANTS: list[tuple[str, str, dict[str, int]]] = []
for _top, _cfg in all_configs():
    for _m in (1, 16) if _top == 16 else (_top,):  # one variant per token-tile count of the bucket
        for _g in (128, 32):
            for _dt in (torch.float16, torch.bfloat16):
                _v = (SOURCE, KERNEL, _cfg.defines(_m, _g, _dt))
                if _cfg.supports(_g) and _v not in VARIANTS:
                    VARIANTS.append(_v)


# ---- the gated-MLP down projection: x = act(gate) * up staged by the kernel itself (QD_ACT)

ACTS = {"silu": 1, "gelu_tanh": 2}  # the activations of a gated MLP the kernel multiplies in (QD_ACT)
ACT_MAX_M = 8  # one n8 token tile
ACT_GROUP_SIZES = (128,)  # the variants built (and compile-checked); other group sizes take the two steps


def gated(gate: Tensor, up: Tensor, act: str = "silu") -> Tensor:
    """``act(gate) * up``: SwiGLU (``silu``) or GeGLU (``gelu_tanh``), the math ``QD_ACT`` does in the kernel."""
    if act not in ACTS:
        raise DecError(f"gate activation must be one of {sorted(ACTS)}, got {act!r}")
    f = torch.nn.functional
    return (f.silu(gate) if act == "silu" else f.gelu(gate, approximate="tanh")) * up


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """transformers' RMSNorm arithmetic, which ``QD_NORM`` does in the kernel. ``offset == 0`` (Llama and most):
    normalise in fp32, cast back, then multiply by the weight; otherwise (Gemma: ``1 + weight``): multiply by
    ``offset + weight`` in fp32, then cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * h.to(x.dtype)
    return (h * (offset + weight.float())).to(x.dtype)


def act_fusion_enabled() -> bool:
    """Whether gated-MLP down projections stage ``act(gate) * up`` in the decode kernel (the ``act`` fusion)."""
    return settings.fusion_enabled("act")


def launch_config(layout: str, m: int, config: DecConfig | None) -> DecConfig:
    """The config a launch of ``m`` tokens uses: the caller's, else the bucket's default."""
    return config or default_config(layout, m)


def takes_act(config: DecConfig, m: int, group_size: int) -> bool:
    """Whether a ``QD_ACT`` variant exists for this config (a bucket-16 ``quick_sm90`` config), M and group size."""
    return config.wb == 0 and 1 <= m <= ACT_MAX_M and group_size in ACT_GROUP_SIZES and config in ACT_CONFIGS


def takes_norm(config: DecConfig, m: int, group_size: int) -> bool:
    """Whether a ``QD_NORM`` variant (the residual add + RMSNorm tail) exists: the same configs, M and group sizes as
    ``QD_ACT`` (:func:`takes_act`)."""
    return takes_act(config, m, group_size)


def norm_fusion_enabled() -> bool:
    """Whether the o and down projections of the fast decode step end with the residual add + RMSNorm (``QD_NORM``,
    the ``norm`` fusion)."""
    return settings.fusion_enabled("norm")


# The act / norm / PDL variants: the bucket-16 configs of quick_sm90 at one token tile, group size 128, both dtypes;
# act(gate) * up alone, the norm tail alone (o projection), and both (down projection); each of these and the
# plain kernel again as a programmatic dependent launch (QD_PDL, :func:`quick.kernels.jit.pdl_enabled`).
ACT_CONFIGS = frozenset(c for top, c in all_configs("quick_sm90") if top == 16)
FUSED_FLAGS = [(a, 0) for a in ACTS.values()] + [(0, 1)] + [(a, 1) for a in ACTS.values()]
for _cfg in sorted(ACT_CONFIGS, key=repr):
    for _g in ACT_GROUP_SIZES:
        for _dt in (torch.float16, torch.bfloat16):
            for _p in (0, 1):
                for _a, _n in FUSED_FLAGS if not _p else [(0, 0), *FUSED_FLAGS]:
                    if _cfg.supports(_g):
                        VARIANTS.append((SOURCE, KERNEL, _cfg.defines(1, _g, _dt, _a, _n, _p)))


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


# CTAs per SM the default split count aims for: 0.7, measured (H200, scripts/dec_check.py over 8 layer shapes at
# M <= 16): a full wave (1.0) split more than it paid for (8192^2 M = 1: 2 splits 21.4 us, 1 split 18.5;
# 4096^2: 3 splits 12.0, 2 splits 10.8); summed over the shapes the default configs took 652 us at 0.7 against 688
# at 1.0 (quick_sm90) and 687 against 736 (quick), the best of every timed split being 626 and 665.
PLAN_WAVES = 0.7


def plan(
    m: int, n: int, k: int, group_size: int, num_sms: int, config: DecConfig | None = None, splits: int | None = None,
    waves: float = PLAN_WAVES, smem_limit: int = SMEM_LIMIT,
) -> DecPlan:  # fmt: skip
    """Channel tiles x k splits (pure arithmetic, testable without a GPU).

    Splits: the fewest that give ``waves`` x ``num_sms`` CTAs, at least one k64 step per warp, and x of a split
    fitting in shared memory next to the ring. Every split is non-empty."""
    layout = LAYOUTS[config.wb] if config is not None else "quick_sm90"
    if not 1 <= m <= MAX_M_BY_LAYOUT[layout]:
        raise DecError(f"the decode kernel takes 1 <= M <= {MAX_M_BY_LAYOUT[layout]} rows for {layout!r}, got M={m}")
    cfg = config or default_config(layout, m)
    if n % cfg.channels:
        raise DecError(f"N={n} is not a multiple of {cfg.channels} (config {cfg})")
    if not cfg.supports(group_size):
        raise DecError(f"config {cfg} cannot take group size {group_size} (too many channels per CTA)")
    nk = k // 64
    n_tiles = n // cfg.channels
    if splits is None:
        splits = max(1, math.ceil(waves * num_sms / n_tiles))
        splits = min(splits, max(1, nk // cfg.warps))
    steps = -(-nk // max(1, min(splits, nk)))
    while steps > 1 and cfg.smem_bytes(m, steps, group_size) > smem_limit:  # fewer steps per split until x fits
        steps -= 1
    s = -(-nk // steps)  # the fewest splits of at most `steps` steps, then even them out: no split is empty
    steps = -(-nk // s)
    smem = cfg.smem_bytes(m, steps, group_size)
    if smem > smem_limit:
        raise DecError(f"config {cfg} needs {smem} bytes of shared memory for M={m}, K={k}")
    return DecPlan(cfg, n_tiles, s, steps, smem)


WAVES = (0.5, 1, 2, 3)  # the wave counts whose split counts are timed


def timing_candidates(layout: str, m: int, n: int, k: int, num_sms: int) -> list[tuple[DecConfig, int]]:
    """``(config, splits)`` worth timing for one shape (scripts/dec_check.py, ``quick tune``): the bucket's default and
    candidates that fit N, each at the split counts the plan gives for 0.5 to 3 waves. Empty above the M limit."""
    if m > MAX_M_BY_LAYOUT[layout]:
        return []
    top = bucket(layout, m)
    cfgs = [c for c in dict.fromkeys((default_config(layout, m), *CANDIDATES[layout][top])) if fits(c, m, n)]
    return [(c, s) for c in cfgs for s in sorted({plan(m, n, k, 128, num_sms, c, waves=w).splits for w in WAVES})]


# The QD_GROUPED arguments (mixture-of-experts plans: quick.kernels.moe) of a launch without them: 4 pointers, 5 ints.
UNGROUPED = [None] * 4 + [0, 1, 0, 0, 0]
UNGROUPED_PTRS = [0] * 4

_LAUNCH: dict[tuple, tuple] = {}
_LOCK = threading.Lock()
_COUNTERS: dict[tuple[int, int], Tensor] = {}


def _smem(idx: int) -> int:
    """Dynamic shared memory a block may opt into on device ``idx`` (163 KB on sm_80, 99 KB on sm_86/89, 227 KB on
    sm_90), less 1 KB for the kernel's static shared memory."""
    props = torch.cuda.get_device_properties(idx)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or (227 if props.major >= 9 else 99) * 1024
    return min(optin, SMEM_LIMIT + 1024) - 1024


def _prepare(layout: str, x, qweight, scales, zeros, group_size, bias) -> tuple[Tensor, int, int, int, int]:
    """The layout's own validation (its exception types and messages), then what the launch assumes: CUDA tensors,
    contiguous and 16-byte aligned (x is copied to dense rows if it is not). Returns ``(x, M, N, K, G)``."""
    if layout == "quick_sm90":
        m, n, k, g = wgmma.validate(x, qweight, scales, zeros, group_size, bias)
        if x.device.type != "cuda":
            raise DecError("the decode kernel runs on CUDA tensors only")
        named = (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias))
        mma._check_tensors(named, x.device, DecError)
        return mma._dense_rows(x), m, n, k, g
    if isinstance(x, torch.Tensor) and x.device.type != "cuda":
        raise DecError("the decode kernel runs on CUDA tensors only")
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        x = mma._dense_rows(x)
    m, k, n, g = mma._prepare(x, qweight, scales, zeros, group_size, bias)  # shapes cached per signature
    return x, m, n, k, g


def gemv(
    layout: str, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
    config: DecConfig | None = None, splits: int | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``x @ dequant(W) (+ bias)`` for ``x`` [M, K] and ``W`` packed in ``layout`` (``quick_sm90``: M <= 64,
    ``quick``: M <= 16)."""
    if layout not in LAYOUTS:
        raise DecError(f"the decode kernel takes layouts {LAYOUTS}, got {layout!r}")
    x, m, n, k, g = _prepare(layout, x, qweight, scales, zeros, group_size, bias)
    return run_validated(layout, x, qweight, scales, zeros, bias, m, n, k, g, config, splits, out)


def run_validated(
    layout: str, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
    m: int, n: int, k: int, g: int, config: DecConfig | None = None, splits: int | None = None,
    out: Tensor | None = None, act: int = 0, norm: tuple | None = None, pdl: bool | None = None,
) -> Tensor:  # fmt: skip
    """The launch, for callers that have validated already (:func:`gemv`, ``gemm_w4a16_sm90``): CUDA tensors,
    contiguous and 16-byte aligned, shapes ``(M, N, K, G)`` checked for ``layout``. ``act`` (``ACTS``' values):
    ``x`` is a dense ``[M, 2K]`` gate/up product and the kernel multiplies in ``act(gate) * up`` (the caller checked
    :func:`takes_act` for the config the launch uses: :func:`launch_config`). ``norm = (resid, weight, eps, offset,
    normed)``: the ``QD_NORM`` tail; ``out`` receives ``r = resid + h`` and ``normed`` RMSNorm(r) (dense ``[M, N]``
    / ``[N]`` tensors, 16-byte aligned, checked by the caller; :func:`takes_norm`). ``pdl``: launch the ``QD_PDL``
    variant where the config has one (None: :func:`quick.kernels.jit.pdl_enabled`)."""
    if m == 0:
        return x.new_empty((0, n))
    if config is not None and config.wb != LAYOUTS.index(layout):
        raise DecError(f"config {config} is for layout {LAYOUTS[config.wb]!r}, not {layout!r}")
    dev = x.device
    eps, offset = (float(norm[2]), float(norm[3])) if norm is not None else (0.0, 0.0)
    pdl = jit.pdl_enabled(dev) if pdl is None else pdl  # where the config has PDL variants (takes_act's set)
    key = (layout, m, n, k, g, x.dtype, dev, config, splits, act, norm is not None, eps, offset, pdl)
    hit = _LAUNCH.get(key)
    if hit is None:
        with _LOCK:
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            p = plan(m, n, k, g, mma.num_sms(dev), launch_config(layout, m, config), splits, smem_limit=_smem(idx))
            arch = jit.arch_for_device(idx, arch_specific=True)
            fusable = takes_act(p.config, m, g)  # the configs with act / norm / PDL variants
            if (act or norm is not None) and not fusable:
                raise DecError(f"no act / norm variant for config {p.config}, M={m}, group size {g}")
            if norm is not None and p.smem < m * p.config.threads * 4:  # the tail's per-thread slots reuse it
                raise DecError(f"config {p.config}: {p.smem} bytes of shared memory hold no norm tail for M={m}")
            use_pdl = pdl and fusable
            defines = p.config.defines(m, g, x.dtype, act, int(norm is not None), int(use_pdl))
            kern = jit.load_kernel(SOURCE, KERNEL, defines, idx, arch)
            gshift = wgmma.group_shift(g, k)
            launch = mma._FastLaunch(
                kern,
                p.grid,
                (p.config.threads,),
                p.smem,
                [None] * 8 + [m, n, k, gshift, p.steps_per_split] + [None] * 3 + [eps, offset] + UNGROUPED,
                pdl=use_pdl,
            )
            hit = (launch, p)
            if len(_LAUNCH) > 4096:
                _LAUNCH.clear()
            _LAUNCH[key] = hit
    launch, p = hit
    out = jit.out_buffer(out, m, n, x.dtype, dev, DecError)
    stream = torch.cuda.current_stream(dev).cuda_stream
    ws_ptr = cnt_ptr = 0
    if p.splits > 1:
        ws = torch.empty((p.splits, m, n), dtype=torch.float32, device=dev)
        ws_ptr = ws.data_ptr()
    if p.splits > 1 or norm is not None:  # tile counters, then the norm tail's row counter
        cnt_ptr = mma._counters(dev, p.n_tiles + 1, stream, _COUNTERS).data_ptr()
    bptr = bias.data_ptr() if bias is not None else 0
    nptrs = [norm[0].data_ptr(), norm[1].data_ptr(), norm[4].data_ptr()] if norm is not None else [0, 0, 0]
    launch(
        [x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bptr, out.data_ptr(), ws_ptr, cnt_ptr]
        + nptrs
        + UNGROUPED_PTRS,
        stream,
    )
    return out


def gemv_sm90(x, qweight, scales, zeros, group_size, bias=None, config=None, splits=None, out=None) -> Tensor:
    """:func:`gemv` for the ``quick_sm90`` layout."""
    return gemv("quick_sm90", x, qweight, scales, zeros, group_size, bias, config, splits, out)


def gemv_quick(x, qweight, scales, zeros, group_size, bias=None, config=None, splits=None, out=None) -> Tensor:
    """:func:`gemv` for the paper's ``quick`` layout."""
    return gemv("quick", x, qweight, scales, zeros, group_size, bias, config, splits, out)
