"""Launcher of the QUICK mma.sync kernels (sm_80 and newer) for the ``quick`` layout.

``quick_matmul(x, qweight, scales, zeros, group_size, bias)`` computes ``x @ dequant(W) (+ bias)`` for
``x`` [M, K] fp16/bf16 and W packed in the ``quick`` layout (``qweight`` int32 [K/16, 2N], ``scales`` and
``zeros`` [K/G, N] in x's dtype). It validates everything the kernels assume and raises ``TypeError`` (dtypes)
or ``ValueError`` (shapes, devices, layout, alignment) with the reason; M = 0 gives an empty result.

Two kernels (``csrc/``): ``quick_gemv`` for M <= 8 (decode; a register-ring weight stream, no barriers in
its main loop) and ``quick_gemm`` otherwise (activations through a cp.async pipeline, weights straight from
global memory into mma registers). Tile shape and split-k come from :data:`TUNED` (measured on the H100,
see docs/kernel_notes.md); split-k partials go to an fp32 workspace and ``quick_splitk_reduce`` sums them in a
fixed order, so results are bitwise reproducible.

``VARIANTS`` lists every (source, defines, archs) this module can launch: ``python -m
quick.kernels.compile_check`` compiles them all.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from quick.kernels import jit
from quick.quant.primitives import SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES

GEMM_SOURCE = "quick_mma.cu"
GEMV_SOURCE = "quick_gemv.cu"
ARCHS = ("sm_80", "sm_90a")  # every kernel here must compile cleanly for both
GEMV_MAX_M = 8
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}  # per-block opt-in limit by compute-capability major


def dtype_code(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.float16 else 1


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """One compiled GEMM variant. A CTA has ``warps_m x warps_n x warps_k`` warps; a warp owns
    ``bm / warps_m`` rows, ``nb`` n64 blocks and ``sw`` k16 steps of every stage (so a stage spans
    ``bks = 16 * sw * warps_k`` columns of K); ``stages`` cp.async stages of activations; ``pf`` stages of
    weights prefetched into registers; ``minb`` = minimum CTAs per SM for ``__launch_bounds__``."""

    name: str
    bm: int
    warps_m: int
    warps_n: int
    warps_k: int
    nb: int
    sw: int
    stages: int
    pf: int
    minb: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n * self.warps_k

    @property
    def bn(self) -> int:
        return 64 * self.nb * self.warps_n

    @property
    def bks(self) -> int:
        return 16 * self.sw * self.warps_k

    @property
    def smem_bytes(self) -> int:
        """Mirror of the kernel's layout: STAGES x (A tile with 16-byte row padding + scale and zero rows),
        or the k-slice reduction buffer if larger."""
        a_stage = self.bm * (self.bks + 8) * 2
        s_rows = max(1, self.bks // 32)
        stage = a_stage + 2 * s_rows * self.bn * 2
        red = 0
        if self.warps_k > 1:
            red = self.warps_m * self.warps_n * (self.bm // self.warps_m // 16) * self.nb * 8 * 32 * 16
        return max(self.stages * stage, red)

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
        # small M: one m16 tile, warps split K inside the CTA, deep weight prefetch
        GemmConfig("m16k8", 16, 1, 1, 8, 1, 4, 3, 2, minb=2),
        GemmConfig("m16k4", 16, 1, 1, 4, 1, 1, 4, 4, minb=2),  # stage of 64: any K that is a multiple of 64
        GemmConfig("m32k8", 32, 1, 1, 8, 1, 4, 3, 1),
        # medium / large M: 64 rows per warp (4 m16 tiles) so that dequantization hides under the MMAs
        GemmConfig("m64k4", 64, 1, 1, 4, 1, 4, 3, 1),
        GemmConfig("m64n4", 64, 1, 4, 1, 1, 4, 4, 1),
        GemmConfig("m128n2k2", 128, 2, 2, 2, 1, 2, 4, 1),
        GemmConfig("m128n4", 128, 2, 4, 1, 1, 4, 4, 1),
    )
}

GEMV_CONFIGS: dict[str, GemvConfig] = {c.name: c for c in (GemvConfig("v16", 16, 1, 8), GemvConfig("v8", 8, 1, 8))}

# Tuned choice per M bucket (largest M of the bucket -> GEMM config name), from the H100 sweep of
# benchmarks/kernel.py --sweep (docs/kernel_notes.md). Split-k is chosen by choose_splits below.
TUNED_GEMM: list[tuple[int, str]] = [
    (16, "m16k8"),
    (32, "m32k8"),
    (64, "m64k4"),
    (128, "m128n2k2"),
    (1 << 62, "m128n4"),
]
# Fallback when K is not a multiple of the preferred config's stage (bks): every one of these has bks = 64.
FALLBACK_GEMM: list[tuple[int, str]] = [(16, "m16k4"), (64, "m64n4"), (1 << 62, "m128n4")]


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


def _check_tensor(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: all tensors must be on one CUDA device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous()")
    if t.numel() and t.data_ptr() % 16:
        raise ValueError(
            f"{name} must be 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}); the kernels use "
            "16-byte loads: pass a fresh tensor or .clone() the view"
        )


def validate(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    need_cuda: bool = True,
) -> tuple[int, int, int, int]:
    """Check every assumption of the kernels; returns ``(M, K, N, G)``. Works on meta/fake tensors when
    ``need_cuda`` is False (the op's fake implementation uses that)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
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
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype):
        raise TypeError(f"bias must have x's dtype {x.dtype}, got {getattr(bias, 'dtype', type(bias).__name__)}")
    m, k = x.shape
    if qweight.dim() != 2 or qweight.shape[1] % 2:
        raise ValueError(f"qweight must be 2-D [K/16, 2N] (layout 'quick'), got shape {tuple(qweight.shape)}")
    n = qweight.shape[1] // 2
    if k % 64 or n % 64:
        raise ValueError(f"the QUICK kernels need K and N multiples of 64, got K={k}, N={n}")
    if qweight.shape[0] * 16 != k:
        raise ValueError(f"qweight has {qweight.shape[0]} k16 rows, x has K={k} (expected {k // 16} rows)")
    g = resolve_group(group_size, k)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (k // g, n):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected [K/G, N] = {(k // g, n)} "
                f"for K={k}, N={n}, group_size={group_size}"
            )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    if need_cuda:
        if x.device.type != "cuda":
            raise ValueError(
                f"x is on {x.device}: the QUICK kernels run on CUDA tensors (use QuickLinear's "
                "reference backend on CPU)"
            )
        for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
            if t is not None:
                _check_tensor(name, t, x.device)
    return m, k, n, g


