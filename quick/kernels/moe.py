"""Launcher of the grouped W4A16 mixture-of-experts GEMM (``csrc/quick_moe.cu``, mma.sync, sm_80 and newer).

``grouped_gemm(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k, ...)`` computes,
for every slot ``s`` that a sorted-token plan (:func:`quick.nn.moe.build_plan`) names, ``out[s] = x[s // top_k] @
dequant(W[e])`` where ``e`` is the expert of the plan block holding ``s``; the experts' weights are a
:class:`~quick.nn.moe.QuickExpertStack` in the ``quick`` layout (``qweight [E, K/16, 2N]``, ``scales`` / ``zeros``
``[E, K/G, N]``). ``top_k = 1`` reads one input row per slot (the down projection). ``topk_weights [slots]``
multiplies each output row in the epilogue; ``act`` (``"silu"``, ...) treats W as a gate|up stack ``[K, 2I]`` and
writes ``act(gate) * up`` (``I`` columns). Rows that no slot of the plan names are zero.

The plan's block size is the kernel's row tile (:data:`BLOCK_SIZES`): 16 rows for decode-sized batches, where an
expert gets a few rows, 64 once experts get tens of rows (:func:`block_size_for`). Nothing here reads the plan on the
host, so a launch can be captured in a CUDA graph; :func:`check_ids` is the optional host check of the ids.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from quick.formats.weights import SUPPORTED_DTYPES
from quick.kernels import decode as qd
from quick.kernels import jit, wgmma
from quick.kernels import mma as qm

SOURCE = "quick_moe.cu"
KERNEL = "quick_moe_gemm"
ARCHS = ("sm_80", "sm_90a")  # mma.sync: one kernel serves Ampere and Hopper
# Activations the gated epilogue computes (transformers' ACT2FN names) -> the kernel's code; "" = no activation.
ACTS = {"": 0, "silu": 1, "swish": 1, "gelu": 2, "gelu_pytorch_tanh": 3, "relu": 4}
# The same activations as PyTorch functions (the reference path, and the step between two grouped products).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def gated(h: Tensor, act: str, row_weights: Tensor | None = None) -> Tensor:
    """``act(gate) * up`` of a gate|up product ``h [rows, 2I]`` (times ``row_weights [rows]``) in fp32, rounded once
    to ``h``'s dtype (as the kernels' gated epilogues and the decode kernel's staging compute it)."""
    i = h.shape[-1] // 2
    y = ACTIVATIONS[act](h[..., :i].float()) * h[..., i:].float()
    if row_weights is not None:
        y = y * row_weights.reshape(-1, 1).float()
    return y.to(h.dtype)


class MoEKernelError(ValueError):
    """Inputs the grouped kernel cannot take; the message says which and why."""


