"""W4A8 on the int8 tensor cores (sm_80+): activation quantization + ``mma.sync.m16n8k32`` GEMM, layout ``w4a8``.

``linear_w4a8(x2d, packed, group_size, bias=None)`` computes the W4A8 product of :mod:`quick.formats.w4a8`
(``y = s_x[m] * s_ch[n] * sum_k x_q * q * s_g (+ bias)``, output in x's dtype) for weights packed by
:func:`quick.formats.layouts.pack_w4a8`. Two launches: ``quick_actquant_*`` (``csrc/quick_actquant.cu``;
x -> int8 x_q + fp32 s_x, bit-exact with ``quantize_activations``) and ``quick_w4a8_gemm`` (``csrc/quick_w4a8.cu``),
plus ``quick_w4a8_reduce`` when split-k pays (small M). Everything before the float epilogue is exact integer
arithmetic, so results are bitwise reproducible and independent of the split.

The activation quantization is public (:func:`quantize_activations_cuda`, op ``quick::quantize_act_w4a8``): the
Hopper W4A8 kernel (layout ``w4a8_sm90``) reuses it. Ops: ``quick::gemm_w4a8`` (whole product, fake impl for
torch.compile). CPU tensors take the float64 reference (:func:`quick.formats.w4a8.w4a8_reference`).

``VARIANTS`` lists every (source, defines, archs) this module can launch (``python -m quick.kernels.compile_check``).
"""

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quick.formats.weights import SUPPORTED_DTYPES
from quick.kernels import jit, mma
from quick.kernels.mma import (
    TileConfig,
    _check_bias_dtype,
    _dev_index,
    _FastLaunch,
    _reduce_launch,
    _remember,
    capability,
    dtype_code,
    num_sms,
    split_grid,
    split_model,
)

GEMM_SOURCE = "quick_w4a8.cu"
ACTQ_SOURCE = "quick_actquant.cu"
ARCHS = ("sm_80", "sm_90a")
LAYOUT = "w4a8"
ACTQ_THREADS = 512  # must match THREADS in csrc/quick_actquant.cu
GROUPS = (-1, 128)
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}


