"""Hopper (sm_90a) QUICK kernel: W4A16 GEMM on ``wgmma`` with the interleaved weights as the register operand.

``out[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias)`` for weights packed in the ``quick_sm90`` layout. The kernel
(``csrc/quick_sm90.cu``) computes the transposed product so that the 4-bit weight is wgmma's A operand taken
from registers (loaded from global memory with 16-byte loads in fragment order, dequantized in registers), and
the activations are wgmma's B operand, brought into shared memory by TMA. See ``docs/kernels.md``.

This module holds the launcher (validation, the TMA descriptor, the tile/split-k choice), the compile variants
(``VARIANTS``), the ``torch.library`` op ``quick::gemm_w4a16_sm90`` and the registration with the dispatcher.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from quick.formats.weights import SUPPORTED_DTYPES, resolve_group_size
from quick.kernels import jit

SOURCE = "quick_sm90.cu"
KERNEL = "quick_sm90_gemm"
LAYOUT = "quick_sm90"
TOKEN_TILES = (8, 16, 32, 64, 128, 256)  # wgmma N values instantiated in the kernel
SMEM_LIMIT = 227 * 1024


class Sm90Error(ValueError):
    """Inputs the sm_90 kernel cannot take (shape, dtype, device, layout); the message says which and why."""


PIPES = {0: "ring", 1: "groups", 2: "groups-relaxed"}


@dataclass(frozen=True)
class WarpgroupTile:
    """What the configs of the sm_90 kernels (W4A16 here, W4A8 in :mod:`quick.kernels.w4a8_wgmma`) share: ``nt``
    tokens per tile (wgmma N), ``nwg`` consumer warpgroups (64 channels each), ``stages`` TMA stages for x."""

    nt: int
    nwg: int = 2
    stages: int = 6

    def threads(self) -> int:
        return 128 * (self.nwg + 1)

    def _smem(self, weight_stage_bytes: int) -> int:
        """Dynamic shared memory: alignment slack, x stages (+ ``weight_stage_bytes`` of weights each), epilogue
        staging, mbarriers and flags."""
        x_stage = self.nt * 128 + weight_stage_bytes
        return 1024 + self.stages * x_stage + self.nwg * self.nt * 144 + self.stages * 16 + self.nwg * 16

    def _tile_defines(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}NT": self.nt, f"{prefix}NWG": self.nwg, f"{prefix}STAGES": self.stages}


@dataclass(frozen=True)
class Sm90Config(WarpgroupTile):
    """One compiled variant (:class:`WarpgroupTile`: ``nt``, ``nwg``, ``stages``): ``grp`` k64 steps of weights
    per load group or ring (``grp32`` for group size 32, whose two scale rows per step cost registers), ``pipe`` the
    weight pipeline (:data:`PIPES`: 0 per-step ring, 1 ping-pong groups, 2 the same with ld.relaxed.gpu loads that
    ptxas keeps at the group boundary); ``l2pf`` = D > 0: the producer prefetches each unit's weights D k64 steps
    ahead into L2; ``wtma`` = 1: weights, scales and zeros come with x through the TMA stages (bulk copies; group
    sizes >= 64, else the ``pipe`` path); ``ef`` = 1: weight accesses carry an L2 evict_first policy."""

    grp: int = 4
    grp32: int = 4
    pipe: int = 1
    l2pf: int = 0
    wtma: int = 0
    ef: int = 0

    def smem_bytes(self) -> int:
        """Dynamic shared memory (:meth:`WarpgroupTile._smem`; with ``wtma``, weights, scales and zeros per stage)."""
        return self._smem(self.nwg * (2048 + 256) if self.wtma else 0)

    def defines(self, group_size: int, dtype: torch.dtype) -> dict[str, int]:
        return {
            **self._tile_defines("QS_"),
            "QS_PREF": self.grp32 if group_size == 32 else self.grp,
            "QS_G32": int(group_size == 32),
            "QS_BF16": int(dtype == torch.bfloat16),
            "QS_PIPE": int(self.pipe != 0),
            "QS_LDREL": int(self.pipe == 2),
            "QS_L2PF": self.l2pf,
            "QS_WTMA": int(bool(self.wtma) and group_size != 32),
            "QS_EF": self.ef,
        }


# Per pipeline and token tile: the deepest weight groups that ptxas fits in the 232 consumer registers without
# spills (checked with -Xptxas -v; tests/test_sm90_cpu.py keeps it so), fewer x stages where x tiles are large.
_DEFAULTS = {
    0: {
        nt: Sm90Config(nt, 2, st, g, g, 0)
        for nt, st, g in ((8, 8, 8), (16, 8, 8), (32, 8, 8), (64, 8, 6), (128, 6, 4), (256, 4, 4))
    },
}
for _pipe in (1, 2):
    _DEFAULTS[_pipe] = {
        nt: Sm90Config(nt, 2, st, g, g32, _pipe)
        for nt, st, g, g32 in ((8, 8, 8, 6), (16, 8, 8, 6), (32, 8, 6, 4), (64, 8, 6, 4), (128, 6, 4, 3))
    }
    # 256 tokens: two register sets next to 128 accumulators spill (ptxas: 108 bytes); the ring does not.
    _DEFAULTS[_pipe][256] = _DEFAULTS[0][256]
DEFAULT_PIPE = 0  # the pipeline verified on the device first; TUNED below picks per batch size


def default_config(m: int, group_size: int = 128, pipe: int | None = None) -> Sm90Config:
    """Heuristic tile per batch size: the smallest token tile that holds M (up to 256). Group size 32 stops at
    128 tokens: at 256, its two scale rows per step push the 128 accumulators past what ptxas can keep without
    serializing the wgmma pipeline (C7515)."""
    nt = next((t for t in TOKEN_TILES if t >= m), TOKEN_TILES[-1])
    if group_size == 32:
        nt = min(nt, 128)
    return _DEFAULTS[DEFAULT_PIPE if pipe is None else pipe][nt]


# Measured choices per batch size bucket (max M, config, rounds): `rounds` caps the persistent grid's rounds when
# choosing split-k; None = choose_splits. The best of 20 candidates per M on 8192^2 and 4096^2 (H100, g128, fp16;
# docs/kernels.md), rounds = 1 reproducing the best split on both shapes. M <= 8: 4 consumer warpgroups, ring of
# 3 k64 steps (27.9 / 14.7 us at M = 1 against 35.4 / 19.4 for the default); M <= 16, 32, 64: weights with x through
# the TMA stages (wtma; M = 16 28.9 / 14.1 against 35.2 / 19.9; M = 32 30.9 against 36.3; M = 64 33.6 / 16.9
# against 33.5 / 18.2); M <= 128 and 256: the defaults (40.1 and 60.2 us). Group size 32 and larger M use
# default_config (pipeline 0). bf16: checked against the float64 reference with these configs, not timed.
_MEASURED: list[tuple[int, Sm90Config, int | None]] = [
    (8, Sm90Config(8, 4, 8, 3, 3, 0), 1),
    (16, Sm90Config(16, 2, 24, 4, 4, 0, 0, 1), 1),
    (32, Sm90Config(32, 2, 16, 4, 4, 0, 0, 1), 1),
    (64, Sm90Config(64, 2, 12, 4, 4, 0, 0, 1), 1),
    (128, _DEFAULTS[2][128], 1),
    (256, _DEFAULTS[0][256], 1),
]
TUNED: dict[str, list[tuple[int, Sm90Config, int | None]]] = {"fp16": _MEASURED, "bf16": _MEASURED}

# Weights through the TMA stages (wtma) per token tile: as many x stages as fit next to the epilogue staging in the
# 227 KB of shared memory (256 tokens: 4 stages, 219 KB). Timed for nt <= 128; 256 builds without spills
# (168 registers, ptxas) and is a `quick tune` candidate for M > 128, where the ring (pipe 0) pays one memory latency
# per k64 step.
WTMA_STAGES = {8: 24, 16: 24, 32: 16, 64: 12, 128: 8, 256: 4}


def neighbour_tiles(m: int) -> list[int]:
    """The instantiated token tiles around ``m`` rows worth trying at M >= 64: those holding M / 2, M and 2M tokens
    (64 to 256), and 128 at M >= 256 (twice the units of 256 tiles, a smaller last wave)."""
    want = {min(256, max(64, t)) for t in (m // 2, m, 2 * m)} | ({128} if m >= 256 else set())
    return sorted({next(t for t in TOKEN_TILES if t >= w) for w in want})


def wtma_config(nt: int, nwg: int = 2) -> Sm90Config:
    """The weights-through-TMA variant for a token tile (``nwg`` consumer warpgroups, groups of 4 steps)."""
    return Sm90Config(nt, nwg, WTMA_STAGES[nt], 4, 4, 0, 0, 1)


WTMA_TILES = [wtma_config(t) for t in (64, 128, 256)]  # the tile alternatives `quick tune` adds at M >= 64
# 64-channel tiles (one consumer warpgroup): twice the CTAs on narrow layers, where 128-channel tiles leave SMs idle
NARROW_TILES = [wtma_config(t, 1) for t in (64, 128, 256)]


# Every variant default_config can return, for both dtypes and both scale-group code paths (compile check).
VARIANTS: list[tuple[str, str, dict[str, int]]] = [
    (SOURCE, KERNEL, default_config(t, g, pipe).defines(g, dt))
    for pipe in sorted(_DEFAULTS)
    for t in TOKEN_TILES
    for g in (128, 32)
    for dt in (torch.float16, torch.bfloat16)
    if not (g == 32 and t == 256) and not (pipe and t == 256)  # the same variants as listed elsewhere
]
# ... and every measured choice of TUNED (decode variants: L2 prefetch, weights through TMA, 4 warpgroups) and the
# wtma tiles that `quick tune` and the autotune try.
for _cfg in [c for table in TUNED.values() for _b, c, _r in table] + WTMA_TILES + NARROW_TILES:
    for _dt in (torch.float16, torch.bfloat16):
        _v = (SOURCE, KERNEL, _cfg.defines(128, _dt))
        if _v not in VARIANTS:
            VARIANTS.append(_v)


def group_shift(g: int, k: int) -> int:
    """Kernel argument for the scale row of a k64 step: ``step >> gshift``. G = 64 * 2^s gives s; one group over
    all of K (per-channel) gives 31 (row 0 for every step); G = 32 has its own code path (argument unused)."""
    if g == 32:
        return 0
    if g == k:
        return 31
    s = (g // 64).bit_length() - 1
    if 64 << s != g:
        raise Sm90Error(f"group size {g} must be 32, 64 * 2^s, or K")
    return s


def choose_splits(
    tiles: int, nk64: int, num_sms: int, unit_overhead: float = 4.0, max_splits: int = 32, rounds: int | None = None
) -> int:
    """Split-k factor that minimises (rounds of the persistent grid) x (k64 steps per unit + fixed cost).

    A unit is one (channel tile, token tile, k split); the grid has one CTA per SM, so a launch takes
    ``ceil(units / num_sms)`` rounds. ``unit_overhead`` (in k64 steps) charges each unit for pipeline fill,
    epilogue and the split-k reduction, so that splitting stops paying once the SMs are full. With ``rounds``
    (a measured policy), the largest split that keeps the launch within that many rounds and at least 8 k64
    steps per unit.
    """
    if rounds is not None:
        s = max(1, min(max_splits, nk64 // 8, rounds * num_sms // max(tiles, 1)))
        steps = -(-nk64 // s)
        return -(-nk64 // steps)
    best, best_cost = 1, math.inf
    for s in range(1, min(max_splits, nk64) + 1):
        steps = -(-nk64 // s)
        s_eff = -(-nk64 // steps)
        cost = -(-tiles * s_eff // num_sms) * (steps + unit_overhead)
        if cost < best_cost - 1e-9:
            best, best_cost = s_eff, cost
    return best


@dataclass(frozen=True)
class LaunchPlan:
    """A persistent-grid launch of one of the Hopper kernels (W4A16 here, W4A8 in ``quick_w4a8_sm90``): ``config``
    is the variant (any config with ``nt`` and ``nwg``), units are (channel tile, token tile, k split)."""

    config: object
    n_tiles: int
    m_tiles: int
    splits: int
    steps_per_split: int
    grid: int

    @property
    def units(self) -> int:
        return self.n_tiles * self.m_tiles * self.splits

    def workspace_elems(self) -> int:
        """Split-k partials (fp32 or int32): one 64 x nt slab per (tile, warpgroup, split); none without split-k."""
        if self.splits == 1:
            return 0
        return self.n_tiles * self.m_tiles * self.config.nwg * self.splits * 64 * self.config.nt

    def counters(self) -> int:
        return self.n_tiles * self.m_tiles * self.config.nwg


def build_plan(
    m: int,
    n: int,
    nk: int,
    num_sms: int,
    cfg,
    splits: int | None,
    rounds: int | None,
    unit_overhead: float = 4.0,
) -> LaunchPlan:
    """Tiles, split-k and grid for ``nk`` pipeline steps along K; every split non-empty."""
    n_tiles = -(-(n // 64) // cfg.nwg)
    m_tiles = -(-m // cfg.nt)
    if splits is None:
        splits = choose_splits(n_tiles * m_tiles, nk, num_sms, unit_overhead=unit_overhead, rounds=rounds)
    s = max(1, min(splits, nk))
    steps = -(-nk // s)
    s = -(-nk // steps)
    return LaunchPlan(cfg, n_tiles, m_tiles, s, steps, min(n_tiles * m_tiles * s, num_sms))


def plan(
    m: int, n: int, k: int, num_sms: int, config: Sm90Config | None = None, splits: int | None = None,
    group_size: int = 128, rounds: int | None = None,
) -> LaunchPlan:  # fmt: skip
    """Tiles, split-k and grid for one problem (pure arithmetic, testable without a GPU)."""
    return build_plan(m, n, k // 64, num_sms, config or default_config(m, group_size), splits, rounds)


def check_x_qweight(x: Tensor, qweight: Tensor, error: type[ValueError], packed: str) -> tuple[int, int]:
    """What the sm_90 kernels assume of ``x`` (2-D fp16/bf16) and ``qweight`` (2-D int32, ``packed`` names its
    shape and layout); returns ``(M, K)``."""
    if x.dim() != 2:
        raise error(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise error(f"x must be float16 or bfloat16, got {x.dtype}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise error(f"qweight must be int32 {packed}, got {qweight.dtype} {tuple(qweight.shape)}")
    return x.shape


def validate(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None
) -> tuple[int, int, int, int]:
    """Check everything the kernel assumes; returns ``(M, N, K, G)``. Raises :class:`Sm90Error`."""
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise Sm90Error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    m, k = check_x_qweight(x, qweight, Sm90Error, "[K/64, 8N] (layout quick_sm90)")
    if scales.dim() != 2:
        raise Sm90Error(f"scales must be 2-D [K/G, N], got {tuple(scales.shape)}")
    n = scales.shape[1]
    if k % 64 or n % 64:
        raise Sm90Error(f"the sm_90 kernel needs K and N multiples of 64, got K={k}, N={n}")
    try:
        g = resolve_group_size(group_size, k)
    except ValueError as e:
        raise Sm90Error(str(e)) from None
    if g % 32:
        raise Sm90Error(f"group size must be a multiple of 32, got {g}")
    if g != 32 and g % 64:
        raise Sm90Error(f"group size must be 32 or a multiple of 64, got {g}")
    group_shift(g, k)
    if tuple(qweight.shape) != (k // 64, 8 * n):
        raise Sm90Error(f"qweight has shape {tuple(qweight.shape)}, expected {(k // 64, 8 * n)} for K={k}, N={n}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (k // g, n):
            raise Sm90Error(f"{name} has shape {tuple(t.shape)}, expected {(k // g, n)} for K={k}, N={n}, G={g}")
        if t.dtype != x.dtype:
            raise Sm90Error(f"{name} dtype {t.dtype} differs from x dtype {x.dtype} (dequantized in x's type)")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise Sm90Error(f"bias must be [{n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    tensors = [x, qweight, scales, zeros] + ([bias] if bias is not None else [])
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise Sm90Error(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return m, n, k, g


# ------------------------------------------------------------------------------ TMA descriptor (driver, ctypes)

_CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0
_CU_TENSOR_MAP_DATA_TYPE_UINT16 = 1
_CU_TENSOR_MAP_INTERLEAVE_NONE = 0
_CU_TENSOR_MAP_SWIZZLE_128B = 3
_CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3
_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0


class TmaDesc(ctypes.Structure):
    """CUtensorMap: 128 opaque bytes, passed to the kernel by value (``__grid_constant__``)."""

    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


def _aligned_desc() -> tuple[ctypes.Array, TmaDesc]:
    """cuTensorMapEncodeTiled wants a 64-byte aligned map; ctypes only guarantees 16, so carve one out."""
    buf = (ctypes.c_uint8 * (128 + 64))()
    off = (-ctypes.addressof(buf)) % 64
    return buf, TmaDesc.from_buffer(buf, off)


def encode_rowmajor_map(t: Tensor, elem_bytes: int, box_k: int, nt: int) -> tuple[ctypes.Array, TmaDesc]:
    """Tensor map of a row-major ``[M, K]`` activation tensor with ``elem_bytes``-byte elements (2: fp16/bf16 x,
    1: int8 x_q): boxes of ``box_k`` k x ``nt`` tokens (128 bytes of k: the K-major SW128 operand layout the
    wgmma descriptor names), 128-byte swizzle, rows past M read as zeros. The caller checks alignment."""
    m, k = t.shape
    buf, desc = _aligned_desc()
    dims = (ctypes.c_uint64 * 2)(k, m)
    strides = (ctypes.c_uint64 * 1)(t.stride(0) * elem_bytes)
    box = (ctypes.c_uint32 * 2)(box_k, nt)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    dtype = _CU_TENSOR_MAP_DATA_TYPE_UINT16 if elem_bytes == 2 else _CU_TENSOR_MAP_DATA_TYPE_UINT8
    jit.check(
        jit._driver().cuTensorMapEncodeTiled(
            ctypes.byref(desc),
            dtype,
            2,
            ctypes.c_void_p(t.data_ptr()),
            dims,
            strides,
            box,
            elem,
            _CU_TENSOR_MAP_INTERLEAVE_NONE,
            _CU_TENSOR_MAP_SWIZZLE_128B,
            _CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            _CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        "cuTensorMapEncodeTiled",
    )
    return buf, desc


def encode_x_map(x: Tensor, nt: int) -> tuple[ctypes.Array, TmaDesc]:
    """Tensor map of ``x`` [M, K] (16-bit, row-major): boxes of 64 k x ``nt`` tokens."""
    if x.data_ptr() % 16 or (x.stride(0) * 2) % 16 or x.stride(1) != 1:
        raise Sm90Error("x must be 16-byte aligned with unit column stride and a row stride of a multiple of 8")
    return encode_rowmajor_map(x, 2, 64, nt)


# ------------------------------------------------------------------------------ launch

_COUNTERS: dict[tuple[int, int], Tensor] = {}
_COUNTERS_LOCK = threading.Lock()
_SMS: dict[int, int] = {}


def _counters(device: torch.device, n: int) -> Tensor:
    """Split-k arrival counters, zero between launches (the last CTA of a tile resets its own); one buffer per
    (device, stream) so that launches on different streams never share one."""
    stream = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, stream)
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            _COUNTERS[key] = buf
    return buf


def num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def is_available(device: torch.device | int | None = None) -> bool:
    """True on sm_90 devices (the W4A16 and W4A8 kernels use sm_90a-only wgmma and setmaxnreg) with nvcc present."""
    if not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return jit.nvcc_available()


def takes_input(x: Tensor) -> bool:
    """Whether this layout's kernels can take ``x`` on its device (the dispatcher's availability check)."""
    return isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in SUPPORTED_DTYPES and is_available(x.device)


def tuned_config(m: int, dtype: torch.dtype, group_size: int = 128) -> tuple[Sm90Config, int | None]:
    """Measured (config, rounds) for this batch size, else the default config and the split heuristic."""
    if group_size != 32:
        for bound, cfg, rounds in TUNED.get("fp16" if dtype == torch.float16 else "bf16", []):
            if m <= bound:
                return cfg, rounds
    return default_config(m, group_size), None


def prepare(x, qweight, scales, zeros, group_size, bias=None):
    """:func:`validate`, then what a launch assumes: CUDA tensors, dense and 16-byte aligned (``x`` is copied if it is
    not; weights must be). Returns ``(x, qweight, scales, zeros, bias, M, N, K, G)``."""
    m, n, k, g = validate(x, qweight, scales, zeros, group_size, bias)
    if x.device.type != "cuda":
        raise Sm90Error("the sm_90 kernel runs on CUDA tensors only")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.data_ptr() % 16:  # a view at an odd offset: the kernel's 16- and 4-byte loads would fault
            raise Sm90Error(f"{name} must be 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}); .clone() the view")
    bias = bias.contiguous() if bias is not None else None
    return x, qweight, scales, zeros, bias, m, n, k, g


def gemm_w4a16_sm90(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
    config: Sm90Config | None = None, splits: int | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``x @ dequant(W) (+ bias)`` on the wgmma GEMM with ``W`` in the ``quick_sm90`` layout; ``x`` [M, K] -> [M, N] in
    x's dtype. ``config``/``splits``: None = the batch size's tuned config and the split model (which kernel runs a
    layer's call is :mod:`quick.kernels.select`'s choice, not this function's); ``out`` (contiguous [M, N]) lets
    tests hand in a poisoned buffer."""
    x, qweight, scales, zeros, bias, m, n, k, g = prepare(x, qweight, scales, zeros, group_size, bias)
    rounds = None
    if config is None:
        config, rounds = tuned_config(m, x.dtype, g)
    return launch_validated(x, qweight, scales, zeros, bias, m, n, k, g, config, splits, rounds, out)


