"""Bad input at every public entry point: each case must raise a clear Python exception that names the problem,
or give a documented correct result; never a crash, a hang or an illegal memory access.

Table-driven: every list below is one category of the README's "Reliability" table (``scripts/
count_bad_input.py`` counts the collected cases per category from ``CATEGORY``). GPU cases are marked ``gpu``
and skip without CUDA. Documented behaviours tested here (README, "Reliability"):

* M = 0 (no rows) gives an empty ``[0, N]`` result on every path (reference, kernels, fake/meta ops).
* NaN or inf in a row of x gives NaN/inf in that output row only; NaN in one scale gives NaN in that output
  column only (the other elements are exact as usual). ``quantize`` refuses NaN/inf weights.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from quick.formats.layouts import LAYOUTS, LayoutError, convert, get_layout
from quick.formats.weights import QuantizationError, QuantizedWeight, dequantize, quantize
from quick.kernels import select
from quick.testing import random_quantized, reference_matmul, rel_error

# test function -> README category (scripts/count_bad_input.py groups the collected cases by it)
CATEGORY = {
    "test_quantize_primitives": "quantize / dequantize primitives",
    "test_pack_unpack": "pack / unpack (every layout)",
    "test_quicklinear_init": "QuickLinear construction",
    "test_quicklinear_forward": "QuickLinear forward (CPU reference path)",
    "test_nonfinite_and_empty_cpu": "NaN / inf / empty inputs (documented results)",
    "test_kernel_validation_cpu": "kernel launchers and custom ops (CPU, fake/meta)",
    "test_model_quant_config": "model quantization (RTN, AWQ/W4A8 config, Auto API)",
    "test_checkpoint_load": "checkpoint load (corrupt, truncated, mismatched)",
    "test_save_killed": "checkpoint save killed (SIGKILL) mid-write",
    "test_cli": "CLI commands",
    "test_gpu_kernel_entry": "GPU kernel entry points (views, devices, out, shapes)",
    "test_gpu_nonfinite_and_empty": "NaN / inf / empty inputs (documented results)",
}

Raises = tuple[type[BaseException], str]  # (exception type, regex its message must match)


def _run(fn: Callable[[], object], expect: Raises | None) -> object:
    if expect is None:
        return fn()
    exc, match = expect
    with pytest.raises(exc, match=match):
        fn()
    return None


# ============================================================================== quantize / dequantize

W = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
QW = quantize(W, 128)

QUANTIZE_CASES = [
    ("1-D weight", lambda: quantize(torch.randn(10)), (QuantizationError, "2-D")),
    ("3-D weight", lambda: quantize(torch.randn(2, 64, 128)), (QuantizationError, "2-D")),
    ("bits=8", lambda: quantize(W, 128, bits=8), (QuantizationError, "4-bit")),
    ("bits=3", lambda: quantize(W, 128, bits=3), (QuantizationError, "4-bit")),
    ("integer weight", lambda: quantize(torch.ones(128, 256, dtype=torch.int32)), (QuantizationError, "floating")),
    ("bool weight", lambda: quantize(torch.ones(128, 256, dtype=torch.bool)), (QuantizationError, "floating")),
    ("complex weight", lambda: quantize(W.to(torch.complex64)), (QuantizationError, "floating")),
    ("fp32 scale dtype", lambda: quantize(W, dtype=torch.float32), (QuantizationError, "float16 or bfloat16")),
    ("group 0", lambda: quantize(W, 0), (QuantizationError, "group size 0")),
    ("group 48", lambda: quantize(W, 48), (QuantizationError, "group size 48")),
    ("group 256", lambda: quantize(W, 256), (QuantizationError, "group size 256")),
    ("group -2", lambda: quantize(W, -2), (QuantizationError, "group size -2")),
    ("group 128.0 (float)", lambda: quantize(W, 128.0), (QuantizationError, "group size 128.0")),
    ("group '128' (str)", lambda: quantize(W, "128"), (QuantizationError, "group size '128'")),
    ("group True", lambda: quantize(W, True), (QuantizationError, "group size True")),
    ("K not multiple of group", lambda: quantize(torch.randn(64, 96), 64), (QuantizationError, "K=96")),
    ("empty N", lambda: quantize(torch.randn(0, 256)), (QuantizationError, "empty")),
    ("empty K", lambda: quantize(torch.randn(64, 0)), (QuantizationError, "empty")),
    ("meta weight", lambda: quantize(W.to("meta")), (QuantizationError, "meta")),
    ("NaN weight", lambda: quantize(torch.where(W > 2, float("nan"), W)), (QuantizationError, "NaN or inf")),
    ("inf weight", lambda: quantize(torch.where(W > 2, float("inf"), W)), (QuantizationError, "NaN or inf")),
    ("range overflows fp16 scales", lambda: quantize(W * 1e6), (QuantizationError, "too large for torch.float16")),
    ("same range in bf16 is fine", lambda: quantize(W * 1e6, dtype=torch.bfloat16), None),
    ("fp64 weight is fine", lambda: quantize(W.double()), None),
    ("dequantize 1-D codes", lambda: dequantize(QW.q.flatten(), QW.scales, QW.zeros, 128), (QuantizationError, "2-D")),
    ("dequantize scales rows", lambda: dequantize(QW.q, QW.scales[:1], QW.zeros, 128), (QuantizationError, "scales")),
    ("dequantize zeros cols", lambda: dequantize(QW.q, QW.scales, QW.zeros[:, :5], 128), (QuantizationError, "zeros")),
    ("dequantize wrong group", lambda: dequantize(QW.q, QW.scales, QW.zeros, 64), (QuantizationError, "scales")),
    ("dequantize group 7", lambda: dequantize(QW.q, QW.scales, QW.zeros, 7), (QuantizationError, "group size 7")),
]


@pytest.mark.parametrize(("name", "fn", "expect"), QUANTIZE_CASES, ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_primitives(name, fn, expect):
    _run(fn, expect)


# ============================================================================== pack / unpack


def _qw(**kw) -> QuantizedWeight:
    base = {"q": QW.q, "scales": QW.scales, "zeros": QW.zeros, "group_size": 128}
    base.update(kw)
    return QuantizedWeight(**base)


def _packed(layout: str) -> dict:
    return get_layout(layout).pack(QW)


PACK_BAD = [
    ("codes > 15", lambda: _qw(q=QW.q + 16), (QuantizationError, r"\[0, 15\]")),
    ("negative codes", lambda: _qw(q=QW.q.to(torch.int16) - 1), (QuantizationError, r"\[0, 15\]")),
    ("float codes", lambda: _qw(q=QW.q.float() + 0.5), (QuantizationError, "integer dtype")),
    ("1-D codes", lambda: _qw(q=QW.q.flatten()), (QuantizationError, "2-D")),
    ("zeros > 15", lambda: _qw(zeros=QW.zeros + 20), (QuantizationError, "zero points")),
    ("fractional zeros", lambda: _qw(zeros=QW.zeros.half() + 0.5), (QuantizationError, "zero points")),
    ("NaN zeros", lambda: _qw(zeros=torch.full_like(QW.scales, float("nan"))), (QuantizationError, "zero points")),
    ("scales wrong N", lambda: _qw(scales=QW.scales[:, :8]), (QuantizationError, "scales has shape")),
    ("scales fp32", lambda: _qw(scales=QW.scales.float()), (QuantizationError, "float16 or bfloat16")),
    ("group 64 vs scales of 128", lambda: _qw(group_size=64), (QuantizationError, "expected")),
    ("group 48", lambda: _qw(group_size=48), (QuantizationError, "group size 48")),
    ("bits 8", lambda: QuantizedWeight(QW.q, QW.scales, QW.zeros, 128, bits=8), (QuantizationError, "4-bit")),
]
PACK_SHAPES = [  # (layout, K, N, group): shapes the layout cannot hold
    ("quick", 128, 72, 32),
    ("quick", 136, 64, -1),  # K % 16
    ("quick_sm90", 96, 128, 32),  # K % 64
    ("quick_sm90", 128, 72, 32),  # N % 16
    ("awq_gemm", 128, 68, 32),  # N % 8
]


def _unpack_bad(layout: str):
    p = _packed(layout)
    k, n = QW.shape
    first = next(iter(p))
    return [
        (
            f"{layout} missing {first}",
            lambda: get_layout(layout).unpack({k2: v for k2, v in p.items() if k2 != first}, k, n, 128),
            (LayoutError, "missing"),
        ),
        (f"{layout} wrong K", lambda: get_layout(layout).unpack(p, 2 * k, n, 128), (LayoutError, "shape")),
        (f"{layout} wrong group", lambda: get_layout(layout).unpack(p, k, n, 64), (LayoutError, "shape")),
        (
            f"{layout} qweight int16",
            lambda: get_layout(layout).unpack({**p, "qweight": p["qweight"].to(torch.int16)}, k, n, 128),
            (LayoutError, "dtype"),
        ),
        (
            f"{layout} qweight list",
            lambda: get_layout(layout).unpack({**p, "qweight": [1, 2]}, k, n, 128),
            (LayoutError, "torch.Tensor"),
        ),
        (
            f"{layout} scales fp32",
            lambda: get_layout(layout).unpack({**p, "scales": p["scales"].float()}, k, n, 128),
            (LayoutError, "dtype"),
        ),
        (
            f"{layout} K not layout multiple",
            lambda: get_layout(layout).unpack(p, k + 8, n, -1),
            (ValueError, "shape|needs"),
        ),
        (f"{layout} non-contiguous view unpacks exactly", lambda: _roundtrip_view(layout), None),
        (
            f"{layout} convert to unknown layout",
            lambda: convert(p, layout, "nope", k, n, 128),
            (LayoutError, "unknown layout"),
        ),
    ]


def _roundtrip_view(layout: str) -> None:
    p = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in _packed(layout).items()}
    back = get_layout(layout).unpack(p, *QW.shape, 128)
    assert torch.equal(back.q, QW.q) and torch.equal(back.zeros, QW.zeros)


PACK_CASES = (
    [
        (f"{lay} pack {name}", (lambda f=f, lay=lay: get_layout(lay).pack(f())), e)
        for lay in sorted(LAYOUTS)
        if lay in ("quick", "quick_sm90", "awq_gemm")
        for name, f, e in PACK_BAD
    ]
    + [
        (
            f"{lay} pack K={k} N={n}",
            (lambda lay=lay, k=k, n=n, g=g: get_layout(lay).pack(quantize(torch.randn(n, k), g))),
            (ValueError, "needs|multiple"),
        )
        for lay, k, n, g in PACK_SHAPES
    ]
    + [c for lay in ("quick", "quick_sm90", "awq_gemm") for c in _unpack_bad(lay)]
    + [("unknown layout name", lambda: get_layout("nope"), (LayoutError, "unknown layout 'nope'"))]
)


@pytest.mark.parametrize(("name", "fn", "expect"), PACK_CASES, ids=[c[0] for c in PACK_CASES])
def test_pack_unpack(name, fn, expect):
    _run(fn, expect)


# ============================================================================== QuickLinear


def _ql(**kw):
    from quick.nn.linear import QuickLinear

    args = {"in_features": 256, "out_features": 128}
    args.update(kw)
    return QuickLinear(**args)


INIT_CASES = [
    ("group 48", lambda: _ql(group_size=48), (QuantizationError, "group size 48")),
    ("K not multiple of group", lambda: _ql(in_features=100), (QuantizationError, "K=100")),
    ("N not multiple of 64 (quick)", lambda: _ql(out_features=100), (LayoutError, "N % 64")),
    (
        "K not multiple of 64 (quick_sm90)",
        lambda: _ql(in_features=96, group_size=32, layout="quick_sm90"),
        (LayoutError, "K % 64"),
    ),
    ("N = 0", lambda: _ql(out_features=0), (ValueError, "out_features must be a positive int")),
    ("K = 0", lambda: _ql(in_features=0), (ValueError, "in_features must be a positive int")),
    ("K < 0", lambda: _ql(in_features=-128), (ValueError, "positive int")),
    ("float K", lambda: _ql(in_features=256.0), (ValueError, "positive int")),
    ("dtype fp32", lambda: _ql(dtype=torch.float32), (ValueError, "float16 or bfloat16")),
    ("dtype int8", lambda: _ql(dtype=torch.int8), (ValueError, "float16 or bfloat16")),
    ("unknown layout", lambda: _ql(layout="nope"), (LayoutError, "unknown layout")),
    ("logical K > K", lambda: _ql(logical_in_features=300), (ValueError, "logical in_features 300")),
    ("from_linear NaN weight", lambda: _from_linear(float("nan")), (QuantizationError, "NaN or inf")),
    ("from_linear inf weight", lambda: _from_linear(float("inf")), (QuantizationError, "NaN or inf")),
    ("from_linear N=100", lambda: _from_linear(None, n=100), (LayoutError, "N % 64")),
    ("from_linear ragged K=200 is padded", lambda: _from_linear(None, k=200), None),
    ("from_quantized codes > 15", lambda: _from_quantized(_qw(q=QW.q + 16)), (QuantizationError, r"\[0, 15\]")),
]


def _from_linear(fill, k: int = 256, n: int = 128):
    from quick.nn.linear import QuickLinear

    lin = nn.Linear(k, n)
    if fill is not None:
        with torch.no_grad():
            lin.weight[3, 5] = fill
    return QuickLinear.from_linear(lin, 128)


def _from_quantized(qw):
    from quick.nn.linear import QuickLinear

    return QuickLinear.from_quantized(qw)


@pytest.mark.parametrize(("name", "fn", "expect"), INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_quicklinear_init(name, fn, expect):
    _run(fn, expect)


def _layer(k: int = 256, n: int = 128, layout: str = "quick", dtype=torch.float16, bias: bool = True):
    from quick.nn.linear import QuickLinear

    torch.manual_seed(1)
    lin = nn.Linear(k, n, bias=bias)
    return QuickLinear.from_linear(lin, 128, layout, dtype=dtype)


X = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).half()


def _fwd(x, backend: str = "auto", **kw):
    m = _layer(**kw)
    m.backend = backend
    return m(x)


def _fwd_matches(x):
    m = _layer()
    ref = reference_matmul(x.reshape(-1, 256).contiguous(), m.unpack(), m.bias)
    out = m(x).reshape(-1, 128)
    assert rel_error(out, ref) < 2e-3


FORWARD_CASES = [
    ("wrong K", lambda: _fwd(torch.randn(4, 100).half()), (ValueError, "input last dim 100")),
    ("fp32 input", lambda: _fwd(X.float()), (TypeError, "input dtype torch.float32")),
    ("bf16 input to fp16 layer", lambda: _fwd(X.bfloat16()), (TypeError, "torch.bfloat16")),
    ("int64 input", lambda: _fwd(X.long()), (TypeError, "torch.int64")),
    ("0-d input", lambda: _fwd(torch.tensor(1.0).half()), (ValueError, "scalar")),
    ("list input", lambda: _fwd([[1.0] * 256]), (TypeError, "torch.Tensor")),
    ("meta input", lambda: _fwd(X.to("meta")), (ValueError, "input on meta")),
    ("unknown backend", lambda: _fwd(X, backend="fast"), (ValueError, "unknown backend")),
    ("backend kernel on CPU", lambda: _fwd(X, backend="kernel"), (RuntimeError, "no GPU kernel")),
    ("1-D input [K] works like nn.Linear", lambda: _fwd_matches(X[0]), None),
    ("non-contiguous input", lambda: _fwd_matches(torch.randn(256, 4).half().t()), None),
    ("misaligned view input", lambda: _fwd_matches(torch.randn(4 * 256 + 1).half()[1:].view(4, 256)), None),
    ("3-D input", lambda: _fwd_matches(X.reshape(2, 2, 256)), None),
    ("ragged layer takes the real K", lambda: _fwd(torch.randn(3, 200).half(), k=200), None),
    ("ragged layer takes the padded K", lambda: _fwd(torch.randn(3, 256).half(), k=200), None),
    ("ragged layer refuses other K", lambda: _fwd(torch.randn(3, 228).half(), k=200), (ValueError, "input last dim")),
]


@pytest.mark.parametrize(("name", "fn", "expect"), FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_quicklinear_forward(name, fn, expect):
    _run(fn, expect)


# ============================================================================== NaN / inf / empty (CPU)


def _nan_rows(layout: str):
    m = _layer(layout=layout)
    x = X.clone()
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    out = m(x)
    clean = m(X)
    assert torch.isnan(out[1]).all()  # NaN * anything = NaN: the whole row
    assert not torch.isfinite(out[2]).all()  # inf row: inf or NaN (inf * 0 = NaN)
    assert torch.isfinite(out[[0, 3]]).all() and torch.equal(out[[0, 3]], clean[[0, 3]])  # other rows untouched


def _nan_scale_column(layout: str):
    m = _layer(layout=layout, bias=False)
    qw = m.unpack()
    qw.scales[0, 5] = float("nan")
    for name, t in get_layout(layout).pack(qw).items():
        getattr(m, name).copy_(t)
    out = m(X)
    assert torch.isnan(out[:, 5]).all()
    keep = [c for c in range(128) if c != 5]
    assert torch.isfinite(out[:, keep]).all()


def _empty(shape, layout: str = "quick"):
    out = _layer(layout=layout)(torch.randn(*shape).half())
    assert tuple(out.shape) == (*shape[:-1], 128)


NONFINITE_CPU_CASES = [
    (f"{lay} {name}", (lambda f=f, lay=lay: f(lay)), None)
    for lay in ("quick", "quick_sm90", "awq_gemm")
    for name, f in (
        ("NaN/inf row stays in its row", _nan_rows),
        ("NaN scale poisons its column only", _nan_scale_column),
        ("M = 0", lambda lay: _empty((0, 256), lay)),
        ("[2, 0, K]", lambda lay: _empty((2, 0, 256), lay)),
    )
]


@pytest.mark.parametrize(("name", "fn", "expect"), NONFINITE_CPU_CASES, ids=[c[0] for c in NONFINITE_CPU_CASES])
def test_nonfinite_and_empty_cpu(name, fn, expect):
    _run(fn, expect)


# ============================================================================== kernel launchers, ops (CPU)


def _meta(d: dict) -> dict:
    return {k: v.to("meta") for k, v in d.items()}


def _op(x, p=None, g=128, bias=None):
    from quick.kernels import ops  # noqa: F401  (defines the op)

    p = p or _meta(_packed("quick"))
    return torch.ops.quick.gemm_w4a16(x, p["qweight"], p["scales"], p["zeros"], g, bias)


def _sm90_op(x, p=None, g=128, bias=None):
    from quick.kernels import ops  # noqa: F401  (defines the op)

    p = p or _meta(_packed("quick_sm90"))
    return torch.ops.quick.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], bias, g)


XM = X.to("meta")
PM = None  # built lazily in the lambdas (meta copies of the packed test weight)


def _shape_is(fn, shape):
    out = fn()
    assert tuple(out.shape) == shape, out.shape


def _mma(name: str, *args, **kw):
    from quick.kernels import mma, select

    if name == "matmul":  # the automatic entry: the selection layer's
        return select.matmul("quick", *args, **kw)
    return getattr(mma, name)(*args, **kw)


def _p(layout="quick"):
    return _packed(layout)


KERNEL_CPU_CASES = [
    ("op fake: M = 0 gives [0, N]", lambda: _shape_is(lambda: _op(XM[:0]), (0, 128)), None),
    ("op fake: 3-D x", lambda: _shape_is(lambda: _op(XM.reshape(2, 2, 256)), (2, 2, 128)), None),
    ("op fake: 1-D x", lambda: _shape_is(lambda: _op(XM[0]), (128,)), None),
    ("op fake: 0-d x", lambda: _op(XM[0, 0]), (ValueError, "at least one dimension")),
    ("op fake: K mismatch", lambda: _op(XM[:, :128]), (ValueError, "k16 rows")),
    ("op fake: group mismatch", lambda: _op(XM, g=64), (ValueError, "scales has shape")),
    ("op fake: group 48", lambda: _op(XM, g=48), (ValueError, "group_size 48")),
    ("op fake: fp32 x", lambda: _op(XM.float()), (TypeError, "float16 or bfloat16")),
    (
        "op fake: scales dtype",
        lambda: _op(XM, {**_meta(_p()), "scales": _meta(_p())["scales"].bfloat16()}),
        (TypeError, "scales must have x's dtype"),
    ),
    (
        "op fake: qweight int64",
        lambda: _op(XM, {**_meta(_p()), "qweight": _meta(_p())["qweight"].long()}),
        (TypeError, "int32"),
    ),
    (
        "op fake: bias shape",
        lambda: _op(XM, bias=torch.zeros(5, dtype=torch.float16, device="meta")),
        (ValueError, "bias must have shape"),
    ),
    (
        "op fake: bias dtype",
        lambda: _op(XM, bias=torch.zeros(128, device="meta")),
        (TypeError, "bias must have x's dtype"),
    ),
    (
        "op fake: N not multiple of 64",
        lambda: _op(XM, {k: v[:, :100] if k != "qweight" else v[:, :200] for k, v in _meta(_p()).items()}),
        (ValueError, "multiples of 64"),
    ),
    (
        "op fake: non-contiguous 3-D x",
        lambda: _op(torch.empty(2, 256, 2, dtype=torch.float16, device="meta").transpose(1, 2)),
        (ValueError, "contiguous"),
    ),
    ("op real on CPU tensors", lambda: _op(X, _p()), (ValueError, "CUDA tensors")),
    ("sm90 op fake: M = 0", lambda: _shape_is(lambda: _sm90_op(XM[:0]), (0, 128)), None),
    ("sm90 op fake: K mismatch", lambda: _sm90_op(XM[:, :128]), (ValueError, "qweight has shape")),
    ("sm90 op fake: 3-D x", lambda: _sm90_op(XM.reshape(2, 2, 256)), (ValueError, "2-D")),
    ("sm90 op fake: fp32 x", lambda: _sm90_op(XM.float()), (ValueError, "float16 or bfloat16")),
    (
        "sm90 op fake: uint8 zeros",
        lambda: _sm90_op(XM, {**_meta(_p("quick_sm90")), "zeros": _meta(_p("quick_sm90"))["zeros"].to(torch.uint8)}),
        (ValueError, "zeros dtype"),
    ),
    (
        "sm90 op fake: 1-D scales",
        lambda: _sm90_op(XM, {**_meta(_p("quick_sm90")), "scales": _meta(_p("quick_sm90"))["scales"][0]}),
        (ValueError, "2-D"),
    ),
    ("sm90 op fake: group 48", lambda: _sm90_op(XM, g=48), (ValueError, "group size 48")),
    ("sm90 real on CPU tensors", lambda: _sm90_call(X, _p("quick_sm90")), (ValueError, "CUDA tensors only")),
    ("sm90 mixed devices", lambda: _sm90_call(X, _meta(_p("quick_sm90"))), (ValueError, "one device")),
    (
        "sm90 qweight not a tensor",
        lambda: _sm90_call(X, {**_p("quick_sm90"), "qweight": [1]}),
        (ValueError, "torch.Tensor"),
    ),
    ("mma matmul on CPU", lambda: _mma("matmul", X, *_p().values(), 128), (ValueError, "CUDA tensors")),
    ("mma gemm on CPU", lambda: _mma("gemm", X, *_p().values(), 128), (ValueError, "CUDA tensors")),
    ("mma gemv on CPU", lambda: _mma("gemv", X, *_p().values(), 128), (ValueError, "CUDA tensors")),
    (
        "mma validate x not a tensor",
        lambda: _mma("validate", [1], *_p().values(), 128, need_cuda=False),
        (TypeError, "torch.Tensor"),
    ),
    (
        "mma unknown GEMM config",
        lambda: _mma("plan_gemm", 16, 256, 128, 132, "nope"),
        (ValueError, "unknown GEMM config"),
    ),
    (
        "mma unknown GEMV config",
        lambda: _mma("plan_gemv", 4, 256, 128, 128, 132, "nope"),
        (ValueError, "unknown GEMV config"),
    ),
    (
        "mma config stage does not divide K",
        lambda: _mma("plan_gemm", 16, 256, 128, 132, "m16n2k4"),
        (ValueError, "K % 256"),
    ),
    ("dispatcher: no kernel on CPU", lambda: _no_kernel_cpu(), None),
    # the fused decode-path ops (gate/up -> down, + add + RMSNorm; rotary + cache + attention)
    ("gated op fake: odd gate/up width", lambda: _gated_op(XM.repeat(1, 2)[:, :-1]), (ValueError, "gate/up")),
    ("gated op fake: M = 0", lambda: _shape_is(lambda: _gated_op(XM.repeat(1, 2)[:0]), (0, 128)), None),
    ("gated real on CPU tensors", lambda: _gated_call(X.repeat(1, 2)), (ValueError, "CUDA tensors only")),
    ("gated: unknown activation", lambda: _gated_call(X.repeat(1, 2), act="relu"), (ValueError, "activation")),
    ("add+norm: residual shape", lambda: _norm_call(X, torch.zeros(4, 64).half()), (ValueError, "residual")),
    ("add+norm: weight dtype", lambda: _norm_call(X, w=torch.ones(128)), (ValueError, "norm weight")),
    ("add+norm: real on CPU tensors", lambda: _norm_call(X), (ValueError, "CUDA tensors only")),
    ("add+norm op fake: shapes", lambda: _shape_is(lambda: _norm_op()[1], (4, 128)), None),
    ("rope attention: cos not full width", lambda: _rope_call(cos_cols=32), (ValueError, "full rotary")),
    ("rope attention: k rows", lambda: _rope_call(k_cols=64), (ValueError, "k must be")),
    ("rope attention: int32 pos", lambda: _rope_call(pos=torch.zeros(1, dtype=torch.int32)), (ValueError, "int64")),
]


def _gated_op(gu):
    from quick.kernels import ops  # noqa: F401  (defines the op)

    p = _meta(_packed("quick_sm90"))
    return torch.ops.quick.gated_gemm_w4a16_sm90(gu, p["qweight"], p["scales"], p["zeros"], None, 128, "silu")


def _gated_call(gu, act="silu"):
    from quick.kernels import ops

    p = _packed("quick_sm90")
    return ops.gated_gemm(gu, p["qweight"], p["scales"], p["zeros"], 128, None, act)


def _norm_call(x, resid=None, w=None):
    from quick.kernels import ops

    p = _packed("quick_sm90")
    resid = torch.zeros(x.shape[0], 128).half() if resid is None else resid
    w = torch.ones(128).half() if w is None else w
    return ops.gemm_add_norm(x, p["qweight"], p["scales"], p["zeros"], 128, None, resid, w, 1e-6)


def _norm_op():
    from quick.kernels import ops  # noqa: F401  (defines the op)

    p = _meta(_packed("quick_sm90"))
    resid, w = torch.empty(4, 128, dtype=torch.float16, device="meta"), torch.empty(128, device="meta").half()
    return torch.ops.quick.gemm_add_norm_sm90(XM, p["qweight"], p["scales"], p["zeros"], None, 128, resid, w, 1e-6, 0.0,
                                              "")  # fmt: skip


def _rope_call(cos_cols=64, k_cols=128, pos=None):
    from quick.kernels import attention

    b, d = 2, 64
    q, k, v = torch.zeros(b, 4 * d).half(), torch.zeros(b, k_cols).half(), torch.zeros(b, 2 * d).half()
    cache = torch.zeros(b, 2, 8, d).half()
    cos, sin = torch.ones(b, cos_cols).half(), torch.zeros(b, d).half()
    pos = torch.zeros(1, dtype=torch.int64) if pos is None else pos
    return attention.decode_attention_rope(q, k, v, cache, cache.clone(), pos, cos, sin, None, 0.125)


def _sm90_call(x, p, g=128):
    from quick.kernels import wgmma

    return wgmma.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], g)


def _no_kernel_cpu():
    from quick.kernels import dispatch

    for layout in sorted(LAYOUTS):
        assert dispatch.kernel_for(layout, X) is None, layout


@pytest.mark.parametrize(("name", "fn", "expect"), KERNEL_CPU_CASES, ids=[c[0] for c in KERNEL_CPU_CASES])
def test_kernel_validation_cpu(name, fn, expect):
    _run(fn, expect)


# ============================================================================== model quantization / Auto API

transformers = pytest.importorskip("transformers")
SMOL = Path.home() / ".cache" / "quick" / "models" / "SmolLM2-135M-Instruct"


def tiny_llama(vocab: int = 256, inter: int = 128, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, intermediate_size=inter, vocab_size=vocab, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _rtn(model=None, **kw):
    from quick.algorithms.rtn import quantize_model_rtn

    return quantize_model_rtn(model or tiny_llama(), progress=False, **kw)


def _qc(**kw):
    from quick.auto import validate_quant_config

    return validate_quant_config(kw)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense Llama with the bundled SmolLM2 tokenizer (vocabulary sized to match)."""
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("bundled SmolLM2 tokenizer not installed (run `quick setup`)")
    d = tmp_path_factory.mktemp("dense")
    tok = transformers.AutoTokenizer.from_pretrained(SMOL)
    tiny_llama(vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _auto(dense_dir, **quant_kw):
    from quick.auto import AutoQuickForCausalLM

    model = AutoQuickForCausalLM.from_pretrained(dense_dir, device="cpu")
    return model.quantize(progress=False, **quant_kw)


def _quantize_twice(dense_dir):
    model = _auto(dense_dir, method="rtn")
    model.quantize(method="rtn", progress=False)


def _save_unquantized(dense_dir, tmp):
    from quick.auto import AutoQuickForCausalLM

    AutoQuickForCausalLM.from_pretrained(dense_dir, device="cpu").save_quantized(tmp / "out")


def _no_linears():
    m = nn.Sequential(nn.ReLU())
    assert _rtn(m) is m


MODEL_CASES = [
    ("rtn group 48", lambda d, t: _rtn(group_size=48), (QuantizationError, "group size 48")),
    ("rtn unknown layout", lambda d, t: _rtn(layout="nope"), (LayoutError, "unknown layout")),
    ("rtn N not multiple of 64 names the layer", lambda d, t: _rtn(tiny_llama(inter=100)), (QuantizationError, "mlp")),
    ("rtn fp32 scales", lambda d, t: _rtn(dtype=torch.float32), (QuantizationError, "float16 or bfloat16")),
    ("rtn model without linears is unchanged", lambda d, t: _no_linears(), None),
    ("config unknown key", lambda d, t: _qc(bits=4), (QuantizationError, "unknown quant_config keys")),
    ("config w_bit 8", lambda d, t: _qc(w_bit=8), (QuantizationError, "w_bit=8")),
    ("config group 48", lambda d, t: _qc(q_group_size=48), (QuantizationError, "q_group_size=48")),
    ("config zero_point 'yes'", lambda d, t: _qc(zero_point="yes"), (QuantizationError, "zero_point")),
    ("config unknown version", lambda d, t: _qc(version="marlin"), (QuantizationError, "unknown version")),
    ("config a_bit 4", lambda d, t: _qc(a_bit=4), (QuantizationError, "a_bit=4")),
    (
        "config w4a8 with zero point",
        lambda d, t: _qc(a_bit=8, version="w4a8", zero_point=True),
        (QuantizationError, "symmetric"),
    ),
    (
        "config w4a8 group 32",
        lambda d, t: _qc(a_bit=8, version="w4a8", q_group_size=32),
        (QuantizationError, "q_group_size=32"),
    ),
    ("awq: samples not token ids", lambda d, t: _awq(torch.randn(2, 16)), (QuantizationError, "token ids")),
    (
        "awq: batch_size 0",
        lambda d, t: _awq(torch.zeros(2, 16, dtype=torch.long), batch_size=0),
        (QuantizationError, "batch_size"),
    ),
    (
        "awq: fp32 scale dtype",
        lambda d, t: _awq(torch.zeros(2, 16, dtype=torch.long), scale_dtype=torch.float32),
        (QuantizationError, "float16 or bfloat16"),
    ),
    ("auto: unknown method", lambda d, t: _auto(d, method="gptq"), (QuantizationError, "unknown method")),
    ("auto: qqq for W4A16", lambda d, t: _auto(d, method="qqq"), (QuantizationError, "W4A8")),
    (
        "auto: awq for W4A8",
        lambda d, t: _auto(d, method="awq", quant_config={"a_bit": 8, "version": "w4a8"}),
        (QuantizationError, "qqq"),
    ),
    (
        "auto: bad quant_config",
        lambda d, t: _auto(d, method="rtn", quant_config={"q_group_size": 48}),
        (QuantizationError, "48"),
    ),
    (
        "auto: calibration file missing",
        lambda d, t: _auto(d, method="awq", calib_data=str(t / "missing.txt")),
        (QuantizationError, "not found"),
    ),
    (
        "auto: calibration too short",
        lambda d, t: _auto(d, method="awq", calib_data=["hi"], n_samples=1, seqlen=64),
        (QuantizationError, "fewer than seqlen"),
    ),
    ("auto: n_samples 0", lambda d, t: _auto(d, method="awq", n_samples=0), (QuantizationError, "n_samples")),
    ("auto: quantize twice", lambda d, t: _quantize_twice(d), (QuantizationError, "already quantized")),
    ("auto: save before quantize", lambda d, t: _save_unquantized(d, t), (QuantizationError, "quantize the model")),
    ("auto: missing directory", lambda d, t: _load_auto(t / "missing"), (RuntimeError, "does not exist")),
]


def _awq(samples, **kw):
    from quick.algorithms.awq import quantize_model_awq

    return quantize_model_awq(tiny_llama(), samples, 32, progress=False, **kw)


def _load_auto(path):
    from quick.auto import AutoQuickForCausalLM

    return AutoQuickForCausalLM.from_pretrained(path, device="cpu")


@pytest.mark.parametrize(("name", "fn", "expect"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_quant_config(name, fn, expect, request, tmp_path):
    needs_dir = name.startswith("auto:") and "missing directory" not in name
    d = request.getfixturevalue("dense_dir") if needs_dir else None
    _run(lambda: fn(d, tmp_path), expect)


# ============================================================================== checkpoint load


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from quick.auto import quantize_model_rtn
    from quick.checkpoint import make_quant_config, save_quantized

    d = tmp_path_factory.mktemp("ck") / "ck"
    save_quantized(quantize_model_rtn(tiny_llama(), 32, scale_dtype=torch.float16), d, make_quant_config("quick", 32))
    return d


def _shard(d: Path) -> Path:
    return sorted(d.glob("*.safetensors"))[0]


def _truncate(n_or_frac):
    def f(d: Path):
        s = _shard(d)
        data = s.read_bytes()
        cut = n_or_frac if isinstance(n_or_frac, int) and n_or_frac >= 0 else len(data) + n_or_frac
        if isinstance(n_or_frac, float):
            cut = int(len(data) * n_or_frac)
        s.write_bytes(data[:cut])

    return f


def _append(d: Path):
    s = _shard(d)
    s.write_bytes(s.read_bytes() + b"xx")


def _header(edit):
    def f(d: Path):
        s = _shard(d)
        b = s.read_bytes()
        n = int.from_bytes(b[:8], "little")
        h = json.loads(b[8 : 8 + n])
        edit(h)
        hb = json.dumps(h).encode()
        s.write_bytes(len(hb).to_bytes(8, "little") + hb + b[8 + n :])

    return f


def _first(h: dict, suffix: str) -> str:
    return next(k for k in h if k.endswith(suffix))


def _tensors(edit):
    def f(d: Path):
        from safetensors.torch import load_file, save_file

        s = _shard(d)
        t = load_file(s)
        edit(t)
        save_file(t, s, metadata={"format": "pt"})

    return f


def _config(edit):
    def f(d: Path):
        c = d / "config.json"
        cfg = json.loads(c.read_text())
        edit(cfg)
        c.write_text(json.dumps(cfg))

    return f


def _write(name: str, text: str):
    def f(d: Path):
        (d / name).write_text(text)

    return f


def _qcfg(**kw):
    return _config(lambda c: c["quantization_config"].update(kw))


def _index(edit):
    def f(d: Path):
        from quick.checkpoint import INDEX_NAME

        p = d / INDEX_NAME
        idx = json.loads(p.read_text())
        edit(idx)
        p.write_text(json.dumps(idx))

    return f


def _set(t: dict, suffix: str, fn):
    k = next(k for k in t if k.endswith(suffix))
    t[k] = fn(t[k])


def _del_norm(d: Path):
    _tensors(lambda t: t.pop("model.norm.weight"))(d)
    _index(lambda i: i["weight_map"].pop("model.norm.weight"))(d)


def _nan_scale(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


CKPT_CASES = [
    ("empty shard", _truncate(0), "truncated"),
    ("4-byte shard", _truncate(4), "truncated"),
    ("header cut", _truncate(20), "truncated or corrupt"),
    ("half the data", _truncate(0.5), "truncated or corrupt"),
    ("last byte missing", _truncate(-1), "truncated or corrupt"),
    ("trailing bytes", _append, "truncated or corrupt"),
    (
        "header length absurd",
        lambda d: _shard(d).write_bytes((2**62).to_bytes(8, "little") + _shard(d).read_bytes()[8:]),
        "corrupt",
    ),
    (
        "header not JSON",
        lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:8] + b"{" * 20 + _shard(d).read_bytes()[28:]),
        "corrupt",
    ),
    (
        "header offsets wrong",
        _header(
            lambda h: h[_first(h, "qweight")]["data_offsets"].__setitem__(
                1, h[_first(h, "qweight")]["data_offsets"][1] + 4
            )
        ),
        "corrupt",
    ),
    ("header dtype lies", _header(lambda h: h[_first(h, "qweight")].__setitem__("dtype", "F16")), "corrupt"),
    ("header unknown dtype", _header(lambda h: h[_first(h, "qweight")].__setitem__("dtype", "X9")), "corrupt"),
    (
        "qweight wrong shape",
        _tensors(lambda t: _set(t, "up_proj.qweight", lambda v: v[:, :128].contiguous())),
        "up_proj.qweight",
    ),
    ("scales wrong shape", _tensors(lambda t: _set(t, "q_proj.scales", lambda v: v[:1].contiguous())), "q_proj.scales"),
    (
        "dense wrong shape",
        _tensors(lambda t: _set(t, "input_layernorm.weight", lambda v: v[:63].contiguous())),
        "input_layernorm",
    ),
    ("qweight float dtype", _tensors(lambda t: _set(t, "v_proj.qweight", lambda v: v.float())), "v_proj.qweight"),
    ("one scales bf16", _tensors(lambda t: _set(t, "k_proj.scales", lambda v: v.bfloat16())), "mixed"),
    (
        "all scales fp32",
        _tensors(lambda t: [_set(t, k, lambda v: v.float()) for k in [k for k in t if k.endswith(".scales")]]),
        "float16 or bfloat16 scales",
    ),
    ("dense int dtype", _tensors(lambda t: _set(t, "model.norm.weight", lambda v: v.int())), "model.norm.weight"),
    ("missing dense tensor", _del_norm, "model.norm.weight"),
    ("missing zeros", _tensors(lambda t: t.pop(next(k for k in t if k.endswith("o_proj.zeros")))), "o_proj.zeros"),
    (
        "orphan qweight",
        _tensors(lambda t: t.__setitem__("model.layers.7.mlp.up_proj.qweight", torch.zeros(4, 4, dtype=torch.int32))),
        "does not belong",
    ),
    ("NaN scale", _tensors(lambda t: _set(t, "down_proj.scales", _nan_scale)), "NaN or inf"),
    ("zero point 100", _tensors(lambda t: _set(t, "down_proj.zeros", lambda v: v + 100)), "zero points"),
    ("no config.json", lambda d: (d / "config.json").unlink(), "no config.json"),
    ("config not JSON", _write("config.json", "{not json"), "corrupt config.json"),
    ("config empty", _write("config.json", ""), "corrupt config.json"),
    ("config a JSON list", _write("config.json", "[1, 2]"), "JSON object"),
    ("no quantization_config", _config(lambda c: c.pop("quantization_config")), "no quantization_config"),
    ("quantization_config a list", _config(lambda c: c.__setitem__("quantization_config", [1])), "JSON object"),
    ("bits 8", _qcfg(bits=8), "4-bit"),
    ("group 48", _qcfg(group_size=48), "group size 48"),
    ("group 64 vs stored 32", _qcfg(group_size=64), "scales"),
    ("group 'abc'", _qcfg(group_size="abc"), "not an integer"),
    ("quant_method gptq", _qcfg(quant_method="gptq"), "missing tensor .*qzeros"),  # read as GPTQ: its tensors
    ("unknown layout version", _qcfg(version="nope"), "unknown QUICK layout"),
    ("awq gemv version", _qcfg(quant_method="awq", version="gemv"), "gemv"),
    ("module_group_sizes a list", _qcfg(module_group_sizes=[1]), "module_group_sizes"),
    ("hidden_size mismatch", _config(lambda c: c.__setitem__("hidden_size", 128)), "shape"),
    ("more layers than stored", _config(lambda c: c.__setitem__("num_hidden_layers", 3)), "lacks"),
    ("unknown model_type", _config(lambda c: c.__setitem__("model_type", "nonexistent")), "transformers can build"),
    ("index not JSON", _write("model.safetensors.index.json", "{bad"), "corrupt index"),
    ("index weight_map a list", _index(lambda i: i.__setitem__("weight_map", [])), "corrupt index"),
    ("index without weight_map", _index(lambda i: i.pop("weight_map")), "corrupt index"),
    (
        "index names a missing shard",
        _index(lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "model-00009-of-00009.safetensors")),
        "No such file",
    ),
    (
        "index names a path outside",
        _index(lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "../x.safetensors")),
        "inside the checkpoint",
    ),
    ("shards deleted", lambda d: [p.unlink() for p in d.glob("*.safetensors")], "No such file"),
    ("extra tensor is ignored (documented)", _tensors(lambda t: t.__setitem__("model.extra", torch.zeros(3))), None),
]


