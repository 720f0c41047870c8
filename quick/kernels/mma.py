"""Launcher of the QUICK mma.sync kernels (sm_80 and newer) for the ``quick`` layout.

``gemm`` / ``gemv(x, qweight, scales, zeros, group_size, bias)`` compute ``x @ dequant(W) (+ bias)`` for
``x`` [M, K] fp16/bf16 and W packed in the ``quick`` layout (``qweight`` int32 [K/16, 2N], ``scales`` and
``zeros`` [K/G, N] in x's dtype). It validates everything the kernels assume and raises ``TypeError`` (dtypes)
or ``ValueError`` (shapes, devices, layout, alignment) with the reason; M = 0 gives an empty result.

Two kernels (``csrc/``): ``quick_gemv`` for M <= 8 (decode; a register-ring weight stream, no barriers in
its main loop) and ``quick_gemm`` otherwise (activations through a cp.async pipeline, weights straight from
global memory into mma registers). Tile shape and split-k come from :data:`TUNED` (measured on the H100,
see docs/kernels.md); split-k partials go to an fp32 workspace and ``quick_splitk_reduce`` sums them in a
fixed order, so results are bitwise reproducible.

``VARIANTS`` lists every (source, defines, archs) this module can launch: ``python -m
quick.kernels.compile_check`` compiles them all.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quick.formats.weights import SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, check_group_shapes
from quick.kernels import jit

GEMM_SOURCE = "quick_mma.cu"
GEMV_SOURCE = "quick_gemv.cu"
ARCHS = ("sm_80", "sm_90a")  # every kernel here must compile cleanly for both
GEMV_MAX_M = 8
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}  # per-block opt-in limit by compute-capability major


def dtype_code(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.float16 else 1


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TileShape:
    """The tile fields shared by the mma.sync GEMMs (W4A16 here, W4A8 in :mod:`quick.kernels.w4a8_mma`, the grouped
    MoE GEMM in :mod:`quick.kernels.moe`): a CTA has ``warps_m x warps_n x warps_k`` warps; a warp owns ``bm /
    warps_m`` rows, ``nb`` blocks of ``N_BLOCK`` columns and ``sw`` steps of ``K_STEP`` of every stage. Subclasses
    set the two class constants."""

    N_BLOCK: ClassVar[int]
    K_STEP: ClassVar[int]

    name: str
    bm: int
    warps_m: int
    warps_n: int
    warps_k: int
    nb: int
    sw: int
    stages: int
    pf: int

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n * self.warps_k

    @property
    def bn(self) -> int:
        return self.N_BLOCK * self.nb * self.warps_n

    @property
    def bks(self) -> int:
        return self.K_STEP * self.sw * self.warps_k

    def _reduction_bytes(self) -> int:
        """The k-slice reduction buffer (4-byte accumulators of every warp's tiles) when warps split K, else 0."""
        if self.warps_k <= 1:
            return 0
        return self.warps_m * self.warps_n * (self.bm // self.warps_m // 16) * self.nb * (self.N_BLOCK // 8) * 32 * 16


@dataclass(frozen=True)
class TileConfig(TileShape):
    """A split-k GEMM's tile (:class:`GemmConfig`, the W4A8 config): ``minb`` = minimum CTAs per SM for
    ``__launch_bounds__``; ``inred`` = 1: split-k summed in the kernel by the last CTA of each tile."""

    minb: int = 1
    inred: int = 0


@dataclass(frozen=True)
class GemmConfig(TileConfig):
    """One compiled GEMM variant. A CTA has ``warps_m x warps_n x warps_k`` warps; a warp owns
    ``bm / warps_m`` rows, ``nb`` n64 blocks and ``sw`` k16 steps of every stage (so a stage spans
    ``bks = 16 * sw * warps_k`` columns of K); ``stages`` cp.async stages of activations; ``pf`` stages of
    weights prefetched into registers; ``minb`` = minimum CTAs per SM for ``__launch_bounds__``; ``inred`` = 1:
    split-k summed in the kernel by the last CTA of each tile (no reduce launch); ``l2pf`` = D > 0: L2 prefetch
    of the weights D stages ahead; ``wsmem`` = 1: weights through the cp.async stages (needs ``pf`` = 1);
    ``ef`` = 1: weight accesses carry an L2 evict_first policy (read once: replaced first)."""

    N_BLOCK: ClassVar[int] = 64
    K_STEP: ClassVar[int] = 16

    l2pf: int = 0
    wsmem: int = 0
    ef: int = 0

    @property
    def smem_bytes(self) -> int:
        """Mirror of the kernel's layout: STAGES x (A tile with 16-byte row padding + scale and zero rows),
        or the k-slice reduction buffer if larger."""
        a_stage = self.bm * (self.bks + 8) * 2
        s_rows = max(1, self.bks // 32)
        stage = a_stage + 2 * s_rows * self.bn * 2 + (self.bks // 16) * self.bn * 8 * self.wsmem
        return max(self.stages * stage, self._reduction_bytes())

    def defines(self, dtype: torch.dtype) -> dict[str, int]:
        return {
            "QK_DTYPE": dtype_code(dtype),
            "QK_BM": self.bm,
            "QK_WM": self.warps_m,
            "QK_WN": self.warps_n,
            "QK_WK": self.warps_k,
            "QK_NB": self.nb,
            "QK_SW": self.sw,
            "QK_STAGES": self.stages,
            "QK_PF": self.pf,
            "QK_MINB": self.minb,
            "QK_INRED": self.inred,
            "QK_L2PF": self.l2pf,
            "QK_WSMEM": self.wsmem,
            "QK_EF": self.ef,
        }


@dataclass(frozen=True)
class GemvConfig:
    """One GEMV family: ``warps`` warps per CTA (all splitting K), ``nb`` n64 blocks per warp, a register
    ring of ``r`` k16 steps. The group size picks the scale-ring variant (``QK_GS``)."""

    name: str
    warps: int
    nb: int
    r: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        return self.warps * self.nb * 2048

    def gs(self, group: int) -> int:
        """Static scale-ring period (k16 steps per group) when a group is shorter than the ring, else 0."""
        steps = group // 16
        return steps if steps < self.r and self.r % steps == 0 else 0

    def defines(self, dtype: torch.dtype, group: int) -> dict[str, int]:
        return {
            "QK_DTYPE": dtype_code(dtype),
            "QK_WARPS": self.warps,
            "QK_NB": self.nb,
            "QK_R": self.r,
            "QK_GS": self.gs(group),
        }


GEMM_CONFIGS: dict[str, GemmConfig] = {
    c.name: c
    for c in (
        # small M: one m16 tile per warp, warps split K inside the CTA, 8 k16 steps of weights in flight
        GemmConfig("m16n2k4", 16, 1, 2, 4, 1, 4, 3, 2),  # best M <= 16 on the H100 sweep (with split-k)
        GemmConfig("m16k8", 16, 1, 1, 8, 1, 4, 3, 2, minb=2),
        GemmConfig("m16k4", 16, 1, 1, 4, 1, 1, 4, 4, minb=2),  # stage of 64: any K that is a multiple of 64
        GemmConfig("m32k8", 32, 1, 1, 8, 1, 4, 3, 1),
        # medium / large M: 64 rows per warp (4 m16 tiles) so that dequantization hides under the MMAs
        GemmConfig("m64n4", 64, 1, 4, 1, 1, 4, 4, 1),  # stage of 64: any K
        GemmConfig("m128n4", 128, 2, 4, 1, 1, 4, 4, 1),
    )
}

GEMV_CONFIGS: dict[str, GemvConfig] = {c.name: c for c in (GemvConfig("v16", 16, 1, 8), GemvConfig("v8", 8, 1, 8))}

# Tuned choice per M bucket: (largest M of the bucket, configs in order of preference). The first config whose
# stage divides K is used; the last of each list has a stage of 64 and takes any K. From the H100 sweep
# (benchmarks/kernel.py --sweep, CUDA-graph timing; docs/kernels.md). Split-k: choose_splits (its model
# reproduces the sweep's best split at K = N = 8192 for every bucket).
TUNED_GEMM: list[tuple[int, tuple[str, ...]]] = [
    (16, ("m16n2k4", "m16k4")),
    (32, ("m32k8", "m16n2k4", "m64n4")),
    (1 << 62, ("m64n4",)),
]
# Measured split-k policy per tuned config: splits = the largest s with (CTAs x s) <= waves x the
# resident CTA slots of all SMs (at least 1). Configs not listed use the choose_splits model.
TUNED_WAVES: dict[str, float] = {}


def gemv_config_for(group: int) -> GemvConfig:
    """v16 (16 warps, 1 CTA of 512 threads per SM) except G = 32, whose 4-slot scale ring needs the
    registers of v8."""
    return GEMV_CONFIGS["v8"] if group == 32 else GEMV_CONFIGS["v16"]


def _all_variants() -> list[tuple[str, dict[str, int], tuple[str, ...]]]:
    out = []
    for dt in SUPPORTED_DTYPES:
        for cfg in GEMM_CONFIGS.values():
            out.append((GEMM_SOURCE, cfg.defines(dt), ARCHS))
        seen = set()
        for g in (32, 64, 128):
            cfg = gemv_config_for(g)
            d = cfg.defines(dt, g)
            key = tuple(sorted(d.items()))
            if key not in seen:
                seen.add(key)
                out.append((GEMV_SOURCE, d, ARCHS))
    return out


# Every (source, defines, archs) this module may launch (the compile check builds them all).
VARIANTS: list[tuple[str, dict[str, int], tuple[str, ...]]] = _all_variants()


# --------------------------------------------------------------------------------------------- validation


def resolve_group(group_size: int, k: int) -> int:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group_size {group_size}; supported: {SUPPORTED_GROUP_SIZES} (-1 = per-channel)")
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"in_features K={k} is not a multiple of the group size {g}")
    return g


_ALIGN_HINT = "the kernels use 16-byte loads: pass a fresh tensor or .clone() the view"


def _check_tensor(
    name: str, t: Tensor, device: torch.device, error: type[ValueError] = ValueError, hint: str = _ALIGN_HINT
) -> None:
    """One kernel argument: a tensor on ``device``, contiguous and 16-byte aligned (``error`` is raised with the
    reason, ``hint`` ends the alignment message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise error(f"{name} is on {t.device} but x is on {device}: all tensors must be on one CUDA device")
    if not t.is_contiguous():
        raise error(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous()")
    if t.numel() and t.data_ptr() % 16:
        raise error(f"{name} must be 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}); {hint}")


def _check_tensors(
    named: tuple[tuple[str, Tensor | None], ...], device: torch.device, error: type[ValueError] = ValueError,
    hint: str = _ALIGN_HINT,
) -> None:  # fmt: skip
    """:func:`_check_tensor` for each ``(name, tensor)`` whose tensor is not None (an absent bias)."""
    for name, t in named:
        if t is not None:
            _check_tensor(name, t, device, error, hint)


def _packed_dims(
    x: Tensor, qweight: Tensor, k_rows: int, n_cols: int, layout: str, align: tuple[int, int], need: str,
    error: type[ValueError] = ValueError,
) -> tuple[int, int, int]:  # fmt: skip
    """``(M, K, N)`` of ``x [M, K]`` and ``qweight [K/k_rows, n_cols*N]`` packed in ``layout``, K and N multiples of
    ``align`` (``need`` says so in the error)."""
    m, k = x.shape
    if qweight.dim() != 2 or qweight.shape[1] % n_cols:
        packed = f"[K/{k_rows}, {n_cols}N] (layout '{layout}')"
        raise error(f"qweight must be 2-D {packed}, got shape {tuple(qweight.shape)}")
    n = qweight.shape[1] // n_cols
    if k % align[0] or n % align[1]:
        raise error(f"the {need}, got K={k}, N={n}")
    if qweight.shape[0] * k_rows != k:
        raise error(f"qweight has {qweight.shape[0]} k{k_rows} rows, x has K={k} (expected {k // k_rows} rows)")
    return m, k, n


def _check_x(x: Tensor, error: type[ValueError] = ValueError) -> None:
    """The activations: a 2-D fp16/bf16 tensor (``TypeError`` for the type and dtype, ``error`` for the shape)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise error(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")


def _check_bias_dtype(bias: Tensor | None, x: Tensor) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype):
        raise TypeError(f"bias must have x's dtype {x.dtype}, got {getattr(bias, 'dtype', type(bias).__name__)}")


def _flatten(x: Tensor, error: type[ValueError] = ValueError) -> Tensor:
    """``x [..., K]`` as 2-D rows ``[M, K]`` (a view; ``x`` must be contiguous unless it is already 2-D)."""
    if x.dim() < 1:
        raise error("x must have at least one dimension (the last one is K)")
    if x.dim() == 2:
        return x
    if not x.is_contiguous():
        raise error(f"x must be contiguous (got strides {tuple(x.stride())}); call .contiguous()")
    return x.reshape(-1, x.shape[-1])


def _dense_rows(x2d: Tensor) -> Tensor:
    """``x2d`` itself if contiguous and 16-byte aligned, else a dense copy (callers hand in views such as
    ``x[:, :1].reshape(...)``; the kernels need dense rows)."""
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    return x2d


def validate(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
    need_cuda: bool = True,
) -> tuple[int, int, int, int]:  # fmt: skip
    """Check every assumption of the kernels; returns ``(M, K, N, G)``. Works on meta/fake tensors when
    ``need_cuda`` is False (the op's fake implementation uses that)."""
    _check_x(x)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(
            f"qweight must be an int32 tensor (layout 'quick'), got {getattr(qweight, 'dtype', type(qweight).__name__)}"
        )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype:
            raise TypeError(
                f"{name} must have x's dtype {x.dtype} (the weights are dequantized in it), got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
    _check_bias_dtype(bias, x)
    m, k, n = _packed_dims(x, qweight, 16, 2, "quick", (64, 64), "QUICK kernels need K and N multiples of 64")
    g = resolve_group(group_size, k)
    check_group_shapes(scales, zeros, k, n, g, group_size, ValueError)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    if need_cuda:
        if x.device.type != "cuda":
            raise ValueError(
                f"x is on {x.device}: the QUICK kernels run on CUDA tensors (use QuickLinear's "
                "reference backend on CPU)"
            )
        _check_tensors((("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)), x.device)
    return m, k, n, g


# ------------------------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class SplitKPlan:
    """A split-k GEMM launch (W4A16 here, W4A8 in :mod:`quick.kernels.w4a8_mma`): K in ``splits`` runs of
    ``tiles_per_split`` tiles, and the grid (:func:`split_grid`)."""

    config: TileConfig
    splits: int
    tiles_per_split: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class GemmPlan(SplitKPlan):
    config: GemmConfig


@dataclass(frozen=True)
class GemvPlan:
    config: GemvConfig
    gs: int
    splits: int
    steps_per_warp: int
    grid: tuple[int, int]


# Rough H100 rates for the split-k cost model (only ratios matter): DRAM bytes/s and mma.sync FLOP/s that
# the GEMM reaches at large M (measured: ~290 TFLOP/s), plus the fixed cost of the extra reduce launch.
_BW, _MMA_RATE, _REDUCE_US = 3.0e12, 2.9e14, 3.0


def ctas_per_sm(cfg: TileConfig) -> int:
    """Resident CTAs per SM: registers (255 per thread unless __launch_bounds__ asks for minb CTAs) and
    shared memory (227 KB)."""
    regs = 256 if cfg.minb <= 1 else 65536 // (cfg.threads * cfg.minb)  # allocated in units of 8
    return max(1, min(65536 // (cfg.threads * regs), (227 * 1024) // max(cfg.smem_bytes, 1)))


def choose_splits(cfg: GemmConfig, m: int, n: int, k: int, num_sms: int, max_splits: int = 16) -> int:
    """Split-k minimising a two-term model: the main kernel's floor (weight bytes or MMA time) divided by the
    fraction of CTA slots its grid fills (waves rounded up), plus writing and reading the fp32 partials and
    the reduce launch. Split-k only pays when the (n, m) tiles leave SMs idle."""
    return split_model(cfg, m, n, k, num_sms, max_splits, _MMA_RATE)


def split_model(cfg: TileConfig, m: int, n: int, k: int, num_sms: int, max_splits: int, mma_rate: float) -> int:
    """The split-k model of :func:`choose_splits` for a GEMM whose MMAs run at ``mma_rate`` ops/s (4-byte
    partials: written and read once per split)."""
    ctas = math.ceil(n / cfg.bn) * math.ceil(m / cfg.bm)
    slots = num_sms * ctas_per_sm(cfg)
    if ctas >= slots:
        return 1
    tiles = k // cfg.bks
    mem_us = 1e6 * k * n / 2 / _BW
    mma_us = 1e6 * 2.0 * m * n * k / mma_rate
    best, best_t = 1, math.inf
    for s in range(1, min(max_splits, tiles) + 1):
        total = ctas * s
        waves = math.ceil(total / slots)
        busy_sms = min(1.0, total / (waves * num_sms))  # streaming weights needs SMs, not full SMs
        busy_slots = total / (waves * slots)  # MMA throughput needs resident warps
        t = max(mem_us / busy_sms, mma_us / busy_slots)
        if s > 1:
            t += 1e6 * 8.0 * m * n * s / _BW + _REDUCE_US
        if t < best_t * 0.97:  # prefer fewer splits unless clearly better
            best, best_t = s, t
    return best


def plan_gemm(
    m: int, n: int, k: int, num_sms: int, config: GemmConfig | str | None = None, splits: int | None = None
) -> GemmPlan:
    """Config, split-k and grid for one GEMM (pure arithmetic; testable without a GPU)."""
    if isinstance(config, str):
        if config not in GEMM_CONFIGS:
            raise ValueError(f"unknown GEMM config {config!r}; known: {sorted(GEMM_CONFIGS)}")
        config = GEMM_CONFIGS[config]
    waves = None
    if config is None:
        names = next(c for bound, c in TUNED_GEMM if m <= bound)
        config = next((GEMM_CONFIGS[c] for c in names if k % GEMM_CONFIGS[c].bks == 0), GEMM_CONFIGS["m64n4"])
        waves = TUNED_WAVES.get(config.name)
    if k % config.bks:
        raise ValueError(f"config {config.name} needs K % {config.bks} == 0, got K={k}")
    if splits is None and waves is not None:
        ctas = math.ceil(n / config.bn) * math.ceil(m / config.bm)
        splits = max(1, int(waves * num_sms * ctas_per_sm(config) // ctas))
    # the model's split is capped at 8, the largest measured (above it the model extrapolates: H100, 4096^2, M = 64,
    # s = 8 took 22.9 us against the model's s = 11 at 25.5 us)
    s = choose_splits(config, m, n, k, num_sms, max_splits=8) if splits is None else splits
    return GemmPlan(config, *split_grid(config, m, n, k, s))


def split_grid(config: TileConfig, m: int, n: int, k: int, splits: int) -> tuple[int, int, tuple[int, int, int]]:
    """``(splits, tiles_per_split, grid)`` of a GEMM cut into ``splits`` (clamped to 1..K/BKS; every split
    non-empty) along K: grid = (N tiles, M tiles, splits)."""
    tiles = k // config.bks
    s = max(1, min(splits, tiles))
    per = math.ceil(tiles / s)
    s = math.ceil(tiles / per)  # every split non-empty
    return s, per, (math.ceil(n / config.bn), math.ceil(m / config.bm), s)


def plan_gemv(
    m: int, n: int, k: int, g: int, num_sms: int, config: GemvConfig | str | None = None, splits: int | None = None
) -> GemvPlan:
    """The k16 steps are cut into runs per warp (a multiple of the ring depth, so that scale groups align);
    enough CTAs x warps to fill the SMs, splitting across CTAs only when N alone does not."""
    if isinstance(config, str):
        if config not in GEMV_CONFIGS:
            raise ValueError(f"unknown GEMV config {config!r}; known: {sorted(GEMV_CONFIGS)}")
        config = GEMV_CONFIGS[config]
    config = config or gemv_config_for(g)
    ksteps = k // 16
    nblocks = math.ceil(n / (64 * config.nb))
    if splits is None:
        splits = 1
        while nblocks * splits < num_sms * 0.9 and splits < 8:
            splits *= 2
    splits = max(1, splits)
    r = config.r
    spw = math.ceil(ksteps / (splits * config.warps) / r) * r
    splits = math.ceil(ksteps / (spw * config.warps))  # drop empty splits
    return GemvPlan(config, config.gs(g), splits, spw, (nblocks, splits))


# ------------------------------------------------------------------------------------------------ launch
#
# Eager launch cost matters at decode sizes (a 4096 x 4096 GEMV moves 8 MB: ~3 us of DRAM time). So
# everything that depends only on shapes is computed once and cached: shape validation, the plan, the loaded
# kernels and a prebuilt ctypes parameter block; a call then checks devices, contiguity and alignment,
# allocates the output (and the split-k workspace) and calls cuLaunchKernel directly.

_SMS: dict[int, int] = {}
_CAP: dict[int, tuple[int, int]] = {}
_NVCC: list[bool] = []
_CACHE_MAX = 4096


def _dev_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    idx = _dev_index(device)
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def capability(device: torch.device) -> tuple[int, int]:
    idx = _dev_index(device)
    if idx not in _CAP:
        _CAP[idx] = torch.cuda.get_device_capability(idx)
    return _CAP[idx]


class _FastLaunch:
    """One kernel launch with fixed grid, block, shared memory and scalar arguments (``int`` -> int32, ``float`` ->
    fp32); pointer arguments (``None`` in the template) are filled in per call. The parameter block is built once
    (cuLaunchKernel copies it at launch)."""

    def __init__(self, kernel: jit.CudaKernel, grid, block, smem: int, template: list, pdl: bool = False) -> None:
        self.kernel, self.smem = kernel, smem
        self.grid = (*grid, 1, 1)[:3]
        self.block = (*block, 1, 1)[:3]
        kernel.set_max_dynamic_smem(smem)
        self.holders = [
            ctypes.c_void_p(0) if a is None else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a)
            for a in template
        ]
        self.ptr_slots = [i for i, a in enumerate(template) if a is None]
        self.params = (ctypes.c_void_p * len(self.holders))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in self.holders]
        )
        self.lock = threading.Lock()
        # pdl: a programmatic dependent launch (jit.pdl_config), for kernels that wait before reading earlier output
        self.pdl = jit.pdl_config(self.grid, self.block, smem) if pdl else None

    def __call__(self, ptrs: list[int], stream: int) -> None:
        g, b = self.grid, self.block
        with self.lock:
            for slot, p in zip(self.ptr_slots, ptrs, strict=True):
                self.holders[slot].value = p
            res = jit.raw_launch(self.kernel._fn, g, b, self.smem, stream, self.params, self.pdl)
        if res != 0:
            jit.check(res, f"launch {self.kernel.name} grid={g} block={b} smem={self.smem}")


@dataclass
class _Launch:
    main: _FastLaunch
    reduce: _FastLaunch | None
    splits: int
    counters: int = 0  # > 0: the kernel reduces split-k itself and needs this many zeroed arrival counters


_VALID: dict[tuple, tuple[int, int, int, int]] = {}
_LAUNCH: dict[tuple, _Launch] = {}
_LOCK = threading.Lock()


def _remember(cache: dict, key, value) -> None:
    """``cache[key] = value``, emptying the cache first once it holds more than ``_CACHE_MAX`` entries."""
    if len(cache) > _CACHE_MAX:
        cache.clear()
    cache[key] = value


def _prepare(x, qweight, scales, zeros, group_size, bias) -> tuple[int, int, int, int]:
    """validate() with its shape/dtype part cached per signature; devices, contiguity and alignment are
    checked on every call (they depend on the tensors, not on the shapes)."""
    try:
        key = (
            x.shape,
            x.dtype,
            qweight.shape,
            qweight.dtype,
            scales.shape,
            scales.dtype,
            zeros.shape,
            zeros.dtype,
            None if bias is None else (bias.shape, bias.dtype),
            group_size,
        )
    except AttributeError:
        key = None
    shape = _VALID.get(key) if key is not None else None
    if shape is None:
        shape = validate(x, qweight, scales, zeros, group_size, bias)
        if key is not None:
            _remember(_VALID, key, shape)
        return shape
    dev = x.device
    if dev.type != "cuda":
        raise ValueError(f"x is on {dev}: the QUICK kernels run on CUDA tensors")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and (t.device != dev or not t.is_contiguous() or t.data_ptr() % 16):
            _check_tensor(name, t, dev)  # raises with the precise reason
    return shape


def _reduce_launch(
    source: str, defines: dict, dev: int, m: int, n: int, splits: int, name: str = "quick_splitk_reduce", nptr: int = 3
) -> _FastLaunch:
    """The split-k reduce kernel ``name`` of ``source``: 256 threads a CTA, 4 outputs a thread (grid capped at 4
    CTAs per SM); ``nptr`` pointer arguments, then M, N, splits."""
    kern = jit.load_kernel(source, name, defines, dev)
    grid = min(math.ceil(m * n // 4 / 256), 4 * num_sms(torch.device("cuda", dev)))
    return _FastLaunch(kern, (grid,), (256,), 0, [None] * nptr + [m, n, splits])


def _get_launch(
    kind: str, m: int, n: int, k: int, g: int, dtype: torch.dtype, dev: torch.device, config, splits
) -> _Launch:
    key = (kind, m, n, k, g, dtype, dev, config, splits)
    hit = _LAUNCH.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        idx = _dev_index(dev)
        if kind == "gemm":
            p = plan_gemm(m, n, k, num_sms(dev), config, splits)
            cfg = p.config
            if cfg.smem_bytes > SMEM_LIMIT.get(capability(dev)[0], SMEM_LIMIT[9]):
                raise ValueError(f"config {cfg.name} needs {cfg.smem_bytes} bytes of shared memory, over the limit")
            defines = cfg.defines(dtype)
            source, name = GEMM_SOURCE, "quick_gemm"
            gshift = int(math.log2(g)) if g < cfg.bks else 30
            scalars = [m, n, k, g, gshift, p.tiles_per_split]
            nptr = 8  # x, qweight, scales, zeros, bias, out, ws, counters
            inred = cfg.inred and p.splits > 1
        else:
            p = plan_gemv(m, n, k, g, num_sms(dev), config, splits)
            cfg = p.config
            defines = cfg.defines(dtype, g)
            source, name = GEMV_SOURCE, "quick_gemv"
            scalars = [m, n, k, g, p.steps_per_warp]
            nptr, inred = 7, False
        kern = jit.load_kernel(source, name, defines, idx)
        main = _FastLaunch(kern, p.grid, (cfg.threads,), cfg.smem_bytes, [None] * nptr + scalars)
        red = _reduce_launch(source, defines, idx, m, n, p.splits) if p.splits > 1 and not inred else None
        launch = _Launch(main, red, p.splits, p.grid[0] * p.grid[1] if inred else 0)
        _remember(_LAUNCH, key, launch)
    return launch


def _out(out: Tensor | None, m: int, n: int, x: Tensor) -> Tensor:
    return jit.out_buffer(out, m, n, x.dtype, x.device, ValueError)


def _run(kind, x, qweight, scales, zeros, group_size, bias, config, splits, out) -> Tensor:
    m, k, n, g = _prepare(x, qweight, scales, zeros, group_size, bias)
    if kind == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV handles M <= {GEMV_MAX_M} rows, got M={m}; use gemm()")
    if m == 0:
        return _out(out, 0, n, x)
    dev = x.device
    launch = _get_launch(kind, m, n, k, g, x.dtype, dev, config, splits)
    out = _out(out, m, n, x)
    stream = torch.cuda.current_stream(dev).cuda_stream
    bptr = bias.data_ptr() if bias is not None else 0
    base = [x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bptr, out.data_ptr()]
    gemm_kernel = kind == "gemm"
    if launch.splits == 1:
        launch.main(base + [0] + ([0] if gemm_kernel else []), stream)
        return out
    ws = torch.empty((launch.splits, m, n), dtype=torch.float32, device=dev)
    if launch.counters:
        cnt = _counters(dev, launch.counters, stream)
        launch.main(base + [ws.data_ptr(), cnt.data_ptr()], stream)
    else:
        launch.main(base + [ws.data_ptr()] + ([0] if gemm_kernel else []), stream)
        launch.reduce([ws.data_ptr(), bptr, out.data_ptr()], stream)
    return out


_COUNTERS: dict[tuple[int, int], Tensor] = {}


def _counters(dev: torch.device, n: int, stream: int, cache: dict[tuple[int, int], Tensor] = _COUNTERS) -> Tensor:
    """Zeroed split-k arrival counters, one buffer per (device, stream) in ``cache``: kernels on one stream run in
    order and the last CTA of each tile resets its counter, so the buffer is zero again between launches."""
    key = (_dev_index(dev), stream)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        with _LOCK:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=dev)
            cache[key] = buf
    return buf


def gemm(x, qweight, scales, zeros, group_size, bias=None, *, config=None, splits=None, out=None) -> Tensor:
    """The mma.sync GEMM for any M >= 1 (``config``/``splits`` override the tuned choice; ``out`` may be a
    caller's buffer, e.g. a poisoned one in tests)."""
    return _run("gemm", x, qweight, scales, zeros, group_size, bias, config, splits, out)


def gemv(x, qweight, scales, zeros, group_size, bias=None, *, config=None, splits=None, out=None) -> Tensor:
    """The decode kernel, M <= 8."""
    return _run("gemv", x, qweight, scales, zeros, group_size, bias, config, splits, out)


def is_available(x: Tensor) -> bool:
    """A CUDA tensor on an sm_80+ device, fp16/bf16, K a multiple of 64, and nvcc to build the kernels."""
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES):
        return False
    if x.shape[-1] % 64 or capability(x.device)[0] < 8:
        return False
    if not _NVCC:
        try:
            jit.find_nvcc()
            _NVCC.append(True)
        except jit.KernelUnavailable:
            _NVCC.append(False)
    return _NVCC[0]
