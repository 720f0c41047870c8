"""Device correctness of the W4A8 kernels (activation quantization + int8 mma.sync GEMM, layout ``w4a8``).

The reference is :func:`quick.formats.w4a8.w4a8_reference`: float64 of the same quantized arithmetic, on the
device. Everything up to the kernel's float epilogue is exact integer arithmetic, so the only differences are the
fp32 epilogue and the final rounding to fp16/bf16: outputs must lie within about one unit in the last place of the
reference, element by element (a mistake in indexing, scales or the int4 conversion gives errors of order 1).
Every case draws fresh random data, poisons the output with NaN first and checks finiteness.
Set ``QUICK_ERR_REPORT_W4A8=path.json`` to get the max error per dtype / mode written at the end.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, M_ALL, require_sm80_and_nvcc, write_error_report

from quick.formats.layouts import pack_w4a8
from quick.formats.w4a8 import W4A8Weight, quantize_activations, w4a8_reference
from quick.kernels import ops
from quick.testing import poisoned, rel_error

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

from quick.kernels import dispatch, jit  # noqa: E402
from quick.kernels import w4a8_mma as w8  # noqa: E402

GROUPS = [-1, 128]
BIG_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (K, N)
SMALL_SHAPES = [(128, 128), (384, 640), (640, 384), (1152, 896), (4224, 384), (640, 192), (128, 96), (384, 160)]
# Relative Frobenius bounds (the expected error is the final rounding: ~2^-12 fp16, ~2^-9 bf16 relative rms)
REL = {torch.float16: 6e-4, torch.bfloat16: 5e-3}
# Element-wise: |out - ref| <= ULP * |ref| + ABS * max|ref| (one ulp relative, plus room for values near zero)
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ERRORS: dict[str, float] = {}


def _config_cases() -> list[tuple[w8.W4A8Config, int]]:
    """Every config in both modes, except per-group tiles whose partial + total accumulators would spill."""
    return [(w8.CONFIGS[name], g) for name in sorted(w8.CONFIGS) for g in GROUPS if w8.CONFIGS[name].fits(g)]


@pytest.fixture(scope="module", autouse=True)
def _precompile_and_report():
    """Build every variant for this GPU in parallel up front."""
    arch = jit.arch_for_device()
    jobs = {(src, tuple(sorted(d.items()))) for src, d, _ in w8.VARIANTS}
    jobs |= {(w8.GEMM_SOURCE, tuple(sorted(c.defines(torch.float16, g).items()))) for c, g in _config_cases()}
    jit.compile_many([(src, arch, dict(d)) for src, d in sorted(jobs)])
    yield
    write_error_report("QUICK_ERR_REPORT_W4A8", ERRORS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def make_weights(k: int, n: int, group: int, seed: int) -> tuple[W4A8Weight, dict]:
    """Codes over the whole int4 range, group scales over 1..127, channel scales sized for O(1) outputs."""
    gen = _gen(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    gs = None
    mag = 1.0
    if group > 0:
        gs = torch.randint(1, 128, (k // group, n), generator=gen, device="cuda").to(torch.int16)
        mag = 64.0
    cs = (torch.rand(n, generator=gen, device="cuda") * 0.5 + 0.5) * (4.0 / (k**0.5 * 127 * 4.6 * mag))
    w = W4A8Weight(q, cs, gs, group)
    return w, pack_w4a8(w)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed), device="cuda").to(dtype)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, label: str) -> None:
    assert torch.isfinite(out).all(), f"{label}: NaN/inf in the output (unwritten or overflowed elements)"
    err = rel_error(out, ref)
    key = f"{dtype}"
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    assert err < REL[dtype], f"{label}: relative error {err:.3e} >= {REL[dtype]:.1e}"
    o = out.to(torch.float64)
    tol = ULP[dtype] * ref.abs() + 1e-3 * ref.abs().max()
    bad = (o - ref).abs() > tol
    assert not bad.any(), f"{label}: {int(bad.sum())} elements beyond one ulp, max |diff| {(o - ref).abs().max():.3e}"


def run_case(m: int, k: int, n: int, group: int, dtype: torch.dtype, seed: int, bias: bool = False, **kw) -> None:
    w, p = make_weights(k, n, group, seed)
    x = _x(m, k, dtype, seed + 1)
    b = (torch.randn(n, generator=_gen(seed + 2), device="cuda") * 0.1).to(dtype) if bias else None
    out = poisoned((m, n), dtype, "cuda")
    w8.gemm_w4a8_cuda(x, p["qweight"], p["channel_scale"], p.get("group_scale"), group, b, out=out, **kw)
    ref = w4a8_reference(x, w, b)
    check(out, ref, dtype, f"M={m} K={k} N={n} g={group} {dtype} {kw}")


# ------------------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 128), (3, 8), (17, 4096), (100, 11008), (4096, 4096), (2, 20480), (5, 136)])
def test_actquant_bit_exact(m, k, dtype):
    """Same int8 codes and the same fp32 scales, bit for bit, as quantize_activations on the device; the same
    codes on the CPU (whose ``amax / 127`` divides where CUDA torch multiplies by fl(1/127): s_x within one ulp);
    zero rows give zeros; exact halves round to even."""
    x = (_x(m, k, dtype, m * k) * 3).to(dtype)
    x[0, : min(k, 8)] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5][: min(k, 8)], dtype=dtype)
    if m > 2:
        x[2] = 0
    xq, sx = w8.quantize_activations_cuda(x)
    rq, rs = quantize_activations(x)
    assert xq.dtype == torch.int8 and sx.dtype == torch.float32
    assert torch.equal(xq, rq) and torch.equal(sx, rs)
    if k % 128 == 0:  # the per-group sums of x_q the unsigned-weight GEMM variant folds in
        xq2, sx2, xs = w8._quantize(x, sums=True)
        assert torch.equal(xq2, rq) and torch.equal(sx2, rs)
        assert torch.equal(xs, rq.to(torch.int32).reshape(m, k // 128, 128).sum(-1, dtype=torch.int32))
    cq, cs = quantize_activations(x.cpu())
    assert torch.equal(xq.cpu(), cq)
    assert ((sx.cpu() - cs).abs() <= cs.abs() * 2.0**-23).all()
    if k >= 8:
        assert xq[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4][: min(k, 8)]
    if m > 2:
        assert not xq[2].any() and sx[2] == 0


def test_actquant_op_and_errors():
    x = _x(4, 256, torch.bfloat16, 0)
    xq, sx = torch.ops.quick.quantize_act_w4a8(x)
    rq, rs = quantize_activations(x)
    assert torch.equal(xq, rq) and torch.equal(sx, rs)
    torch.library.opcheck(torch.ops.quick.quantize_act_w4a8.default, (x,))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        w8.quantize_activations_cuda(x.float())
    with pytest.raises(ValueError, match="K % 8"):
        w8.quantize_activations_cuda(x[:, :100].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        w8.quantize_activations_cuda(x.reshape(8, 128).t())


# ------------------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("m", M_ALL)
def test_gemm_all_m(m, group, dtype):
    run_case(m, 4096, 4096, group, dtype, seed=m * 10 + group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("k,n", BIG_SHAPES[1:])
@pytest.mark.parametrize("m", [1, 17, 256, 1000])
def test_gemm_big_shapes(m, k, n, group, dtype):
    run_case(m, k, n, group, dtype, seed=k + n + m, bias=(m % 2 == 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("k,n", SMALL_SHAPES)
@pytest.mark.parametrize("m", [1, 7, 33, 128, 255])
def test_gemm_small_shapes(m, k, n, group, dtype):
    run_case(m, k, n, group, dtype, seed=k * 3 + n + m, bias=True)


@pytest.mark.parametrize("config,group", [(c.name, g) for c, g in _config_cases()])
@pytest.mark.parametrize("splits", [1, 3])
def test_every_config(config, splits, group):
    """Each config (also those the tuned table does not pick for this mode) on ragged M and N not a multiple of
    the CTA's columns; split-k on and off."""
    cfg = w8.CONFIGS[config]
    k = 3 * cfg.bks if cfg.bks % 128 == 0 else 768
    run_case(cfg.bm + 5, k, 384, group, torch.float16, seed=splits, bias=True, config=cfg, splits=splits)


