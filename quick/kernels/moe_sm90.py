"""Hopper grouped W4A16 GEMM over the experts of a mixture-of-experts block: the ``QS_GROUPED`` variants of
``csrc/quick_sm90.cu`` (wgmma, the 4-bit weight as the register operand) on stacks in the ``quick_sm90`` layout
(``qweight [E, K/64, 8N]``, ``scales`` / ``zeros [E, K/G, N]``).

The token tiles are the blocks of a sorted-token plan (:func:`quick.nn.moe.build_plan`; block size = the token
tile, one of :data:`~quick.kernels.moe.SM90_BLOCK_SIZES`), one expert each; x arrives by TMA, so the kernel reads its
rows in plan order: the launcher gathers ``x[sorted_ids[r] // top_k]`` into a ``[capacity, K]`` buffer, or takes
``x`` as it is with ``plan_rows_in`` (the output of an earlier product written in plan order). Outputs go to
``out[sorted_ids[r]]`` (times the slot weight, in fp32), or with ``plan_rows_out`` to row ``r`` of a
``[capacity, N]`` buffer. An expert MLP is then: gate|up with ``plan_rows_out``, ``act(gate) * up`` on those rows,
down with ``plan_rows_in`` and the slot weights (:meth:`quick.nn.moe.QuickMoEExperts.kernel_forward_planned`).
Nothing reads the plan on the host (CUDA graphs).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from quick.formats.weights import SUPPORTED_DTYPES
from quick.kernels import jit, wgmma
from quick.kernels import moe as qmoe

LAYOUT = "quick_sm90"
# One variant per plan block size (= token tile): the dense kernel's register weight pipeline for that tile (ping-pong
# load groups; the per-step ring at 256 tokens, where two register sets next to 128 accumulators spill).
CONFIGS: dict[int, wgmma.Sm90Config] = {bs: wgmma._DEFAULTS[1][bs] for bs in qmoe.SM90_BLOCK_SIZES}
GROUPED = {"QS_GROUPED": 1}

VARIANTS: list[tuple[str, str, dict[str, int]]] = [
    (wgmma.SOURCE, wgmma.KERNEL, {**cfg.defines(g, dt), **GROUPED})
    for bs, cfg in CONFIGS.items()
    for g in (128, 32)
    for dt in SUPPORTED_DTYPES
    if g != 32 or bs <= qmoe.SM90_G32_MAX_BLOCK
]
ARCHS = ("sm_90a",)


def unavailable(
    k: int, n: int, group_size: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why the grouped wgmma GEMM cannot run one product (None: it can)."""
    if device.type != "cuda" or not wgmma.is_available(device):
        return "needs an sm_90 GPU with nvcc"
    if block_size not in CONFIGS:
        return f"no variant for plan block size {block_size} (block sizes {sorted(CONFIGS)})"
    if group_size == 32 and block_size > qmoe.SM90_G32_MAX_BLOCK:
        return f"group size 32 takes plan blocks of up to {qmoe.SM90_G32_MAX_BLOCK} rows, got {block_size}"
    if dtype not in SUPPORTED_DTYPES:
        return f"no {dtype} variant"
    if k % 64 or n % 64:
        return f"needs K and N multiples of 64, got K={k}, N={n}"
    try:
        wgmma.group_shift(group_size, k)
    except ValueError as err:
        return str(err)
    return None