# ------------------------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class GemmPlan:
    config: GemmConfig
    splits: int
    tiles_per_split: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class GemvPlan:
    config: GemvConfig
    gs: int
    splits: int
    steps_per_warp: int
    grid: tuple[int, int]


def choose_splits(ctas: int, tiles: int, num_sms: int, m: int, k: int, max_splits: int = 16) -> int:
    """Smallest split-k that fills the SMs about once, while the fp32 partials (written and read back) stay
    under a quarter of the weight bytes: 8 M N splits <= K N / 8."""
    if ctas >= num_sms:
        return 1
    cap = max(1, min(max_splits, tiles, k // (64 * max(m, 1))))
    want = math.ceil(num_sms / ctas)
    return max(1, min(cap, want))


def plan_gemm(
    m: int, n: int, k: int, num_sms: int, config: GemmConfig | str | None = None, splits: int | None = None
) -> GemmPlan:
    """Config, split-k and grid for one GEMM (pure arithmetic; testable without a GPU)."""
    if isinstance(config, str):
        config = GEMM_CONFIGS[config]
    if config is None:
        name = next(c for bound, c in TUNED_GEMM if m <= bound)
        config = GEMM_CONFIGS[name]
        if k % config.bks:
            config = GEMM_CONFIGS[next(c for bound, c in FALLBACK_GEMM if m <= bound)]
    if k % config.bks:
        raise ValueError(f"config {config.name} needs K % {config.bks} == 0, got K={k}")
    tiles = k // config.bks
    ctas = math.ceil(n / config.bn) * math.ceil(m / config.bm)
    s = choose_splits(ctas, tiles, num_sms, m, k) if splits is None else splits
    s = max(1, min(s, tiles))
    per = math.ceil(tiles / s)
    s = math.ceil(tiles / per)  # every split non-empty
    return GemmPlan(config, s, per, (math.ceil(n / config.bn), math.ceil(m / config.bm), s))


def plan_gemv(
    m: int, n: int, k: int, g: int, num_sms: int, config: GemvConfig | str | None = None, splits: int | None = None
) -> GemvPlan:
    """The k16 steps are cut into runs per warp (a multiple of the ring depth, so that scale groups align);
    enough CTAs x warps to fill the SMs, splitting across CTAs only when N alone does not."""
    if isinstance(config, str):
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

_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _ptr(t: torch.Tensor | None) -> object:
    return t if t is not None else ctypes.c_void_p(0)


def _reduce(
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    source: str,
    defines: dict,
    m: int,
    n: int,
    splits: int,
) -> None:
    kern = jit.load_kernel(source, "quick_splitk_reduce", defines, out.device.index)
    total4 = m * n // 4
    grid = min(math.ceil(total4 / 256), 4 * num_sms(out.device))
    kern((grid,), (256,), [ws, _ptr(bias), out, m, n, splits])


def _out(out: torch.Tensor | None, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {x.device}")
    return out


def gemm(x, qweight, scales, zeros, group_size, bias=None, *, config=None, splits=None, out=None) -> torch.Tensor:
    """The mma.sync GEMM for any M >= 1 (``config``/``splits`` override the tuned choice; ``out`` may be a
    caller's buffer, e.g. a poisoned one in tests)."""
    m, k, n, g = validate(x, qweight, scales, zeros, group_size, bias)
    if m == 0:
        return _out(out, 0, n, x)
    p = plan_gemm(m, n, k, num_sms(x.device), config, splits)
    cfg = p.config
    major = torch.cuda.get_device_capability(x.device)[0]
    if cfg.smem_bytes > SMEM_LIMIT.get(major, SMEM_LIMIT[9]):
        raise ValueError(f"config {cfg.name} needs {cfg.smem_bytes} bytes of shared memory, over this GPU's limit")
    with torch.cuda.device(x.device):
        defines = cfg.defines(x.dtype)
        kern = jit.load_kernel(GEMM_SOURCE, "quick_gemm", defines, x.device.index)
        out = _out(out, m, n, x)
        ws = torch.empty((p.splits, m, n), dtype=torch.float32, device=x.device) if p.splits > 1 else None
        gshift = int(math.log2(g)) if g < cfg.bks else 30
        kern(
            p.grid,
            (cfg.threads,),
            [x, qweight, scales, zeros, _ptr(bias), out, _ptr(ws), m, n, k, g, gshift, p.tiles_per_split],
            smem=cfg.smem_bytes,
        )
        if ws is not None:
            _reduce(ws, bias, out, GEMM_SOURCE, defines, m, n, p.splits)
    return out


def gemv(x, qweight, scales, zeros, group_size, bias=None, *, config=None, splits=None, out=None) -> torch.Tensor:
    """The decode kernel, M <= 8."""
    m, k, n, g = validate(x, qweight, scales, zeros, group_size, bias)
    if m > GEMV_MAX_M:
        raise ValueError(f"the GEMV handles M <= {GEMV_MAX_M} rows, got M={m}; use gemm()")
    if m == 0:
        return _out(out, 0, n, x)
    p = plan_gemv(m, n, k, g, num_sms(x.device), config, splits)
    cfg = p.config
    with torch.cuda.device(x.device):
        defines = cfg.defines(x.dtype, g)
        kern = jit.load_kernel(GEMV_SOURCE, "quick_gemv", defines, x.device.index)
        out = _out(out, m, n, x)
        ws = torch.empty((p.splits, m, n), dtype=torch.float32, device=x.device) if p.splits > 1 else None
        kern(
            p.grid,
            (cfg.threads,),
            [x, qweight, scales, zeros, _ptr(bias), out, _ptr(ws), m, n, k, g, p.steps_per_warp],
            smem=cfg.smem_bytes,
        )
        if ws is not None:
            _reduce(ws, bias, out, GEMV_SOURCE, defines, m, n, p.splits)
    return out


def quick_matmul(x, qweight, scales, zeros, group_size, bias=None, *, out=None) -> torch.Tensor:
    """``x @ dequant(W) (+ bias)``: the GEMV for M <= 8, the GEMM otherwise."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_M:
        return gemv(x, qweight, scales, zeros, group_size, bias, out=out)
    return gemm(x, qweight, scales, zeros, group_size, bias, out=out)


def is_available(x: torch.Tensor) -> bool:
    """A CUDA tensor on an sm_80+ device, fp16/bf16, K a multiple of 64, and nvcc to build the kernels."""
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES):
        return False
    if x.shape[-1] % 64 or torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    try:
        jit.find_nvcc()
    except jit.KernelUnavailable:
        return False
    return True