@pytest.mark.parametrize("group", GROUPS)
def test_split_invariance_and_determinism(group):
    """Integer sums: any split gives the same bits; repeated runs give the same bits."""
    w, p = make_weights(4096, 1024, group, 5)
    x = _x(16, 4096, torch.float16, 6)
    args = (x, p["qweight"], p["channel_scale"], p.get("group_scale"), group)
    outs = [w8.gemm_w4a8_cuda(*args, config="m16n2k4", splits=s) for s in (1, 2, 4, 16)]
    outs += [w8.gemm_w4a8_cuda(*args, config="m16n2k4r", splits=s) for s in (2, 5, 16, 16)]  # in-kernel reduce
    if group > 0:  # unsigned-weight variant: same integers, same bits
        outs += [w8.gemm_w4a8_cuda(*args, config="m16n2k2u", splits=s) for s in (1, 3)]
        outs += [w8.gemm_w4a8_cuda(*args, config="m64n4gu", splits=s) for s in (1, 2)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    auto = [w8.gemm_w4a8_cuda(*args) for _ in range(3)]
    assert all(torch.equal(a, auto[0]) for a in auto)
    assert torch.equal(auto[0], outs[0])


def test_extreme_values_exact():
    """Worst-case magnitudes (codes -8 everywhere, group scales 127, |x_q| = 127) stay exact in int32."""
    k, n, m = 4096, 256, 20
    for group in GROUPS:
        q = torch.full((n, k), -8, dtype=torch.int8, device="cuda")
        q[:, 1::2] = 7
        gs = torch.full((k // 128, n), 127, dtype=torch.int16, device="cuda") if group > 0 else None
        cs = torch.full((n,), 1e-7, device="cuda")
        w = W4A8Weight(q, cs, gs, group)
        p = pack_w4a8(w)
        x = torch.ones(m, k, device="cuda", dtype=torch.float16)
        x[:, 1::2] = -1
        x[1] = -x[1]
        out = w8.gemm_w4a8_cuda(x, p["qweight"], p["channel_scale"], p.get("group_scale"), group)
        check(out, w4a8_reference(x, w), torch.float16, f"extremes g={group}")


def test_nan_rows_propagate():
    """A NaN in a row of x makes that row's s_x and outputs NaN (torch's amax keeps NaN); other rows are exact."""
    w, p = make_weights(512, 256, 128, 21)
    x = _x(5, 512, torch.float16, 22)
    x[3, 100] = float("nan")
    xq, sx = w8.quantize_activations_cuda(x)
    assert torch.isnan(sx[3]) and torch.isfinite(sx[[0, 1, 2, 4]]).all()
    out = w8.gemm_w4a8_cuda(x, p["qweight"], p["channel_scale"], p["group_scale"], 128)
    assert torch.isnan(out[3]).all()
    keep = [0, 1, 2, 4]
    check(out[keep], w4a8_reference(x[keep], w), torch.float16, "rows without NaN")


def test_op_dispatch_and_3d():
    w, p = make_weights(512, 256, 128, 7)
    x = _x(6, 512, torch.bfloat16, 8).reshape(2, 3, 512)
    b = torch.randn(256, device="cuda").to(torch.bfloat16)
    y = torch.ops.quick.gemm_w4a8(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, b)
    assert y.shape == (2, 3, 256)
    check(y.reshape(6, 256), w4a8_reference(x.reshape(6, 512), w, b), torch.bfloat16, "op 3-D")
    fn = dispatch.kernel_for("w4a8", x.reshape(6, 512))
    assert fn is not None
    y2 = fn(x.reshape(6, 512), p, 128)
    check(y2, w4a8_reference(x.reshape(6, 512), w), torch.bfloat16, "dispatch")
    view = _x(8, 1024, torch.float16, 9)[:, :512]  # non-contiguous: linear_w4a8 copies
    w16, p16 = make_weights(512, 256, -1, 10)
    check(ops.linear_w4a8(view, p16, -1), w4a8_reference(view, w16), torch.float16, "view")


def test_opcheck():
    w, p = make_weights(256, 128, 128, 1)
    for m in (4, 40):
        x = _x(m, 256, torch.float16, m)
        b = torch.randn(128, device="cuda", dtype=torch.float16)
        torch.library.opcheck(
            torch.ops.quick.gemm_w4a8.default, (x, p["qweight"], p["channel_scale"], p["group_scale"], 128, b)
        )
    w, p = make_weights(256, 128, -1, 2)
    x = _x(3, 256, torch.bfloat16, 3)
    torch.library.opcheck(torch.ops.quick.gemm_w4a8.default, (x, p["qweight"], p["channel_scale"], None, -1))


def test_cuda_graph_capture():
    w, p = make_weights(1024, 512, 128, 11)
    x = _x(16, 1024, torch.float16, 12)
    args = (p["qweight"], p["channel_scale"], p["group_scale"], 128)
    eager = w8.gemm_w4a8_cuda(x, *args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w8.gemm_w4a8_cuda(x, *args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = w8.gemm_w4a8_cuda(x, *args)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def test_bad_inputs():
    w, p = make_weights(256, 128, 128, 13)
    x = _x(4, 256, torch.float16, 14)
    qw, cs, gs = p["qweight"], p["channel_scale"], p["group_scale"]
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        w8.gemm_w4a8_cuda(x.float(), qw, cs, gs, 128)
    with pytest.raises(TypeError, match="qweight"):
        w8.gemm_w4a8_cuda(x, qw.float(), cs, gs, 128)
    with pytest.raises(TypeError, match="channel_scale"):
        w8.gemm_w4a8_cuda(x, qw, cs.half(), gs, 128)
    with pytest.raises(TypeError, match="group_scale"):
        w8.gemm_w4a8_cuda(x, qw, cs, None, 128)
    with pytest.raises(ValueError, match="takes no group_scale"):
        w8.gemm_w4a8_cuda(x, qw, cs, gs, -1)
    with pytest.raises(ValueError, match="group_size"):
        w8.gemm_w4a8_cuda(x, qw, cs, gs, 64)
    with pytest.raises(ValueError, match="k32 rows"):
        w8.gemm_w4a8_cuda(_x(4, 384, torch.float16, 0), qw, cs, gs, 128)
    with pytest.raises(ValueError, match="K % 128"):
        w8.gemm_w4a8_cuda(_x(4, 200, torch.float16, 0), qw, cs, gs, 128)
    with pytest.raises(ValueError, match="CUDA"):
        w8.gemm_w4a8_cuda(x.cpu(), qw.cpu(), cs.cpu(), gs.cpu(), 128)
    with pytest.raises(ValueError, match="one CUDA device"):
        w8.gemm_w4a8_cuda(x, qw, cs.cpu(), gs, 128)
    with pytest.raises(ValueError, match="contiguous"):
        w8.gemm_w4a8_cuda(_x(256, 4, torch.float16, 0).t(), qw, cs, gs, 128)
    with pytest.raises(ValueError, match="aligned"):
        w8.gemm_w4a8_cuda(
            torch.empty(4 * 256 + 1, dtype=torch.float16, device="cuda")[1:].view(4, 256), qw, cs, gs, 128
        )
    with pytest.raises(ValueError, match="bias"):
        w8.gemm_w4a8_cuda(x, qw, cs, gs, 128, torch.zeros(64, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="out must be"):
        w8.gemm_w4a8_cuda(x, qw, cs, gs, 128, out=torch.empty(4, 64, dtype=torch.float16, device="cuda"))
    empty = w8.gemm_w4a8_cuda(x[:0], qw, cs, gs, 128)
    assert empty.shape == (0, 128)