def validate(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None,
    num_slots: int = -1, plan_rows_in: bool = False, plan_rows_out: bool = False, need_cuda: bool = True,
) -> tuple[qmoe.MoEDims, int]:  # fmt: skip
    """Every assumption of the launch, checked (:class:`~quick.kernels.moe.MoEKernelError`, ``TypeError``); returns
    the product's dims and the slot count the ids refer to. ``plan_rows_in``: ``x`` is ``[capacity, K]`` in plan
    order and ``num_slots`` names the slots (else ``x.shape[0] * top_k``)."""
    capacity = sorted_ids.shape[0] if isinstance(sorted_ids, Tensor) else -1
    if plan_rows_in:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != capacity:
            raise qmoe.MoEKernelError(
                f"with plan_rows_in, x must be [capacity={capacity}, K], got {tuple(getattr(x, 'shape', ()))}"
            )
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise qmoe.MoEKernelError(f"with plan_rows_in, num_slots must be the slot count, got {num_slots!r}")
        if top_k != 1:
            raise qmoe.MoEKernelError(f"with plan_rows_in, each plan row is its own input row (top_k 1), got {top_k}")
    if plan_rows_out and topk_weights is not None:
        raise qmoe.MoEKernelError("plan_rows_out writes the plain product; the slot weights apply to slot rows")
    probe = x
    if plan_rows_in:  # validate as num_slots rows of one slot each (the shape checks do not read the rows)
        probe = torch.empty((num_slots, x.shape[1]), dtype=x.dtype, device="meta")
    d = qmoe.validate(probe, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                      topk_weights, "", need_cuda=False, layout=LAYOUT)  # fmt: skip
    if need_cuda:
        why = unavailable(d.k, d.n, d.g, d.block_size, x.dtype, x.device)
        if why is not None:
            raise qmoe.MoEKernelError(f"the grouped wgmma GEMM cannot run this product: {why}")
        qmoe._check_devices(x, qweight, scales, zeros, sorted_ids, block_experts, num_padded, topk_weights)
    return d, d.slots


def gather_rows(x: Tensor, sorted_ids: Tensor, top_k: int) -> Tensor:
    """``x[sorted_ids[r] // top_k]`` for every plan row ``r`` (row 0 for padding rows): the input in plan order."""
    ids = sorted_ids.long()
    slots = x.shape[0] * top_k
    src = torch.where((ids >= 0) & (ids < slots), ids // top_k, torch.zeros_like(ids))
    return x.index_select(0, src)


def grouped_gemm_sm90(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None, num_slots: int = -1,
    plan_rows_in: bool = False, plan_rows_out: bool = False, fill: bool = True,
) -> Tensor:  # fmt: skip
    """The grouped product (module docstring), inputs checked first (:func:`validate`): ``[capacity, N]`` in plan
    order with ``plan_rows_out``, else ``[slots, N]``; rows the kernel does not write (blocks past the padded total;
    slots no plan row names) are zero with ``fill``, left unwritten without it."""
    d, slots = validate(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                        topk_weights, num_slots, plan_rows_in, plan_rows_out)  # fmt: skip
    capacity, n, k, e, g = sorted_ids.shape[0], d.n, d.k, d.e, d.g
    rows_out = capacity if plan_rows_out else slots
    out = (torch.zeros if fill else torch.empty)((rows_out, n), dtype=x.dtype, device=x.device)
    if slots == 0 or capacity == 0:
        return out
    xp = x if plan_rows_in else gather_rows(x, sorted_ids, top_k)
    xp = xp.contiguous()
    w = None if topk_weights is None else topk_weights.reshape(-1).to(torch.float32).contiguous()
    cfg = CONFIGS[d.block_size]
    dev = x.device
    blocks = block_experts.shape[0]
    n_tiles = -(-(n // 64) // cfg.nwg)
    nk = k // 64
    null = ctypes.c_void_p(0)
    with torch.cuda.device(dev):
        kern = jit.load_kernel(wgmma.SOURCE, wgmma.KERNEL, {**cfg.defines(g, x.dtype), **GROUPED}, dev.index, "sm_90a")
        ws = torch.empty(1, dtype=torch.float32, device=dev)
        cnt = wgmma._counters(dev, 1)
        _buf, desc = wgmma.encode_x_map(xp, cfg.nt)
        units = n_tiles * blocks
        kern(
            (min(units, wgmma.num_sms(dev)),),
            (cfg.threads(),),
            [desc, qweight, scales, zeros, null, out, ws, cnt, capacity, n, k, wgmma.group_shift(g, k), 1, nk,
             n_tiles, blocks, null if plan_rows_out else sorted_ids, block_experts, num_padded,
             null if w is None else w, slots, e, k // g],
            smem=cfg.smem_bytes(),
        )  # fmt: skip
    return out