def _load(d, **kw):
    from quick.checkpoint import load_quantized

    return load_quantized(d, **kw)


@pytest.mark.parametrize(
    ("name", "mutate", "match"),
    [(c[0], c[1], c[2]) for c in CKPT_CASES]
    + [("load: missing path", "missing", "no config.json"), ("load: layout='nope'", "layout", "unknown layout")],
    ids=[c[0] for c in CKPT_CASES] + ["load: missing path", "load: layout='nope'"],
)
def test_checkpoint_load(name, mutate, match, ckpt, tmp_path):
    from quick.checkpoint import CheckpointError

    d = tmp_path / "c"
    shutil.copytree(ckpt, d)
    kw = {}
    if mutate == "missing":
        d = tmp_path / "missing"
    elif mutate == "layout":
        kw = {"layout": "nope"}
    else:
        before = {f.name: f.read_bytes() for f in d.glob("*.safetensors")}
        mutate(d)
        after = {f.name: f.read_bytes() for f in d.glob("*.safetensors")}
        if any(after.get(n) not in (None, b) for n, b in before.items()):  # a shard's bytes changed
            with pytest.raises(CheckpointError, match="SHA-256 .* does not match"):
                _load(d, **kw)  # the per-shard checksum catches it first ...
        kw["verify"] = False  # ... and without it, the structural check below still does
    if match is None:
        model = _load(d, **kw)
        assert any(type(m).__name__ == "QuickLinear" for m in model.modules())
        return
    with pytest.raises((CheckpointError, LayoutError), match=match):
        _load(d, **kw)


