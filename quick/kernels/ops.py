"""The W4A16 products as ``torch.library`` custom ops, each with a fake (meta) implementation, so that
``torch.compile`` traces through models that use them without looking inside, and CUDA graphs capture them (the
launchers enqueue on torch's current stream and allocate through torch's caching allocator).

``quick::gemm_w4a16(x [..., K], qweight, scales, zeros, group_size, bias?)``: weights in the ``quick`` layout.
``quick::gemm_w4a16_sm90(x [M, K], qweight, scales, zeros, bias?, group_size)``: the ``quick_sm90`` layout.
``quick::gated_gemm_w4a16_sm90`` / ``quick::gemm_add_norm_sm90``: the fast decode step's fused down / o projections.
``quick::gemm_w4a8`` / ``quick::gemm_w4a8_sm90``: W4A8 (int8 activations quantized inside), layouts ``w4a8`` /
``w4a8_sm90``; ``quick::quantize_act_w4a8``: the per-token int8 activation quantization alone;
``quick::rms_norm_quant``: (residual add +) RMSNorm + that quantization in one launch, and
``quick::gemm_w4a8_quantized``: the W4A8 product on activations quantized already.
Which kernel runs inside each op is :mod:`quick.kernels.select`'s choice.
"""

# No `from __future__ import annotations` here: torch.library infers the op schemas from real annotations.

import torch
from torch import Tensor

from quick.formats.layouts import get_layout, unpack_w4a8, unpack_w4a8_sm90
from quick.formats.w4a8 import quantize_activations, w4a8_reference
from quick.kernels import decode as qd
from quick.kernels import mma, select
from quick.kernels import normquant as nq
from quick.kernels import w4a8_mma as w4
from quick.kernels import w4a8_wgmma as w8
from quick.kernels import wgmma as sm


@torch.library.custom_op("quick::gemm_w4a16", mutates_args=())
def gemm_w4a16(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ dequant(W) (+ bias)`` on the ``quick`` layout's kernels (decode kernel, GEMV or mma.sync GEMM)."""
    x2 = mma._flatten(x)
    out = select.matmul("quick", x2, qweight, scales, zeros, group_size, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@gemm_w4a16.register_fake
def _gemm_w4a16_fake(x, qweight, scales, zeros, group_size, bias=None):
    x2 = mma._flatten(x)
    _, _, n, _ = mma.validate(x2, qweight, scales, zeros, group_size, bias, need_cuda=False)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("quick::gemm_w4a16_sm90", mutates_args=())
def gemm_w4a16_sm90(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None, group_size: int
) -> Tensor:
    """``x @ dequant(W) (+ bias)`` on the ``quick_sm90`` layout's kernels (decode kernel or wgmma GEMM)."""
    return select.matmul("quick_sm90", x, qweight, scales, zeros, group_size, bias)


@gemm_w4a16_sm90.register_fake
def _gemm_w4a16_sm90_fake(x, qweight, scales, zeros, bias, group_size):
    sm.validate(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], scales.shape[1]))