@dataclass(frozen=True)
class MoEConfig(qm.TileShape):
    """One compiled variant: a CTA takes ``bm`` sorted rows (the plan's block size) with ``warps_m x warps_n x
    warps_k`` warps; a warp owns ``bm / warps_m`` rows, ``nb`` n64 weight blocks (gated: half gate, half the matching
    up blocks) and ``sw`` k16 steps of every stage; ``stages`` cp.async stages of activations, ``pf`` stages of weights
    prefetched into registers. ``bn``: weight columns of a CTA (gated: half of them gate, half up)."""

    N_BLOCK: ClassVar[int] = 64
    K_STEP: ClassVar[int] = 16

    @property
    def smem_bytes(self) -> int:
        """Mirror of the kernel: stages x (gathered A tile with 16-byte row padding + scale and zero rows), or the
        k-slice reduction buffer if larger (static row indices not counted)."""
        stage = self.bm * (self.bks + 8) * 2 + 2 * max(1, self.bks // 32) * self.bn * 2
        return max(self.stages * stage, self._reduction_bytes())

    def defines(self, dtype: torch.dtype, gated: bool) -> dict[str, int]:
        return {
            "QM_DTYPE": qm.dtype_code(dtype),
            "QM_BM": self.bm,
            "QM_WM": self.warps_m,
            "QM_WN": self.warps_n,
            "QM_WK": self.warps_k,
            "QM_NB": self.nb,
            "QM_SW": self.sw,
            "QM_STAGES": self.stages,
            "QM_PF": self.pf,
            "QM_GATED": int(gated),
        }

    def n_tiles(self, n: int, gated: bool) -> int:
        """CTAs along N: gated, a CTA writes ``bn / 2`` of the ``N / 2`` output columns."""
        return math.ceil(n / self.bn)


CONFIGS: dict[str, MoEConfig] = {
    c.name: c
    for c in (
        # decode: 16 rows, 8 warps splitting K (256 columns a stage), 2 stages of weights in registers per warp
        MoEConfig("m16k8", 16, 1, 1, 8, 2, 2, 3, 2),
        # decode, any K that is a multiple of 64: 4 warps of one k16 step, 3 stages of weights in flight (4 spill)
        MoEConfig("m16k4", 16, 1, 1, 4, 2, 1, 4, 3),
        # prefill: 64 rows (one m16 tile per warp: two spill at sm_90a) x 256 weight columns, no k split
        MoEConfig("m64", 64, 4, 2, 1, 2, 4, 4, 1),
    )
}
BLOCK_SIZES = tuple(sorted({c.bm for c in CONFIGS.values()}))
# Experts average at least this many rows: the 64-row tile (its padding costs less than re-reading weights per 16 rows).
ROWS_FOR_64 = 48


# The grouped wgmma GEMM (quick_sm90 stacks) takes larger plan blocks (= its token tile, as the dense kernel's tiles
# grow with M): each weight fragment is dequantized once per block, and prefill is bound by that. A block of B rows
# once the experts average 2B rows, so that padding (B / 2 rows an expert on average) stays near a quarter.
SM90_BLOCK_SIZES = (16, 64, 128, 256)
SM90_G32_MAX_BLOCK = 128  # group size 32 stops at 128 tokens a tile (its scale rows and 128 accumulators: C7515)
# The largest block the automatic choice takes: the 128- and 256-row variants are built and tested, but no timing
# stands behind picking them yet (benchmarks/moe_kernel.py --sm90-max-block times them).
SM90_AUTO_MAX_BLOCK = 64


def block_size_for(
    tokens: int, top_k: int, num_experts: int, layout: str = "quick", group_size: int = 128,
    max_block: int = SM90_AUTO_MAX_BLOCK,
) -> int:  # fmt: skip
    """The plan block size (= row tile) for a batch: 64 once the experts average :data:`ROWS_FOR_64` rows, else 16;
    for ``quick_sm90`` stacks also 128 / 256 once they average 256 / 512 rows, up to ``max_block`` (128 at most for
    group size 32)."""
    rows = tokens * top_k
    if layout == "quick_sm90":
        top = min(max_block, SM90_G32_MAX_BLOCK if group_size == 32 else SM90_BLOCK_SIZES[-1])
        for b in (256, 128):
            if b <= top and rows >= 2 * b * num_experts:
                return b
    return 64 if rows >= ROWS_FOR_64 * num_experts else 16


def configs_for(block_size: int, k: int) -> list[MoEConfig]:
    """The variants with row tile ``block_size`` whose stage divides K, in order of preference."""
    return [c for c in CONFIGS.values() if c.bm == block_size and k % c.bks == 0]


def default_config(block_size: int, k: int) -> MoEConfig:
    cands = configs_for(block_size, k)
    if not cands:
        raise MoEKernelError(f"no grouped-GEMM variant takes block size {block_size} with K={k}")
    return cands[0]


def _all_variants() -> list[tuple[str, dict[str, int], tuple[str, ...]]]:
    return [
        (SOURCE, cfg.defines(dt, gated), ARCHS)
        for dt in SUPPORTED_DTYPES
        for cfg in CONFIGS.values()
        for gated in (False, True)
    ]


def plan_capacity(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """Rows of ``sorted_ids`` that every routing of ``num_tokens x top_k`` slots fits, a multiple of ``block_size``:
    each expert adds at most ``block_size - 1`` padding rows, and no slot makes more than one block."""
    slots = num_tokens * top_k
    bound = min(slots + num_experts * (block_size - 1), slots * block_size)
    return -(-bound // block_size) * block_size


# The one-launch sorted-token plan (csrc/quick_moe_plan.cu): int32 or int64 expert ids.
PLAN_SOURCE = "quick_moe_plan.cu"
PLAN_KERNEL = "quick_moe_plan"
PLAN_THREADS = 1024
PLAN_MAX_EXPERTS = 1024  # the kernel's shared arrays
# One warp places the slots 32 at a time: beyond this many (prefill) the PyTorch plan is faster.
PLAN_MAX_SLOTS = 4096
PLAN_VARIANTS = [(PLAN_SOURCE, {"QP_IDX64": v}, ARCHS) for v in (0, 1)]

# The router's softmax top-k and the plan in one launch (csrc/quick_moe_route.cu): 16-bit logits, E <= 32 * EPL.
ROUTE_SOURCE = "quick_moe_route.cu"
ROUTE_KERNEL = "quick_moe_route"
ROUTE_EPL = (4, 8, 16)  # experts per lane; 32 would spill at 1024 threads
ROUTE_MAX_EXPERTS = 32 * ROUTE_EPL[-1]
ROUTE_MAX_TOPK = 32  # one choice per lane
ROUTE_MAX_SLOTS = 4096  # the kernel's shared array of chosen ids
ROUTE_DTYPES = (torch.float16, torch.bfloat16)
ROUTE_VARIANTS = [(ROUTE_SOURCE, {"QR_BF16": b, "QR_EPL": p}, ARCHS) for b in (0, 1) for p in ROUTE_EPL]

# Decode sizes (16-row plans): the decode kernel over the experts (csrc/quick_dec.cu, QD_GROUPED) in two launches,
# gate|up plain into [slots, 2I], then down staging act(gate) * up from it (QD_ACT) with the slot weights. One config
# per stack layout: the weight as the mma B operand (`quick`, 64 channels a warp) or the A operand (`quick_sm90`,
# four blocks of 16 channels a warp), 64 channels per CTA either way.
DEC_CONFIGS = {"quick": qd.DecConfig(1, 8, 4, wb=1), "quick_sm90": qd.DecConfig(4, 8, 4)}
DEC_CONFIG = DEC_CONFIGS["quick"]
DEC_ACTS = {"": 0, "silu": 1, "swish": 1}  # the down launch's QD_ACT; other activations take the grouped GEMM
DEC_VARIANTS = [
    (qd.SOURCE, {**cfg.defines(16, g, dt, act), "QD_GROUPED": 1}, qd.ARCHS)
    for cfg in DEC_CONFIGS.values()
    for dt in SUPPORTED_DTYPES
    for g in (128, 32)  # QD_G32 off / on (every other group size is a shift of the former)
    for act in sorted(set(DEC_ACTS.values()))
]

# Every (source, defines, archs) this module may launch (the compile check builds them all).
VARIANTS: list[tuple[str, dict[str, int], tuple[str, ...]]] = (
    _all_variants() + PLAN_VARIANTS + ROUTE_VARIANTS + DEC_VARIANTS
)


# --------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class MoEDims:
    """The shapes of one grouped product: ``m`` input rows, ``slots = m * top_k`` output rows of ``n_out`` columns,
    ``e`` experts of ``[k, n]``, group size ``g`` (resolved), plan ``blocks`` of ``block_size`` rows."""

    m: int
    k: int
    n: int
    e: int
    g: int
    slots: int
    n_out: int
    blocks: int
    block_size: int


# Stacked layouts of the grouped kernels: qweight [E, K / a, b * N] for (a, b) here.
STACK_SHAPES = {"quick": (16, 2), "quick_sm90": (64, 8)}


def _is_int32_vector(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1


def validate(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None, act: str = "",
    need_cuda: bool = True, layout: str = "quick",
) -> MoEDims:  # fmt: skip
    """Every assumption of the kernel, checked; ``TypeError`` for types and dtypes, :class:`MoEKernelError` for shapes,
    devices, layout and alignment. Works on meta / fake tensors with ``need_cuda=False`` (the op's fake). ``layout``:
    the stack's (:data:`STACK_SHAPES`)."""
    if layout not in STACK_SHAPES:
        raise MoEKernelError(f"no grouped kernel takes layout {layout!r}; layouts: {sorted(STACK_SHAPES)}")
    ka, nb = STACK_SHAPES[layout]
    shape = f"[E, K/{ka}, {nb}N] (layout {layout!r})"
    qm._check_x(x, MoEKernelError)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        got = getattr(qweight, "dtype", type(qweight).__name__)
        raise TypeError(f"qweight must be an int32 tensor {shape}, got {got}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype:
            got = getattr(t, "dtype", type(t).__name__)
            raise TypeError(f"{name} must have x's dtype {x.dtype} (the weights are dequantized in it), got {got}")
    for name, t in (("sorted_ids", sorted_ids), ("block_experts", block_experts), ("num_padded", num_padded)):
        if not _is_int32_vector(t):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 1-D int32 tensor (a plan from quick.nn.moe.build_plan), got {got}")
    if act not in ACTS:
        raise MoEKernelError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise MoEKernelError(f"top_k must be a positive int (input rows are sorted_ids // top_k), got {top_k!r}")
    m, k = x.shape
    if qweight.dim() != 3 or qweight.shape[2] % nb:
        raise MoEKernelError(f"qweight must be 3-D {shape} (a QuickExpertStack), got {tuple(qweight.shape)}")
    e, n = qweight.shape[0], qweight.shape[2] // nb
    if e < 1:
        raise MoEKernelError("qweight holds no expert")
    if k % 64 or n % 64:
        raise MoEKernelError(f"the grouped kernel needs K and N multiples of 64, got K={k}, N={n} (qweight {shape})")
    if qweight.shape[1] * ka != k:
        raise MoEKernelError(f"qweight has {qweight.shape[1]} k{ka} rows, x has K={k} (expected {k // ka})")
    if act and n % 128:
        raise MoEKernelError(f"a gate|up stack needs N = 2I with I a multiple of 64, got N={n}")
    try:
        g = qm.resolve_group(group_size, k)
    except ValueError as err:
        raise MoEKernelError(str(err)) from None
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (e, k // g, n):
            raise MoEKernelError(f"{name} must have shape [{e}, {k // g}, {n}] (E, K/G, N), got {tuple(t.shape)}")
    blocks = block_experts.shape[0]
    if blocks == 0 or sorted_ids.shape[0] % blocks:
        raise MoEKernelError(
            f"sorted_ids ({sorted_ids.shape[0]}) must hold a whole number of blocks of block_experts ({blocks})"
        )
    bs = sorted_ids.shape[0] // blocks
    sizes = SM90_BLOCK_SIZES if layout == "quick_sm90" else BLOCK_SIZES
    if bs not in sizes:
        raise MoEKernelError(f"plan block size {bs} has no kernel; block sizes: {sizes}")
    if layout == "quick" and not configs_for(bs, k):
        raise MoEKernelError(f"no variant with block size {bs} takes K={k}")
    if num_padded.shape[0] != 1:
        raise MoEKernelError(f"num_padded must hold one value, got shape {tuple(num_padded.shape)}")
    slots = m * top_k
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a floating-point tensor, got {getattr(topk_weights, 'dtype', None)}")
        if topk_weights.numel() != slots:
            raise MoEKernelError(f"topk_weights must hold one weight per slot ({slots}), got {topk_weights.numel()}")
    if need_cuda:
        if x.device.type != "cuda":
            raise MoEKernelError(f"x is on {x.device}: the grouped kernel runs on CUDA tensors")
        _check_devices(x, qweight, scales, zeros, sorted_ids, block_experts, num_padded, topk_weights)
    return MoEDims(m, k, n, e, g, slots, n // 2 if act else n, blocks, bs)


def _check_devices(x, qweight, scales, zeros, sorted_ids, block_experts, num_padded, topk_weights) -> None:
    """Every tensor on x's CUDA device, contiguous and aligned as the launch assumes; the routing weights need only
    the device (they are copied to dense fp32 at launch)."""
    named = (
        ("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("sorted_ids", sorted_ids),
        ("block_experts", block_experts), ("num_padded", num_padded),
    )  # fmt: skip
    qm._check_tensors(named, x.device, MoEKernelError)
    if topk_weights is not None and topk_weights.device != x.device:
        raise MoEKernelError(f"topk_weights is on {topk_weights.device} but x is on {x.device}")


def check_ids(sorted_ids: Tensor, block_experts: Tensor, num_slots: int, num_experts: int) -> None:
    """Host check (one synchronisation) that the plan's ids lie in range: slots in ``[0, num_slots]`` (``num_slots``
    is padding) and experts in ``[0, E)`` or -1. The kernel itself treats anything else as padding."""
    if sorted_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(sorted_ids))
        if lo < 0 or hi > num_slots:
            raise MoEKernelError(f"sorted_ids must lie in [0, {num_slots}] ({num_slots} = padding), got [{lo}, {hi}]")
    lo, hi = (int(v) for v in torch.aminmax(block_experts))
    if lo < -1 or hi >= num_experts:
        raise MoEKernelError(f"block_experts must lie in [0, {num_experts}) or be -1, got [{lo}, {hi}]")


# ------------------------------------------------------------------------------------------------ launch


@dataclass(frozen=True)
class MoELaunchPlan:
    config: MoEConfig
    grid: tuple[int, int]
    gshift: int


def plan_launch(d: MoEDims, gated: bool, config: MoEConfig | str | None = None) -> MoELaunchPlan:
    """Config, grid (row blocks, N tiles) and the scale-row shift for one launch (pure arithmetic)."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise MoEKernelError(f"unknown grouped-GEMM config {config!r}; known: {sorted(CONFIGS)}")
        config = CONFIGS[config]
    cfg = config or default_config(d.block_size, d.k)
    if cfg.bm != d.block_size or d.k % cfg.bks:
        raise MoEKernelError(
            f"config {cfg.name} takes block size {cfg.bm} and K % {cfg.bks} == 0, got {d.block_size}, K={d.k}"
        )
    gshift = int(math.log2(d.g)) if d.g < cfg.bks else 30
    return MoELaunchPlan(cfg, (d.blocks, cfg.n_tiles(d.n, gated)), gshift)


_LAUNCH: dict[tuple, qm._FastLaunch] = {}
_LOCK = threading.Lock()


def _launch(d: MoEDims, act: str, dtype: torch.dtype, dev: torch.device, config) -> qm._FastLaunch:
    key = (d, act, dtype, dev, config)
    hit = _LAUNCH.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        p = plan_launch(d, bool(act), config)
        idx = qm._dev_index(dev)
        kern = jit.load_kernel(SOURCE, KERNEL, p.config.defines(dtype, bool(act)), idx)
        scalars = [d.slots, d.slots // d.m if d.m else 1, d.e, d.n, d.k, d.g, p.gshift, ACTS[act]]
        launch = qm._FastLaunch(kern, p.grid, (p.config.threads,), p.config.smem_bytes, [None] * 9 + scalars)
        qm._remember(_LAUNCH, key, launch)
    return launch


def grouped_gemm(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None, act: str = "",
    *, config: MoEConfig | str | None = None, validate_ids: bool = False,
) -> Tensor:  # fmt: skip
    """``out [x.shape[0] * top_k, N or N/2]`` (module docstring); ``validate_ids``: :func:`check_ids` first (a host
    synchronisation; leave it off inside CUDA graphs)."""
    d = validate(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k, topk_weights, act)
    if validate_ids:
        check_ids(sorted_ids, block_experts, d.slots, d.e)
    out = torch.zeros((d.slots, d.n_out), dtype=x.dtype, device=x.device)
    if d.slots == 0:
        return out
    w = None
    if topk_weights is not None:
        w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    launch = _launch(d, act, x.dtype, x.device, config)
    ptrs = [x, qweight, scales, zeros, sorted_ids, block_experts, num_padded]
    stream = torch.cuda.current_stream(x.device).cuda_stream
    launch([t.data_ptr() for t in ptrs] + [0 if w is None else w.data_ptr(), out.data_ptr()], stream)
    return out


def is_available(device: torch.device) -> bool:
    """A CUDA device of compute capability 8.0 or newer and nvcc to build the kernel."""
    if device.type != "cuda" or qm.capability(device)[0] < 8:
        return False
    return jit.nvcc_available()


# ------------------------------------------------------------------------------------------ the plan kernel


def _plan_fits(ids: Tensor, num_experts: int) -> bool:
    """The kernel's limits: ids, experts and device (no compiler lookup)."""
    return (
        ids.device.type == "cuda"
        and ids.dtype in (torch.int32, torch.int64)
        and 0 < ids.numel() <= PLAN_MAX_SLOTS
        and 1 <= num_experts <= PLAN_MAX_EXPERTS
        and qm.capability(ids.device)[0] >= 8
    )


def plan_kernel_takes(ids: Tensor, num_experts: int) -> bool:
    """Whether :func:`plan` runs the one-launch kernel for these ids (else the caller builds the plan in PyTorch)."""
    return _plan_fits(ids, num_experts) and jit.nvcc_available()


def plan(
    ids: Tensor, num_experts: int, block_size: int, capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(sorted_ids [capacity], block_experts [capacity / block_size], offsets [E + 1], counts [E], num_padded [1])``,
    all int32, of the expert ids ``ids [T, k]`` (or flat), exactly as ``quick.nn.moe.build_plan(..., static=True,
    check=False)`` computes them, in one launch and without a host synchronisation (capturable in a CUDA graph)."""
    if not _plan_fits(ids, num_experts):  # a missing nvcc is reported by the build
        raise MoEKernelError(
            f"the plan kernel takes 1-{PLAN_MAX_SLOTS} int32/int64 ids on a CUDA device of compute capability 8.0+ "
            f"and 1-{PLAN_MAX_EXPERTS} experts; got {ids.numel()} {ids.dtype} ids on {ids.device}, "
            f"{num_experts} experts"
        )
    if block_size < 1 or capacity < 0 or capacity % block_size:
        raise MoEKernelError(f"capacity ({capacity}) must be a multiple of block_size ({block_size} >= 1)")
    need = plan_capacity(ids.numel(), 1, num_experts, block_size)
    if capacity < need:
        raise MoEKernelError(f"capacity {capacity} is below the {need} rows a plan of {ids.numel()} slots may need")
    flat = ids.reshape(-1).contiguous()
    dev = flat.device
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=dev)
    block_experts = torch.empty(capacity // block_size, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    key = ("plan", flat.dtype, dev, flat.numel(), num_experts, block_size, capacity)
    launch = _LAUNCH.get(key)
    if launch is None:
        with _LOCK:
            defines = {"QP_IDX64": int(flat.dtype == torch.int64)}
            kern = jit.load_kernel(PLAN_SOURCE, PLAN_KERNEL, defines, qm._dev_index(dev))
            scalars = [flat.numel(), num_experts, block_size, capacity]
            launch = qm._FastLaunch(kern, (1,), (PLAN_THREADS,), 0, [None] * 6 + scalars)
            qm._remember(_LAUNCH, key, launch)
    ptrs = [flat, sorted_ids, block_experts, offsets, counts, num_padded]
    launch([t.data_ptr() for t in ptrs], torch.cuda.current_stream(dev).cuda_stream)
    return sorted_ids, block_experts, offsets, counts, num_padded


# ----------------------------------------------------------------------------------------- the route kernel


def route_unavailable(logits: Tensor, top_k: int, block_size: int, capacity: int) -> str | None:
    """Why :func:`route` cannot take these router logits (None: it can)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        return f"router logits must be a 2-D tensor [tokens, experts], got {getattr(logits, 'shape', type(logits))}"
    t, e = logits.shape
    if logits.dtype not in ROUTE_DTYPES:
        return f"takes fp16 or bf16 logits, got {logits.dtype}"
    if logits.stride(1) != 1:
        return "takes logits with contiguous rows"
    if not 1 <= e <= ROUTE_MAX_EXPERTS:
        return f"takes 1-{ROUTE_MAX_EXPERTS} experts, got {e}"
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(e, ROUTE_MAX_TOPK):
        return f"takes top_k in [1, {min(e, ROUTE_MAX_TOPK)}], got {top_k!r}"
    if not 1 <= t * top_k <= ROUTE_MAX_SLOTS:
        return f"takes 1-{ROUTE_MAX_SLOTS} slots (tokens x top_k), got {t * top_k}"
    if block_size < 1 or capacity < 0 or capacity % block_size:
        return f"capacity ({capacity}) must be a multiple of block_size ({block_size} >= 1)"
    need = plan_capacity(t, top_k, e, block_size)
    if capacity and capacity < need:
        return f"capacity {capacity} is below the {need} rows a plan may need"
    if logits.device.type != "cuda" or qm.capability(logits.device)[0] < 8:
        return "runs on a CUDA device of compute capability 8.0+"
    return None if jit.nvcc_available() else "nvcc is not available to build it"


def route(
    logits: Tensor, top_k: int, renormalize: bool, round_weights: bool, block_size: int, capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The router's choice and the plan of a batch in one launch: ``(ids [T, k] int64, weights [T, k] fp32,
    sorted_ids, block_experts, offsets, counts, num_padded)``. ``ids`` / ``weights`` equal ``torch.topk`` of the fp32
    softmax of ``logits [T, E]`` (divided by their sum with ``renormalize``; rounded through the logits' dtype with
    ``round_weights``); the plan equals :func:`plan` of ``ids`` (``capacity`` 0: no plan, only counts and offsets).
    No host synchronisation (capturable)."""
    why = route_unavailable(logits, top_k, block_size, capacity)
    if why is not None:
        raise MoEKernelError(f"the route kernel cannot take these logits: {why}")
    t, e = logits.shape
    dev = logits.device
    ids = torch.empty((t, top_k), dtype=torch.int64, device=dev)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=dev)
    block_experts = torch.empty(capacity // block_size, dtype=torch.int32, device=dev)
    offsets = torch.empty(e + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(e, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    key = ("route", logits.dtype, dev, t, logits.stride(0), e, top_k, renormalize, round_weights, block_size, capacity)
    launch = _LAUNCH.get(key)
    if launch is None:
        with _LOCK:
            epl = next(p for p in ROUTE_EPL if 32 * p >= e)
            defines = {"QR_BF16": int(logits.dtype == torch.bfloat16), "QR_EPL": epl}
            kern = jit.load_kernel(ROUTE_SOURCE, ROUTE_KERNEL, defines, qm._dev_index(dev))
            scalars = [t, logits.stride(0), e, top_k, int(renormalize), int(round_weights), block_size, capacity]
            launch = qm._FastLaunch(kern, (1,), (PLAN_THREADS,), 0, [None] * 8 + scalars)
            qm._remember(_LAUNCH, key, launch)
    outs = [ids, weights, sorted_ids, block_experts, offsets, counts, num_padded]
    launch([logits.data_ptr()] + [o.data_ptr() for o in outs], torch.cuda.current_stream(dev).cuda_stream)
    return ids, weights, sorted_ids, block_experts, offsets, counts, num_padded


# ------------------------------------------------------------------------------- decode sizes: the decode kernel


def dec_rows(tokens: int) -> int:
    """Rows of a 16-row plan block that can be valid when no expert receives more than ``tokens`` slots (the tokens
    routed, when no token names an expert twice, as top-k routing guarantees)."""
    return max(1, min(16, tokens))


def dec_unavailable(
    tokens: int, k: int, n: int, group_size: int, block_size: int, act: str, dtype: torch.dtype, device: torch.device,
    config: qd.DecConfig | None = None, layout: str = "quick",
) -> str | None:  # fmt: skip
    """Why the decode kernel cannot run one launch of a 16-row plan (None: it can): ``act`` is the activation the
    down launch stages (gate|up: ""), ``k`` / ``n`` that launch's weight shape (down: ``k = I``), ``layout`` the
    stack's. ``config``: another decode config of that layout than :data:`DEC_CONFIGS`'s (compiled at first use; for
    sweeps, ``benchmarks/moe_kernel.py``)."""
    if layout not in DEC_CONFIGS:
        return f"no decode kernel over experts in layout {layout!r}"
    config = config or DEC_CONFIGS[layout]
    if device.type != "cuda" or qm.capability(device)[0] < 8:
        return "needs an sm_80+ GPU"
    if block_size != 16:
        return f"takes 16-row plans (decode sizes), got block size {block_size}"
    if act not in DEC_ACTS:
        return f"stages no activation {act!r}"
    if dtype not in SUPPORTED_DTYPES:
        return f"no {dtype} variant"
    if qd.LAYOUTS[config.wb] != layout or config.nw != 1:
        return f"config {config}: the grouped variant of layout {layout!r} has one warp group and its operand side"
    if k % 64 or n % config.channels:
        return f"needs K a multiple of 64 and N of {config.channels}, got K={k}, N={n}"
    if group_size == 32 and not config.supports(32):
        return f"config {config} has no group-32 path"
    try:
        wgmma.group_shift(group_size, k)
    except ValueError as err:
        return str(err)
    need = config.smem_bytes(dec_rows(tokens), k // 64, group_size)
    if need > qd._smem(qm._dev_index(device)):
        return f"{need} bytes of shared memory for {dec_rows(tokens)} rows of K={k}"
    return None if jit.nvcc_available() else "nvcc is not available to build it"


def validate_dec(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, gdiv: int, tokens: int, topk_weights: Tensor | None = None,
    act: str = "", need_cuda: bool = True, layout: str = "quick",
) -> MoEDims:  # fmt: skip
    """:func:`validate` for :func:`dec_grouped` (with ``act``, ``x`` is the ``[slots, 2K]`` gate|up product and
    ``gdiv`` is 1), then the decode kernel's own limits (:func:`dec_unavailable`) with ``need_cuda``."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise MoEKernelError(f"x must be a 2-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise MoEKernelError(f"tokens must be a positive int (the tokens routed), got {tokens!r}")
    probe = x
    if act:
        if act not in DEC_ACTS:
            raise MoEKernelError(f"the decode kernel stages act in {sorted(a for a in DEC_ACTS if a)}, got {act!r}")
        if gdiv != 1 or x.shape[1] % 2:
            raise MoEKernelError(f"with act, x is a [slots, 2K] gate|up product read once per slot (gdiv = 1), got "
                                 f"x {tuple(x.shape)}, gdiv={gdiv}")  # fmt: skip
        probe = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device="meta")
    d = validate(probe, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, gdiv,
                 topk_weights, "", need_cuda=False, layout=layout)  # fmt: skip
    if need_cuda:
        why = dec_unavailable(tokens, d.k, d.n, d.g, d.block_size, act, x.dtype, x.device, layout=layout)
        if why is not None:
            raise MoEKernelError(f"the decode kernel cannot run this launch: {why}")
        _check_devices(x, qweight, scales, zeros, sorted_ids, block_experts, num_padded, topk_weights)
    return d


def dec_grouped(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, gdiv: int, tokens: int, topk_weights: Tensor | None = None,
    act: str = "", out: Tensor | None = None, config: qd.DecConfig | None = None, layout: str = "quick",
) -> Tensor:  # fmt: skip
    """``out[s] = x[s // gdiv] @ dequant(W[expert of s])`` (times ``topk_weights[s]``) for every slot of a 16-row plan,
    on the decode kernel; ``act``: ``x`` is a gate|up product ``[slots, 2K]`` and the kernel stages ``act(gate) * up``.
    ``tokens``: at most that many rows of a block are valid (the tokens routed when no token names an expert twice,
    else the slots). Rows no slot names are left as they
    are in ``out`` (zeros when it is None). Inputs checked by the caller (:func:`validate_dec`, which checks the
    layout's :data:`DEC_CONFIGS` limits; another ``config`` is for sweeps and must pass :func:`dec_unavailable`)."""
    config = config or DEC_CONFIGS[layout]
    ka, nb = STACK_SHAPES[layout]
    e, kr, nn = qweight.shape
    k, n = ka * kr, nn // nb
    slots = x.shape[0] * gdiv
    if out is None:
        out = torch.zeros((slots, n), dtype=x.dtype, device=x.device)
    blocks = block_experts.shape[0]
    if slots == 0 or blocks == 0:
        return out
    g = k if group_size == -1 else group_size
    rows = dec_rows(tokens)
    dev = x.device
    key = ("dec", e, k, n, g, x.dtype, dev, blocks, slots, gdiv, rows, act, config)
    launch = _LAUNCH.get(key)
    if launch is None:
        with _LOCK:
            idx = qm._dev_index(dev)
            defines = {**config.defines(16, g, x.dtype, DEC_ACTS[act]), "QD_GROUPED": 1}
            kern = jit.load_kernel(qd.SOURCE, qd.KERNEL, defines, idx, jit.arch_for_device(idx, arch_specific=True))
            # x for `rows` rows, the reduction for the 16 the variant is compiled for (A-side: two n8 tiles)
            smem = max(config.smem_bytes(rows, k // 64, g), config.smem_bytes(16, 0, g))
            scalars = [16, n, k, wgmma.group_shift(g, k), k // 64] + [None] * 3 + [0.0, 0.0]
            grouped = [None] * 4 + [slots, gdiv, e, k // g, rows]
            grid = (n // config.channels, 1, blocks)
            launch = qm._FastLaunch(kern, grid, (config.threads,), smem, [None] * 8 + scalars + grouped)
            qm._remember(_LAUNCH, key, launch)
    w = None
    if topk_weights is not None:
        w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    ptrs = [x, qweight, scales, zeros]
    launch(
        [t.data_ptr() for t in ptrs] + [0, out.data_ptr(), 0, 0, 0, 0, 0]
        + [sorted_ids.data_ptr(), block_experts.data_ptr(), num_padded.data_ptr(), 0 if w is None else w.data_ptr()],
        torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return out