# ============================================================================== save killed mid-write

_KILL_SCRIPT = r"""
import sys, time, torch, transformers
from pathlib import Path
import quick.checkpoint as ck
from quick.auto import quantize_model_rtn

target, where, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
torch.manual_seed(1)
cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
model = quantize_model_rtn(transformers.AutoModelForCausalLM.from_config(cfg).eval(), 32, scale_dtype=torch.float16)

def stall():
    marker.write_text("ready")
    time.sleep(120)

if where == "shards":
    real, n = ck.save_file, [0]
    def slow(tensors, filename, metadata=None):
        n[0] += 1
        if n[0] == 2:
            Path(filename).write_bytes(b"partial")
            stall()
        return real(tensors, filename, metadata=metadata)
    ck.save_file = slow
    ck.save_quantized(model, target, max_shard_size=20_000)
else:
    ck.save_quantized(model, target, _before_publish=lambda tmp: stall())
"""


@pytest.mark.parametrize(
    "where", ["shards", "publish"], ids=["killed writing shards (new)", "killed before publishing (overwrite)"]
)
def test_save_killed(where, tmp_path, ckpt):
    """A save killed with SIGKILL (no cleanup runs) leaves either no checkpoint or the old one, intact."""
    import subprocess
    import sys
    import time

    target = tmp_path / "ck"
    if where == "publish":
        shutil.copytree(ckpt, target)
    before = {p.name: p.read_bytes() for p in target.glob("*")} if target.exists() else None
    marker = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target), where, str(marker)])
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended before it was killed"
            assert time.time() < deadline, "the saving process never reached the kill point"
            time.sleep(0.2)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    if before is None:
        assert not target.exists()
        from quick.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match="no config.json"):
            _load(target)
    else:
        assert {p.name: p.read_bytes() for p in target.glob("*")} == before
        _load(target)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp-")]
    assert leftovers  # the unfinished save stays in a hidden temporary directory, never at the target