def launch_validated(
    x, qweight, scales, zeros, bias, m: int, n: int, k: int, g: int, config: Sm90Config | None, splits: int | None,
    rounds: int | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The launch on :func:`prepare`'d inputs; ``config`` None = the batch size's tuned config."""
    if m == 0:
        return x.new_empty((0, n)) if out is None else out
    if config is None:
        config, rounds = tuned_config(m, x.dtype, g)
    cfg = config
    dev = x.device
    if cfg.smem_bytes() > SMEM_LIMIT:
        raise Sm90Error(f"config {cfg} needs {cfg.smem_bytes()} bytes of shared memory (limit {SMEM_LIMIT})")
    p = plan(m, n, k, num_sms(dev), cfg, splits, g, rounds)
    with torch.cuda.device(dev):
        kern = jit.load_kernel(SOURCE, KERNEL, cfg.defines(g, x.dtype), dev.index, "sm_90a")
        out = jit.out_buffer(out, m, n, x.dtype, dev, Sm90Error)
        ws = torch.empty(max(p.workspace_elems(), 1), dtype=torch.float32, device=dev)
        cnt = _counters(dev, p.counters())
        _buf, desc = encode_x_map(x, cfg.nt)
        gshift = group_shift(g, k)
        b = bias if bias is not None else ctypes.c_void_p(0)
        kern(
            (p.grid,),
            (cfg.threads(),),
            [desc, qweight, scales, zeros, b, out, ws, cnt, m, n, k, gshift, p.splits, p.steps_per_split, p.n_tiles,
             p.m_tiles],
            smem=cfg.smem_bytes(),
        )  # fmt: skip
    return out