def _validate_fused(x, act: str, need_act: bool, qweight, scales, zeros, group_size, bias) -> tuple[int, int, int, int]:
    """``sm.validate`` for the fused entry points and their fakes: ``act`` (required where ``need_act``) one of the
    decode kernel's activations, ``x`` a 2-D ``[M, K]`` input or, with ``act``, a ``[M, 2K]`` gate/up product."""
    if (act or need_act) and act not in qd.ACTS:
        raise sm.Sm90Error(f"gate activation must be one of {sorted(qd.ACTS)}{'' if need_act else ' or empty'}, "
                           f"got {act!r}")  # fmt: skip
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or (act and x.shape[1] % 2):
        want = "[M, 2K] gate/up product" if act else "2-D [M, K] tensor"
        raise sm.Sm90Error(f"x must be a {want}, got {getattr(x, 'shape', type(x).__name__)}")
    return sm.validate(x[:, : x.shape[1] // 2 if act else x.shape[1]], qweight, scales, zeros, group_size, bias)


def _fused(x, qweight, scales, zeros, m: int, n: int, k: int, g: int, act: bool, norm: bool):
    """The decode-kernel choice when the fused variant can run (weights dense and aligned), else None."""
    p = select.Problem("quick_sm90", m, n, k, g, x.dtype, x.device)
    c = select.fused_choice(p, act, norm)
    dense = all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (qweight, scales, zeros))
    return c if dense else None


def _dense(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def gated_gemm(gu, qweight, scales, zeros, group_size: int, bias=None, act: str = "silu") -> Tensor:
    """``act(gu[:, :K]) * gu[:, K:] @ dequant(W) (+ bias)``: a gated MLP's down projection from its gate/up product
    ``gu`` [M, 2K]. One launch where the choice is the decode kernel and it has a ``QD_ACT`` variant for the config;
    otherwise :func:`decode.gated`, then the usual product."""
    m, n, k, g = _validate_fused(gu, act, True, qweight, scales, zeros, group_size, bias)
    if gu.device.type != "cuda":
        raise sm.Sm90Error("the sm_90 kernel runs on CUDA tensors only")
    if m == 0:
        return gu.new_empty((0, n))
    c = _fused(gu, qweight, scales, zeros, m, n, k, g, True, False)
    if c is None:
        return select.matmul("quick_sm90", qd.gated(gu[:, :k], gu[:, k:], act), qweight, scales, zeros, group_size,
                             bias)  # fmt: skip
    b = bias.contiguous() if bias is not None else None
    return qd.run_validated("quick_sm90", _dense(gu), qweight, scales, zeros, b, m, n, k, g, c.config, c.splits,
                            act=qd.ACTS[act])  # fmt: skip


@torch.library.custom_op("quick::gated_gemm_w4a16_sm90", mutates_args=())
def gated_gemm_w4a16_sm90(
    gu: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None, group_size: int, act: str
) -> Tensor:
    """:func:`gated_gemm` as one opaque op."""
    return gated_gemm(gu, qweight, scales, zeros, group_size, bias, act)


@gated_gemm_w4a16_sm90.register_fake
def _gated_fake(gu, qweight, scales, zeros, bias, group_size, act):
    _validate_fused(gu, act, True, qweight, scales, zeros, group_size, bias)
    return gu.new_empty((gu.shape[0], scales.shape[1]))


def gemm_add_norm(x, qweight, scales, zeros, group_size: int, bias, residual, weight, eps: float, offset: float = 0.0,
                  act: str = "") -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(RMSNorm(r), r)`` with ``r = residual + h`` and ``h = x @ dequant(W) (+ bias)`` (``act``: ``x`` is a
    ``[M, 2K]`` gate/up product and ``h`` the down projection of ``act(gate) * up``): the o / down projection of a
    decoder layer with the add and norm that follow it. One launch where the choice is the decode kernel and a
    ``QD_NORM`` variant exists, else the product, then the add and norm."""
    m, n, k, g = _validate_fused(x, act, False, qweight, scales, zeros, group_size, bias)
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (m, n) or residual.dtype != x.dtype:
        raise sm.Sm90Error(f"residual must be a [{m}, {n}] {x.dtype} tensor, got {getattr(residual, 'shape', None)}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n,) or weight.dtype != x.dtype:
        raise sm.Sm90Error(f"norm weight must be a [{n}] {x.dtype} tensor, got {getattr(weight, 'shape', None)}")
    if residual.device != x.device or weight.device != x.device:
        raise sm.Sm90Error("x, residual and the norm weight must be on one device")
    if x.device.type != "cuda":
        raise sm.Sm90Error("the sm_90 kernel runs on CUDA tensors only")
    if m == 0:
        return x.new_empty((0, n)), x.new_empty((0, n))
    c = _fused(x, qweight, scales, zeros, m, n, k, g, bool(act), True)
    if c is None:
        if act:
            h = gated_gemm(x, qweight, scales, zeros, group_size, bias, act)
        else:
            h = select.matmul("quick_sm90", x, qweight, scales, zeros, group_size, bias)
        r = residual + h
        return qd.rms_norm(r, weight, eps, offset), r
    x, residual, weight = _dense(x), _dense(residual), _dense(weight)
    r, normed = torch.empty_like(residual), torch.empty_like(residual)
    b = bias.contiguous() if bias is not None else None
    qd.run_validated(
        "quick_sm90", x, qweight, scales, zeros, b, m, n, k, g, c.config, c.splits, r, qd.ACTS.get(act, 0),
        (residual, weight, eps, offset, normed),
    )  # fmt: skip
    return normed, r


@torch.library.custom_op("quick::gemm_add_norm_sm90", mutates_args=())
def gemm_add_norm_sm90(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bias: Tensor | None,
    group_size: int,
    residual: Tensor,
    weight: Tensor,
    eps: float,
    offset: float,
    act: str,
) -> tuple[Tensor, Tensor]:
    """:func:`gemm_add_norm` as one opaque op."""
    return gemm_add_norm(x, qweight, scales, zeros, group_size, bias, residual, weight, eps, offset, act)


@gemm_add_norm_sm90.register_fake
def _add_norm_fake(x, qweight, scales, zeros, bias, group_size, residual, weight, eps, offset, act):
    _validate_fused(x, act, False, qweight, scales, zeros, group_size, bias)
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


def linear_fn(x2d: Tensor, packed: dict, group_size: int) -> Tensor:
    """The dispatcher's entry for layout ``quick``: ``fn(x2d, packed_tensors, group_size) -> out2d``.
    Callers hand in views (``x[:, :1].reshape(...)``); the kernels need dense rows, so copy those."""
    x2d = mma._dense_rows(x2d)
    return torch.ops.quick.gemm_w4a16(x2d, packed["qweight"], packed["scales"], packed["zeros"], group_size)


def linear_fn_sm90(x2d: Tensor, packed: dict, group_size: int) -> Tensor:
    """The dispatcher's entry for layout ``quick_sm90``. The layout admits N multiples of 16, the kernels need
    multiples of 64: such layers take the dequantize + matmul path instead of failing."""
    k, n = x2d.shape[1], packed["scales"].shape[1]
    if n % 64 or k % 64 or x2d.dtype != packed["scales"].dtype:
        w = get_layout(sm.LAYOUT).unpack(packed, k, n, group_size).dequantize(x2d.dtype)
        return x2d @ w.to(x2d.device)
    return torch.ops.quick.gemm_w4a16_sm90(x2d, packed["qweight"], packed["scales"], packed["zeros"], None, group_size)


# ------------------------------------------------------------------------------------------------ W4A8


def _w4a8_reference(x2, qweight, channel_scale, group_scale, group_size, bias):
    """CPU path: the float64 reference of the same arithmetic, rounded to x's dtype."""
    packed = {"qweight": qweight, "channel_scale": channel_scale}
    if group_scale is not None:
        packed["group_scale"] = group_scale
    return w4a8_reference(x2, unpack_w4a8(packed, group_size), bias).to(x2.dtype)


@torch.library.custom_op("quick::gemm_w4a8", mutates_args=())
def gemm_w4a8(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, group_size: int,
    bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """W4A8 ``x [..., K] -> [..., N]``: activation quantization + int8 GEMM on CUDA, the reference on CPU."""
    x2 = w4._flatten(x)
    if x2.device.type == "cuda":
        out = select.matmul("w4a8", x2, qweight, channel_scale, group_scale, group_size, bias)
    else:
        w4.validate(x2, qweight, channel_scale, group_scale, group_size, bias, need_cuda=False)
        out = _w4a8_reference(x2, qweight, channel_scale, group_scale, group_size, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@gemm_w4a8.register_fake
def _gemm_w4a8_fake(x, qweight, channel_scale, group_scale, group_size, bias=None):
    x2 = w4._flatten(x)
    _, _, n = w4.validate(x2, qweight, channel_scale, group_scale, group_size, bias, need_cuda=False)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("quick::quantize_act_w4a8", mutates_args=())
def quantize_act_w4a8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 activations ``(x_q [M, K] int8, s_x [M] fp32)``: the CUDA kernel, or the reference on CPU."""
    if x.device.type == "cuda":
        return w4.quantize_activations_cuda(x)
    return quantize_activations(x)


@quantize_act_w4a8.register_fake
def _quantize_act_fake(x):
    if x.dim() != 2:
        raise w4.W4A8Error(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("quick::gemm_w4a8_sm90", mutates_args=())
def gemm_w4a8_sm90(
    x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, bias: Tensor | None, group_size: int,
    widen: bool = False,
) -> Tensor:  # fmt: skip
    """W4A8 ``x [M, K] -> [M, N]`` with weights in layout ``w4a8_sm90``; ``widen``: every group scale <= 16 (the
    layer knows it from its weights, so no call reads them)."""
    return select.matmul("w4a8_sm90", x, qweight, channel_scale, group_scale, group_size, bias, widen=widen)


@gemm_w4a8_sm90.register_fake
def _gemm_w4a8_sm90_fake(x, qweight, channel_scale, group_scale, bias, group_size, widen=False):
    w8.validate(x, qweight, channel_scale, group_scale, group_size, bias)
    return x.new_empty((x.shape[0], channel_scale.shape[0]))


def linear_w4a8(x2d: Tensor, packed: dict[str, Tensor], group_size: int, bias: Tensor | None = None) -> Tensor:
    """The dispatcher's entry for layout ``w4a8``: ``y [M, N]`` through ``quick::gemm_w4a8`` (the kernels for CUDA
    inputs, the float64 reference rounded to x's dtype on CPU). Views are copied to dense rows."""
    if isinstance(x2d, torch.Tensor) and x2d.is_cuda:
        x2d = mma._dense_rows(x2d)
    return torch.ops.quick.gemm_w4a8(
        x2d, packed["qweight"], packed["channel_scale"], packed.get("group_scale"), group_size, bias
    )


def linear_w4a8_sm90(x2d: Tensor, packed: dict[str, Tensor], group_size: int, *, widen: bool = False) -> Tensor:
    """The dispatcher's entry for layout ``w4a8_sm90`` (bias is added by the caller). The layout admits N multiples
    of 16, the kernel needs multiples of 64: such layers take the W4A8 arithmetic emulated in float32 instead."""
    n = packed["channel_scale"].shape[0]
    if n % 64:
        w = unpack_w4a8_sm90(packed, group_size)
        xq, sx = quantize_activations(x2d)
        y = (xq.float() @ w.dequantize(torch.float32).t().to(x2d.device)) * sx[:, None]
        return y.to(x2d.dtype)
    return torch.ops.quick.gemm_w4a8_sm90(
        x2d, packed["qweight"], packed["channel_scale"], packed.get("group_scale"), None, group_size, widen
    )


# ------------------------------------------------------------------------------- RMSNorm + W4A8 quantization


@torch.library.custom_op("quick::rms_norm_quant", mutates_args=())
def rms_norm_quant(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, offset: float, normed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_q int8 [M, K], s_x fp32 [M], r, normed)``: the W4A8 activations of ``RMSNorm(r)`` with ``r = residual
    + x`` (or ``x``), in one launch on CUDA (:mod:`quick.kernels.normquant`), the torch reference elsewhere. ``r``
    is the new residual where one was given, ``normed`` the norm's output where asked for; an output not produced
    is an empty tensor (a custom op returns tensors only, and none may alias an input)."""
    res = nq.rms_norm_quant(x, weight, eps, offset, residual, normed)
    r = res.residual if res.residual is not None else x.new_empty((0,))
    return res.xq, res.sx, r, res.normed if res.normed is not None else x.new_empty((0,))


@rms_norm_quant.register_fake
def _rms_norm_quant_fake(x, residual, weight, eps, offset, normed):
    m, k = nq.validate(x, weight, eps, offset, residual)
    xq, sx = x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)
    r = x.new_empty((m, k)) if residual is not None else x.new_empty((0,))
    return xq, sx, r, x.new_empty((m, k)) if normed else x.new_empty((0,))


def _w4a8_quantized_reference(xq, sx, packed: dict, group_size: int, bias, layout: str, out_dtype) -> Tensor:
    """CPU path of :func:`gemm_w4a8_quantized`: the format's arithmetic in float64 on the unpacked weights."""
    w = (unpack_w4a8 if layout == w4.LAYOUT else unpack_w4a8_sm90)(packed, group_size)
    y = (xq.double() @ w.dequantize(torch.float64).t()) * sx.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


@torch.library.custom_op("quick::gemm_w4a8_quantized", mutates_args=())
def gemm_w4a8_quantized(
    xq: Tensor, sx: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale: Tensor | None, bias: Tensor | None,
    group_size: int, layout: str, out_dtype: torch.dtype, widen: bool = False,
) -> Tensor:  # fmt: skip
    """W4A8 ``[M, N]`` in ``out_dtype`` from activations already quantized (``xq`` int8 [M, K], ``sx`` fp32 [M],
    e.g. by ``quick::rms_norm_quant``), weights in ``layout`` (``w4a8`` / ``w4a8_sm90``): the kernel
    :mod:`quick.kernels.select` picks for the same product on float activations; the float64 reference on CPU."""
    if xq.device.type == "cuda":
        return select.matmul_quantized(layout, xq, sx, qweight, channel_scale, group_scale, group_size, bias,
                                       out_dtype, widen=widen)  # fmt: skip
    select.validate_quantized(layout, xq, sx, qweight, channel_scale, group_scale, group_size, bias, out_dtype)
    packed = {"qweight": qweight, "channel_scale": channel_scale}
    if group_scale is not None:
        packed["group_scale"] = group_scale
    return _w4a8_quantized_reference(xq, sx, packed, group_size, bias, layout, out_dtype)


@gemm_w4a8_quantized.register_fake
def _gemm_w4a8_quantized_fake(xq, sx, qweight, channel_scale, group_scale, bias, group_size, layout, out_dtype,
                              widen=False):  # fmt: skip
    m, n, _ = select.validate_quantized(layout, xq, sx, qweight, channel_scale, group_scale, group_size, bias,
                                        out_dtype)  # fmt: skip
    return xq.new_empty((m, n), dtype=out_dtype)


# ------------------------------------------------------------------------------------------ mixture of experts


@torch.library.custom_op("quick::moe_gemm_w4a16", mutates_args=())
def moe_gemm_w4a16(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None, act: str = "",
    validate_ids: bool = False,
) -> Tensor:  # fmt: skip
    """The grouped product of a sorted-token plan (:mod:`quick.kernels.moe`): ``out [x.shape[0] * top_k, N]`` (``act``:
    ``act(gate) * up``, ``N / 2`` columns), ``out[s] = x[s // top_k] @ dequant(W[expert of s])`` (* ``topk_weights``)
    for every slot the plan names, zero elsewhere. Stacked weights in the ``quick`` layout."""
    return select.moe_matmul("quick", x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded,
                             top_k, topk_weights, act, validate_ids=validate_ids)  # fmt: skip


@torch.library.custom_op("quick::moe_dec_w4a16", mutates_args=())
def moe_dec_w4a16(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, gdiv: int, tokens: int, topk_weights: Tensor | None = None,
    act: str = "", fill: bool = True, layout: str = "quick",
) -> Tensor:  # fmt: skip
    """The decode kernel over a 16-row plan (:func:`quick.kernels.moe.dec_grouped`): ``out [x.shape[0] * gdiv, N]``,
    ``out[s] = x[s // gdiv] @ dequant(W[expert of s])`` (* ``topk_weights``), zero where no slot is named (``fill``;
    else those rows are left unwritten: an intermediate only the same plan's slots are read from); ``act``: ``x`` is
    the ``[slots, 2K]`` gate|up product and ``act(gate) * up`` is the input. Stacks in ``layout`` (``quick`` or
    ``quick_sm90``)."""
    from quick.kernels import moe as qmoe

    args = (x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, gdiv, tokens, topk_weights)
    d = qmoe.validate_dec(*args, act, layout=layout)
    return qmoe.dec_grouped(*args, act, None if fill else x.new_empty((d.slots, d.n)), layout=layout)


@moe_dec_w4a16.register_fake
def _moe_dec_fake(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, gdiv, tokens,
                  topk_weights=None, act="", fill=True, layout="quick"):  # fmt: skip
    from quick.kernels import moe as qmoe

    d = qmoe.validate_dec(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, gdiv, tokens,
                          topk_weights, act, need_cuda=False, layout=layout)  # fmt: skip
    return x.new_empty((d.slots, d.n))


@torch.library.custom_op("quick::moe_gemm_w4a16_sm90", mutates_args=())
def moe_gemm_w4a16_sm90(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sorted_ids: Tensor,
    block_experts: Tensor, num_padded: Tensor, top_k: int, topk_weights: Tensor | None = None, num_slots: int = -1,
    plan_rows_in: bool = False, plan_rows_out: bool = False, fill: bool = True,
) -> Tensor:  # fmt: skip
    """The grouped wgmma GEMM over a plan on stacks in the ``quick_sm90`` layout
    (:func:`quick.kernels.moe_sm90.grouped_gemm_sm90`): ``out[s] = x[s // top_k] @ dequant(W[expert of s])``
    (* ``topk_weights``) for every slot; ``plan_rows_in``: ``x`` is ``[capacity, K]`` in plan order (``num_slots``
    slots); ``plan_rows_out``: ``[capacity, N]`` in plan order; rows it does not write are zero with ``fill``."""
    from quick.kernels import moe_sm90

    return moe_sm90.grouped_gemm_sm90(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded,
                                      top_k, topk_weights, num_slots, plan_rows_in, plan_rows_out, fill)  # fmt: skip


@moe_gemm_w4a16_sm90.register_fake
def _moe_gemm_sm90_fake(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                        topk_weights=None, num_slots=-1, plan_rows_in=False, plan_rows_out=False,
                        fill=True):  # fmt: skip
    from quick.kernels import moe_sm90

    d, slots = moe_sm90.validate(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                                 topk_weights, num_slots, plan_rows_in, plan_rows_out, need_cuda=False)  # fmt: skip
    return x.new_empty((sorted_ids.shape[0] if plan_rows_out else slots, d.n))


@torch.library.custom_op("quick::moe_plan", mutates_args=())
def moe_plan(
    top_k_index: Tensor, num_experts: int, block_size: int, capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sorted-token plan of ``top_k_index`` in one launch (:func:`quick.kernels.moe.plan`): ``sorted_ids``,
    ``block_experts``, ``offsets``, ``counts``, ``num_padded`` (int32), as ``quick.nn.moe.build_plan(static=True,
    check=False)``."""
    from quick.kernels import moe as qmoe

    return qmoe.plan(top_k_index, num_experts, block_size, capacity)


@moe_plan.register_fake
def _moe_plan_fake(top_k_index, num_experts, block_size, capacity):
    def i32(n: int) -> Tensor:
        return top_k_index.new_empty((n,), dtype=torch.int32)

    return i32(capacity), i32(capacity // block_size), i32(num_experts + 1), i32(num_experts), i32(1)


@torch.library.custom_op("quick::moe_route", mutates_args=())
def moe_route(
    logits: Tensor, top_k: int, renormalize: bool, round_weights: bool, block_size: int, capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A router's softmax top-k and the plan of its batch in one launch (:func:`quick.kernels.moe.route`): ``ids``
    (int64), ``weights`` (fp32), then the five plan tensors of :func:`moe_plan`."""
    from quick.kernels import moe as qmoe

    return qmoe.route(logits, top_k, renormalize, round_weights, block_size, capacity)


@moe_route.register_fake
def _moe_route_fake(logits, top_k, renormalize, round_weights, block_size, capacity):
    t, e = logits.shape

    def i32(n: int) -> Tensor:
        return logits.new_empty((n,), dtype=torch.int32)

    ids = logits.new_empty((t, top_k), dtype=torch.int64)
    w = logits.new_empty((t, top_k), dtype=torch.float32)
    return ids, w, i32(capacity), i32(capacity // block_size), i32(e + 1), i32(e), i32(1)


@moe_gemm_w4a16.register_fake
def _moe_gemm_fake(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                   topk_weights=None, act="", validate_ids=False):  # fmt: skip
    from quick.kernels import moe as qmoe

    d = qmoe.validate(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                      topk_weights, act, need_cuda=False)  # fmt: skip
    return x.new_empty((d.slots, d.n_out))