# ============================================================================== CLI


def _cli(argv: list[str]) -> tuple[int, str]:
    from quick.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, err.getvalue() + out.getvalue()


CLI_CASES = [  # argv with {dense}, {ckpt}, {tmp}, {file} placeholders; (exit code, message regex)
    ([], 2, "usage"),
    (["nope"], 2, "invalid choice"),
    (["--bogus"], 2, "unrecognized arguments"),
    (["quantize"], 2, "required: MODEL, OUT"),
    (["quantize", "{dense}", "{tmp}/o", "--group-size", "48"], 2, "invalid choice: 48"),
    (["quantize", "{dense}", "{tmp}/o", "--version", "nope"], 2, "unknown version 'nope'"),
    (["quantize", "{dense}", "{tmp}/o", "--method", "gptq"], 2, "invalid choice"),
    (["quantize", "{tmp}/missing", "{tmp}/o", "--method", "rtn"], 2, "does not exist"),
    (["quantize", "{dense}", "{tmp}/o", "--device", "nope"], 2, "not a device"),
    (["quantize", "{dense}", "{tmp}/o", "--device", "tpu"], 2, "not a device|only cpu and cuda"),
    (["quantize", "{dense}", "{tmp}/o", "--device", "cuda:99"], 2, "CUDA device"),
    (["quantize", "{dense}", "{tmp}/o", "--n-samples", "abc"], 2, "invalid int value"),
    (["quantize", "{dense}", "{tmp}/o", "--n-samples", "0"], 2, "n_samples"),
    (["quantize", "{dense}", "{tmp}/o", "--calib", "{tmp}/missing.txt"], 2, "not found"),
    (["quantize", "{ckpt}", "{tmp}/o", "--method", "rtn"], 2, "already quantized"),
    (["eval", "{dense}"], 2, "choose a metric"),
    (["eval", "{tmp}/missing", "--ppl"], 2, "does not exist"),
    (["eval", "{dense}", "--ppl", "--seqlen", "1"], 2, "seqlen must be at least 2"),
    (["eval", "{dense}", "--ppl", "--data", "{tmp}/missing.txt"], 2, "missing.txt|not found|No such file"),
    (["eval", "{ckpt}", "--ppl"], 2, "no tokenizer"),
    (["eval", "{dense}", "--ppl", "--device", "nope"], 2, "not a device"),
    (["generate", "{tmp}/missing", "hi"], 2, "does not exist"),
    (["generate", "{dense}"], 2, "required: prompt"),
    (["generate", "{ckpt}", "hi"], 2, "no tokenizer"),
    (["generate", "{dense}", "hi", "--max-new-tokens", "x"], 2, "invalid int"),
    (["generate", "{dense}", "hi", "--max-new-tokens", "0", "--fast"], 2, "must be >= 1"),
    (["convert", "{tmp}/missing", "{tmp}/o2"], 2, "no config.json"),
    (["convert", "{dense}", "{tmp}/o2"], 2, "no quantization_config"),
    (["convert", "{ckpt}", "{tmp}/o2", "--layout", "nope"], 2, "unknown layout"),
    (["convert", "{ckpt}", "{file}"], 2, "not a directory"),
    (["demo", "--seqlen", "1"], 2, "--seqlen must be >= 2"),
    (["demo", "--group-size", "48"], 2, "invalid choice: 48"),
    (["demo", "--model", "{tmp}/missing"], 2, "does not exist"),
    (["demo", "--layout", "nope", "--model", "{dense}"], 2, "unknown layout"),
    (["demo", "--backend", "fast"], 2, "invalid choice"),
    (["bench"], 0, "usage: quick bench"),
    (["bench", "e2e", "--batches", "x"], 2, "expected a positive integer"),
    (["setup", "--bogus"], 2, "unrecognized arguments"),
]
if not torch.cuda.is_available():
    CLI_CASES += [
        (["demo", "--device", "cuda"], 2, "no CUDA device"),
        (["quantize", "{dense}", "{tmp}/o", "--device", "cuda"], 2, "no CUDA device"),
        (["bench", "e2e"], 1, "needs a CUDA GPU"),
    ]