class W4A8Error(ValueError):
    """Inputs the W4A8 kernels cannot take; the message says which and why."""


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class W4A8Config(TileConfig):
    """One compiled GEMM variant: ``warps_m x warps_n x warps_k`` warps; a warp owns ``bm / warps_m`` rows,
    ``nb`` n32 blocks and ``sw`` k32 steps of every stage (a stage spans ``bks = 32 * sw * warps_k`` columns of
    K); ``stages`` cp.async stages of int8 activations; ``pf`` stages of weights prefetched into registers;
    ``inred`` = 1: split-k summed by the last CTA of each tile (no reduce launch); ``u8`` = 1 (per-group only):
    weights fed as unsigned q + 8 with the zero point folded into the first mma of each group run (C = -8 * the
    activations' group sums), so the group fold is one multiply-add per accumulator."""

    N_BLOCK: ClassVar[int] = 32
    K_STEP: ClassVar[int] = 32

    u8: int = 0

    @property
    def smem_bytes(self) -> int:
        """STAGES x (BM rows of BKS int8 + 16 bytes padding), or the k-slice reduction buffer if larger."""
        return max(self.stages * self.bm * (self.bks + 16), self._reduction_bytes())

    def fits(self, group: int) -> bool:
        """Whether the accumulators fit the register budget without spilling: per-group tiles hold a partial and
        a total (twice the int32 registers); ``minb = 2`` caps a thread at 128 registers."""
        if self.u8 and group <= 0:
            return False  # the unsigned variant is a per-group variant (per-channel would build the plain kernel)
        acc = (self.bm // self.warps_m // 16) * self.nb * 16 * (2 if group > 0 else 1)
        cap = min(255, 65536 // (self.threads * self.minb))  # registers per thread
        return acc <= (144 if cap >= 255 else 64)

    def defines(self, dtype: torch.dtype, group: int) -> dict[str, int]:
        return {
            "QW_DTYPE": dtype_code(dtype),
            "QW_GROUP": max(group, 0),
            "QW_BM": self.bm,
            "QW_WM": self.warps_m,
            "QW_WN": self.warps_n,
            "QW_WK": self.warps_k,
            "QW_NB": self.nb,
            "QW_SW": self.sw,
            "QW_STAGES": self.stages,
            "QW_PF": self.pf,
            "QW_MINB": self.minb,
            "QW_INRED": self.inred,
            "QW_U8": self.u8 if group > 0 else 0,
        }


CONFIGS: dict[str, W4A8Config] = {
    c.name: c
    for c in (
        # small M: one m16 tile per warp, 4 warps split K inside the CTA, weights PF stages ahead
        W4A8Config("m16n2k4", 16, 1, 2, 4, 2, 2, 3, 2),
        W4A8Config("m16k4", 16, 1, 1, 4, 2, 1, 4, 4),  # stage of 128: any K % 128 == 0
        W4A8Config("m16n2k4r", 16, 1, 2, 4, 2, 2, 3, 2, inred=1),  # split-k reduced in the kernel
        W4A8Config("m32n2k4", 32, 1, 2, 4, 2, 2, 3, 2),
        # medium / large M: 64 rows per warp (4 m16 tiles) so that the int4 -> int8 conversion is amortized
        W4A8Config("m64n4", 64, 1, 4, 1, 2, 4, 4, 1),
        W4A8Config("m64n4g", 64, 1, 4, 1, 1, 4, 4, 1),  # per-group: partial + total accumulators
        W4A8Config("m128n4", 128, 2, 4, 1, 2, 4, 4, 1),
        W4A8Config("m128n4g", 128, 2, 4, 1, 1, 4, 4, 1),
        # candidates for medium / large M (tested; picked by TUNED once timed): more warps per SM
        W4A8Config("m64n2k2", 64, 1, 2, 2, 2, 4, 4, 1),
        W4A8Config("m64w2n4", 64, 2, 4, 1, 2, 4, 4, 1, minb=2),
        W4A8Config("m128w4n2", 128, 4, 2, 1, 2, 4, 3, 1, minb=2),
        W4A8Config("m256n2", 256, 4, 2, 1, 2, 4, 3, 1),
        W4A8Config("m64n8g", 64, 1, 8, 1, 1, 4, 4, 1),
        W4A8Config("m128w4n2g", 128, 4, 2, 1, 1, 4, 3, 1, minb=2),
        W4A8Config("m128w4n4g", 128, 4, 4, 1, 1, 4, 3, 1),
        # unsigned-weight per-group variants (one multiply-add per accumulator and group)
        W4A8Config("m16n2k2u", 16, 1, 2, 2, 2, 4, 3, 2, u8=1),  # a run must cover a group: sw = 4
        W4A8Config("m64n4gu", 64, 1, 4, 1, 1, 4, 4, 1, u8=1),
        W4A8Config("m128n4gu", 128, 2, 4, 1, 1, 4, 4, 1, u8=1),
    )
}

# (largest M of the bucket, per-channel configs, per-group configs), in order of preference; the first whose
# stage divides K is used, the last of each list has a stage of 128 (any valid K). M >= 33 from an H100 sweep
# (benchmarks/kernel.py --sweep-w4a8-large, K = N = 8192 and 4096, activation quantization included):
# per-channel m64n8g (8 warps of 64 x 32) at M <= 256 (61.2 us vs 88.2 for m64n4 at 8192^2 x 256), m64n4 above
# (214.5 / 814.5 us at M = 1024 / 4096 vs 236.4 / 905.3 for m128n4); per-group m64n4g everywhere (84.5 / 308.3 /
# 1237.8 us at M = 256 / 1024 / 4096). The unsigned-weight variants (u8) measured slower (388 vs 308 us at
# M = 1024) and stay candidates. M <= 32: not yet swept.
TUNED: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (16, ("m16n2k4", "m16k4"), ("m16n2k4", "m16k4")),
    (32, ("m32n2k4", "m16k4"), ("m32n2k4", "m16k4")),
    (256, ("m64n8g",), ("m64n4g",)),
    (1 << 62, ("m64n4",), ("m64n4g",)),
]


def _all_variants() -> list[tuple[str, dict[str, int], tuple[str, ...]]]:
    out: list[tuple[str, dict[str, int], tuple[str, ...]]] = []
    pc_names = {c for _, pc, _ in TUNED for c in pc}
    pg_names = {c for _, _, pg in TUNED for c in pg}
    used = pc_names | pg_names
    for dt in SUPPORTED_DTYPES:
        for name in sorted(used):
            cfg = CONFIGS[name]
            for g in GROUPS:
                if name not in (pg_names if g > 0 else pc_names):
                    continue  # only the (config, mode) pairs the tuned table can pick
                out.append((GEMM_SOURCE, cfg.defines(dt, g), ARCHS))
    out.append((ACTQ_SOURCE, {}, ARCHS))
    return out


VARIANTS: list[tuple[str, dict[str, int], tuple[str, ...]]] = _all_variants()


# --------------------------------------------------------------------------------------------- validation


def _check_tensor(name: str, t: Tensor, device: torch.device) -> None:
    mma._check_tensor(name, t, device, W4A8Error, ".clone() the view")


def validate(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None = None, need_cuda: bool = True,
) -> tuple[int, int, int]:  # fmt: skip
    """Check every assumption of the kernels; returns ``(M, K, N)``. Works on meta/fake tensors when
    ``need_cuda`` is False. Raises ``TypeError`` (types, dtypes) or :class:`W4A8Error` (a ValueError)."""
    mma._check_x(x, W4A8Error)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32 (layout 'w4a8'), got {getattr(qweight, 'dtype', type(qweight))}")
    if not isinstance(channel_scale, torch.Tensor) or channel_scale.dtype != torch.float32:
        raise TypeError(f"channel_scale must be float32, got {getattr(channel_scale, 'dtype', type(channel_scale))}")
    if group_size not in GROUPS:
        raise W4A8Error(f"group_size must be one of {GROUPS} (-1 = per-channel), got {group_size}")
    _check_bias_dtype(bias, x)
    need = "W4A8 kernels need K % 128 == 0 and N % 32 == 0"
    m, k, n = mma._packed_dims(x, qweight, 32, 4, "w4a8", (128, 32), need, W4A8Error)
    if tuple(channel_scale.shape) != (n,):
        raise W4A8Error(f"channel_scale must have shape [{n}], got {tuple(channel_scale.shape)}")
    if group_size > 0:
        if not isinstance(group_scale, torch.Tensor) or group_scale.dtype != torch.int8:
            raise TypeError(
                f"group_size={group_size} needs group_scale int8 [K/G, N] (layout 'w4a8'), "
                f"got {getattr(group_scale, 'dtype', type(group_scale).__name__)}"
            )
        if tuple(group_scale.shape) != (k // group_size, n):
            raise W4A8Error(f"group_scale has shape {tuple(group_scale.shape)}, expected {(k // group_size, n)}")
    elif group_scale is not None:
        raise W4A8Error("per-channel W4A8 (group_size=-1) takes no group_scale")
    if bias is not None and tuple(bias.shape) != (n,):
        raise W4A8Error(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    if need_cuda:
        if x.device.type != "cuda":
            raise W4A8Error(f"x is on {x.device}: the W4A8 kernels run on CUDA tensors (use linear_w4a8 on CPU)")
        if capability(x.device)[0] < 8:
            raise W4A8Error("the W4A8 kernels need an sm_80+ GPU (int8 mma.sync.m16n8k32)")
        named = (("x", x), ("qweight", qweight), ("channel_scale", channel_scale), ("group_scale", group_scale))
        mma._check_tensors((*named, ("bias", bias)), x.device, W4A8Error, ".clone() the view")
    return m, k, n


# ------------------------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class W4A8Plan(mma.SplitKPlan):
    config: W4A8Config


# Rough H100 int8 mma.sync ops/s for the split-k model (ratios matter; the DRAM rate and the reduce launch cost are
# those of the W4A16 model, mma.split_model).
_MMA_RATE = 5.0e14


def choose_splits(cfg: W4A8Config, m: int, n: int, k: int, sms: int, max_splits: int = 16) -> int:
    """Split-k minimising the main kernel's floor (weight bytes or MMA time) over the fraction of SMs / CTA slots
    its grid fills, plus the int32 partials' traffic and the reduce launch (same model as the W4A16 GEMM)."""
    return split_model(cfg, m, n, k, sms, max_splits, _MMA_RATE)


def plan(
    m: int, n: int, k: int, group_size: int, sms: int, config: W4A8Config | str | None = None, splits: int | None = None
) -> W4A8Plan:
    """Config, split-k and grid for one GEMM (pure arithmetic; testable without a GPU)."""
    if isinstance(config, str):
        config = CONFIGS[config]
    if config is None:
        _, pc, pg = next(t for t in TUNED if m <= t[0])
        names = pg if group_size > 0 else pc
        config = next((CONFIGS[c] for c in names if k % CONFIGS[c].bks == 0), CONFIGS[names[-1]])
    if k % config.bks:
        raise W4A8Error(f"config {config.name} needs K % {config.bks} == 0, got K={k}")
    s = choose_splits(config, m, n, k, sms) if splits is None else splits
    return W4A8Plan(config, *split_grid(config, m, n, k, s))


# ------------------------------------------------------------------------------------------------ launch


@dataclass
class _Launch(mma._Launch):
    u8: bool = False  # unsigned-weight variant: needs the activations' per-group sums


_LAUNCH: dict[tuple, _Launch] = {}
_ACTQ: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _get_launch(m, n, k, g, dtype, dev, config, splits) -> _Launch:
    key = (m, n, k, g, dtype, dev, config, splits)
    hit = _LAUNCH.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        idx = _dev_index(dev)
        p = plan(m, n, k, g, num_sms(dev), config, splits)
        cfg = p.config
        if cfg.smem_bytes > SMEM_LIMIT.get(capability(dev)[0], SMEM_LIMIT[9]):
            raise W4A8Error(f"config {cfg.name} needs {cfg.smem_bytes} bytes of shared memory, over the limit")
        defines = cfg.defines(dtype, g)
        kern = jit.load_kernel(GEMM_SOURCE, "quick_w4a8_gemm", defines, idx)
        # pointers: xq, sx, qweight, chscale, gscale, bias, out, ws, counters, xsum; scalars: M, N, K, tiles/split
        main = _FastLaunch(kern, p.grid, (cfg.threads,), cfg.smem_bytes, [None] * 10 + [m, n, k, p.tiles_per_split])
        red = None
        inred = bool(cfg.inred and p.splits > 1)
        if p.splits > 1 and not inred:
            red = _reduce_launch(GEMM_SOURCE, defines, idx, m, n, p.splits, "quick_w4a8_reduce", nptr=5)
        launch = _Launch(main, red, p.splits, p.grid[0] * p.grid[1] if inred else 0, bool(cfg.u8 and g > 0))
        _remember(_LAUNCH, key, launch)
    return launch


def _actq_launch(m: int, k: int, dtype: torch.dtype, dev: torch.device) -> _FastLaunch:
    key = (m, k, dtype, dev)
    hit = _ACTQ.get(key)
    if hit is None:
        with _LOCK:
            name = "quick_actquant_f16" if dtype == torch.float16 else "quick_actquant_bf16"
            kern = jit.load_kernel(ACTQ_SOURCE, name, {}, _dev_index(dev))
            hit = _FastLaunch(kern, (m,), (ACTQ_THREADS,), 0, [None] * 4 + [m, k])
            _remember(_ACTQ, key, hit)
    return hit  # type: ignore[return-value]


_COUNTERS: dict[tuple[int, int], Tensor] = {}


def _counters(dev: torch.device, n: int) -> Tensor:
    """Zeroed split-k arrival counters of the current stream (:func:`quick.kernels.mma._counters`)."""
    return mma._counters(dev, n, torch.cuda.current_stream(dev).cuda_stream, _COUNTERS)


def quantize_activations_cuda(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_q int8 [M, K], s_x fp32 [M])`` of a CUDA ``x [M, K]`` fp16/bf16, bit-exact with
    :func:`quick.formats.w4a8.quantize_activations` (K % 8 == 0, contiguous, 16-byte aligned)."""
    xq, sx, _ = _quantize(x, sums=False)
    return xq, sx


def _quantize(x: Tensor, sums: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The activation kernel; ``sums``: also int32 ``[M, K/128]`` sums of x_q per group of 128 (K % 128 == 0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] % 8 or (sums and x.shape[1] % 128):
        raise W4A8Error(f"x must be 2-D [M, K] with K % 8 == 0, got shape {tuple(x.shape)}")
    if x.device.type != "cuda":
        raise W4A8Error(f"x is on {x.device}: quantize_activations_cuda needs a CUDA tensor")
    _check_tensor("x", x, x.device)
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)
    xs = torch.empty((m, k // 128), dtype=torch.int32, device=x.device) if sums else None
    if m:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ptrs = [x.data_ptr(), xq.data_ptr(), sx.data_ptr(), xs.data_ptr() if xs is not None else 0]
        _actq_launch(m, k, x.dtype, x.device)(ptrs, stream)
    return xq, sx, xs


def gemm_w4a8_cuda(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None = None, *, config: W4A8Config | str | None = None, splits: int | None = None,
    out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Activation quantization + the int8 GEMM on CUDA tensors (``config``/``splits`` override the tuned
    choice; ``out`` may be a caller's buffer, e.g. a poisoned one in tests)."""
    m, k, n = validate(x, qweight, channel_scale, group_scale, group_size, bias)
    out = jit.out_buffer(out, m, n, x.dtype, x.device, W4A8Error)
    if m == 0:
        return out
    launch = _get_launch(m, n, k, group_size, x.dtype, x.device, config, splits)
    xq, sx, xs = _quantize(x, sums=launch.u8)
    return _gemm(launch, xq, sx, xs, qweight, channel_scale, group_scale, bias, out)


def gemm_w4a8_q(
    xq: Tensor, sx: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None, out_dtype: torch.dtype, *, config: W4A8Config | str | None = None,
    splits: int | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The GEMM on already quantized activations (``xq`` int8 [M, K], ``s_x`` fp32 [M], as
    :func:`quantize_activations_cuda` writes them; inputs validated by the caller, e.g.
    :func:`quick.kernels.select.matmul_quantized`); [M, N] in ``out_dtype``."""
    m, k = xq.shape
    n = channel_scale.shape[0]
    out = jit.out_buffer(out, m, n, out_dtype, xq.device, W4A8Error)
    if m == 0:
        return out
    launch = _get_launch(m, n, k, group_size, out_dtype, xq.device, config, splits)
    # the unsigned-weight variants also read the activations' sums per group of 128 (rarely chosen: torch sums them)
    xs = xq.view(m, k // 128, 128).sum(-1, dtype=torch.int32) if launch.u8 else None
    return _gemm(launch, xq, sx, xs, qweight, channel_scale, group_scale, bias, out)


def _gemm(launch: _Launch, xq: Tensor, sx: Tensor, xs: Tensor | None, qweight: Tensor, channel_scale: Tensor,
          group_scale: Tensor | None, bias: Tensor | None, out: Tensor) -> Tensor:  # fmt: skip
    m, n = out.shape
    dev = xq.device
    stream = torch.cuda.current_stream(dev).cuda_stream
    bptr = bias.data_ptr() if bias is not None else 0
    gptr = group_scale.data_ptr() if group_scale is not None else 0
    base = [xq.data_ptr(), sx.data_ptr(), qweight.data_ptr(), channel_scale.data_ptr(), gptr, bptr, out.data_ptr()]
    xsp = xs.data_ptr() if xs is not None else 0
    if launch.splits == 1:
        launch.main([*base, 0, 0, xsp], stream)
        return out
    ws = torch.empty((launch.splits, m, n), dtype=torch.int32, device=dev)
    if launch.counters:
        launch.main([*base, ws.data_ptr(), _counters(dev, launch.counters).data_ptr(), xsp], stream)
        return out
    launch.main([*base, ws.data_ptr(), 0, xsp], stream)
    assert launch.reduce is not None
    launch.reduce([ws.data_ptr(), sx.data_ptr(), channel_scale.data_ptr(), bptr, out.data_ptr()], stream)
    return out


# ------------------------------------------------------------------------------------ ops and dispatch


def _flatten(x: Tensor) -> Tensor:
    return mma._flatten(x, W4A8Error)


def is_available(x: Tensor) -> bool:
    """A CUDA fp16/bf16 tensor on an sm_80+ device, K % 128 == 0, and nvcc to build the kernels (N % 32 == 0 holds
    for every ``w4a8``-packed weight)."""
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES):
        return False
    if x.shape[-1] % 128 or capability(x.device)[0] < 8:
        return False
    return jit.nvcc_available()