@pytest.mark.parametrize(("argv", "code", "match"), CLI_CASES, ids=[" ".join(c[0]) or "(none)" for c in CLI_CASES])
def test_cli(argv, code, match, tmp_path, ckpt, request):
    subs = {"tmp": str(tmp_path), "ckpt": str(ckpt), "file": str(tmp_path / "afile")}
    (tmp_path / "afile").write_text("x")
    if any("{dense}" in a for a in argv):
        subs["dense"] = str(request.getfixturevalue("dense_dir"))
    rc, text = _cli([a.format(**subs) for a in argv])
    assert rc == code, text[-2000:]
    assert "Traceback" not in text
    import re

    assert re.search(match, text), text[-2000:]


# ============================================================================== GPU kernel entry points

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8, reason="needs an sm_80+ CUDA GPU"
)


def _sm90_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    from quick.kernels import wgmma

    return wgmma.is_available()


def _gpu_weights(k=256, n=128, g=128, layout="quick", dtype=torch.float16, seed=0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    qw = random_quantized(k, n, g, dtype, "cpu", gen, scale)
    p = {name: t.cuda() for name, t in get_layout(layout).pack(qw).items()}
    x = torch.randn(8, k, generator=gen).to(dtype).cuda()
    return qw, p, x


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and v.data_ptr() % 16
    return v


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _entry(kind: str):
    """``fn(x, packed, g, bias=None, out=None)`` for one kernel entry point."""
    from quick.kernels import mma, wgmma

    if kind in ("gemm", "gemv", "quick_matmul"):
        f = getattr(mma, kind) if kind != "quick_matmul" else functools.partial(select.matmul, "quick")
        return lambda x, p, g, bias=None, out=None: f(x, p["qweight"], p["scales"], p["zeros"], g, bias, out=out)
    if kind == "op":
        from quick.kernels import ops  # noqa: F401

        return lambda x, p, g, bias=None, out=None: torch.ops.quick.gemm_w4a16(
            x, p["qweight"], p["scales"], p["zeros"], g, bias
        )
    if kind == "sm90":
        return lambda x, p, g, bias=None, out=None: wgmma.gemm_w4a16_sm90(
            x, p["qweight"], p["scales"], p["zeros"], g, bias, out=out
        )
    raise ValueError(kind)


def _gpu_case(kind: str, what: str):
    layout = "quick_sm90" if kind == "sm90" else "quick"
    if kind == "sm90" and not _sm90_ok():
        pytest.skip("quick_sm90 needs an sm_90 GPU")
    qw, p, x = _gpu_weights(layout=layout)
    fn = _entry(kind)
    g = 128
    err = (ValueError, TypeError)
    automatic = kind in ("quick_matmul", "op", "sm90")  # the selection layer's entries copy x to dense rows
    if what == "x misaligned view":
        if automatic:
            out = fn(_misaligned(x), p, g)
            assert rel_error(out, reference_matmul(x, qw)) < 2e-3
            return
        with pytest.raises(ValueError, match="16-byte aligned"):
            fn(_misaligned(x), p, g)
    elif what == "x non-contiguous":
        if automatic:
            out = fn(_noncontig(x), p, g)
            assert rel_error(out, reference_matmul(x, qw)) < 2e-3
            return
        with pytest.raises(ValueError, match="contiguous"):
            fn(_noncontig(x), p, g)
    elif what == "qweight misaligned view":
        with pytest.raises(ValueError, match="16-byte aligned"):
            fn(x, {**p, "qweight": _misaligned(p["qweight"])}, g)
    elif what == "scales misaligned view":
        with pytest.raises(ValueError, match="16-byte aligned"):
            fn(x, {**p, "scales": _misaligned(p["scales"])}, g)
    elif what == "weights on CPU":
        with pytest.raises(ValueError, match="device|cpu"):
            fn(x, {k: v.cpu() for k, v in p.items()}, g)
    elif what == "x on CPU":
        with pytest.raises(ValueError, match="CUDA|device"):
            fn(x.cpu(), p, g)
    elif what == "scales dtype differs":
        with pytest.raises(err, match="dtype"):
            fn(x, {**p, "scales": p["scales"].bfloat16()}, g)
    elif what == "int8 x":
        with pytest.raises(err, match="float16 or bfloat16"):
            fn(x.to(torch.int8), p, g)
    elif what == "K mismatch":
        with pytest.raises(err, match="K|shape|rows"):
            fn(x[:, :128].contiguous(), p, g)
    elif what == "group mismatch":
        with pytest.raises(err, match="shape"):
            fn(x, p, 64)
    elif what == "bias wrong shape":
        with pytest.raises(err, match="bias"):
            fn(x, p, g, bias=torch.zeros(5, dtype=x.dtype, device="cuda"))
    elif what == "out misaligned":
        if kind == "op":
            pytest.skip("the op allocates its own output")
        with pytest.raises(ValueError, match="16-byte aligned"):
            fn(x, p, g, out=_misaligned(torch.empty(8, 128, dtype=x.dtype, device="cuda")))
    elif what == "out wrong shape":
        if kind == "op":
            pytest.skip("the op allocates its own output")
        with pytest.raises(ValueError, match="out must be"):
            fn(x, p, g, out=torch.empty(8, 64, dtype=x.dtype, device="cuda"))
    elif what == "M = 0":
        out = fn(x[:0], p, g)
        assert tuple(out.shape) == (0, 128)
    elif what == "K not multiple of 64":
        qw2, p2, x2 = _gpu_weights(k=96, g=32, layout="quick")
        if kind == "sm90":
            pytest.skip("the quick_sm90 layout itself needs K % 64 (checked on CPU)")
        with pytest.raises(err, match="multiples of 64"):
            fn(x2, p2, 32)
    else:
        raise AssertionError(what)


GPU_KINDS = ["gemm", "gemv", "quick_matmul", "op", "sm90"]
GPU_WHATS = [
    "x misaligned view",
    "x non-contiguous",
    "qweight misaligned view",
    "scales misaligned view",
    "weights on CPU",
    "x on CPU",
    "scales dtype differs",
    "int8 x",
    "K mismatch",
    "group mismatch",
    "bias wrong shape",
    "out misaligned",
    "out wrong shape",
    "M = 0",
    "K not multiple of 64",
]
GPU_ENTRY_CASES = [(k, w) for k in GPU_KINDS for w in GPU_WHATS] + [
    ("gemv", "M = 9 rows"),
    ("linear", "views and ragged shapes through QuickLinear"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("kind", "what"), GPU_ENTRY_CASES, ids=[f"{k}: {w}" for k, w in GPU_ENTRY_CASES])
def test_gpu_kernel_entry(kind, what):
    if what == "M = 9 rows":
        qw, p, x = _gpu_weights()
        x9 = torch.randn(9, 256, device="cuda").half()
        with pytest.raises(ValueError, match="M <= 8"):
            _entry("gemv")(x9, p, 128)
    elif kind == "linear":
        for layout in ("quick", "quick_sm90"):
            for k, n in ((256, 128), (200, 128), (256, 80 if layout == "quick_sm90" else 192)):
                m = _layer(k, n, layout).cuda()
                xs = torch.randn(5, k, device="cuda").half()
                ref = reference_matmul(torch.nn.functional.pad(xs, (0, m.in_features - k)), m.unpack(), m.bias)
                for view in (xs, _misaligned(xs), _noncontig(xs), xs.reshape(1, 5, k)):
                    out = m(view).reshape(5, n)
                    assert rel_error(out, ref) < 2e-3, (layout, k, n)
    else:
        _gpu_case(kind, what)
    torch.cuda.synchronize()  # any illegal access surfaces here, not in a later test


# ============================================================================== GPU NaN / inf / empty


def _gpu_nonfinite(kind: str, case: str):
    layout = "quick_sm90" if kind in ("sm90", "linear:quick_sm90") else "quick"
    if layout == "quick_sm90" and kind == "sm90" and not _sm90_ok():
        pytest.skip("quick_sm90 needs an sm_90 GPU")
    qw, p, x = _gpu_weights(layout=layout, scale=0.2 if case == "fp16 overflow gives inf" else 0.02)
    if kind.startswith("linear:"):
        from quick.nn.linear import QuickLinear

        mod = QuickLinear.from_quantized(
            QuantizedWeight(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), 128), None, layout
        )

        def fn(x, p, g):
            return mod(x)
    else:
        fn = _entry(kind)
    if case == "NaN/inf rows":
        xb = x.clone()
        xb[1, 3] = float("nan")
        xb[2, 7] = float("inf")
        out = fn(xb, p, 128)
        ref = reference_matmul(x, qw)
        assert torch.isnan(out[1]).all()
        assert not torch.isfinite(out[2]).all()
        keep = [0, 3, 4, 5, 6, 7]
        assert torch.isfinite(out[keep]).all() and rel_error(out[keep], ref[keep]) < 2e-3
    elif case == "NaN scale column":
        qw.scales[0, 5] = float("nan")
        p2 = {k: v.cuda() for k, v in get_layout(layout).pack(qw).items()}
        if kind.startswith("linear:"):
            for k2, v in p2.items():
                getattr(mod, k2).copy_(v)
        out = fn(x, p2, 128)
        assert torch.isnan(out[:, 5]).all()
        keep = [c for c in range(128) if c != 5]
        assert torch.isfinite(out[:, keep]).all()
    elif case == "fp16 overflow gives inf":
        xb = torch.full_like(x, 60000.0)
        out = fn(xb, p, 128)
        ref = reference_matmul(xb, qw)
        big = ref.abs() > 66000  # clear of the rounding boundary (65520)
        assert big.any() and torch.equal(torch.isinf(out[big]), torch.ones_like(out[big], dtype=torch.bool))
        assert torch.equal(torch.sign(out[big].double()), torch.sign(ref[big]))
    elif case == "M = 0":
        out = fn(x[:0], p, 128)
        assert out.shape[-1] == 128 and out.numel() == 0
    else:
        raise AssertionError(case)


GPU_NONFINITE = [
    (k, c)
    for k in ("gemm", "gemv", "quick_matmul", "op", "sm90", "linear:quick", "linear:quick_sm90")
    for c in ("NaN/inf rows", "NaN scale column", "fp16 overflow gives inf", "M = 0")
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("kind", "case"), GPU_NONFINITE, ids=[f"{k}: {c}" for k, c in GPU_NONFINITE])
def test_gpu_nonfinite_and_empty(kind, case):
    _gpu_nonfinite(kind, case)
    torch.cuda.synchronize()
