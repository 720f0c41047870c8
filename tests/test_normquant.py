"""The fused RMSNorm + W4A8 activation quantization without a GPU: the reference math against an independent
float64 computation, the inputs it refuses, the ops' fake shapes, the W4A8 layer on quantized activations, and the
``normquant`` fusion's switch and its attachment to transformers' norms (which fall back on CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import check_fusion_switch, tiny_causal_lm
from torch._subclasses.fake_tensor import FakeTensorMode

import quick.kernels.ops  # noqa: F401 - defines the ops
from quick.formats.w4a8 import quantize_activations
from quick.kernels import normquant as nq
from quick.kernels import select
from quick.kernels.decode import rms_norm
from quick.models import normquant
from quick.nn.linear_w4a8 import QuickLinearW4A8

DTYPES = [torch.float16, torch.bfloat16]


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    r = torch.randn(m, k, generator=gen).to(dtype)
    return x, w, r


def _normed64(x, w, eps, offset, residual):
    """RMSNorm in float64 with the model dtype's casts (Llama: two, Gemma: one)."""
    r = (residual + x if residual is not None else x).double()
    inv = (r.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    if offset == 0.0:
        return (w.double() * (r * inv).to(x.dtype).double()).to(x.dtype)
    return (r * inv * (offset + w.double())).to(x.dtype)


def _float64(x, w, eps, offset, residual):
    """RMSNorm in float64 with the model dtype's casts, then the quantization in float64."""
    y = _normed64(x, w, eps, offset, residual)
    amax = y.double().abs().amax(-1)
    xq = torch.round(y.double() * (127.0 / amax)[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, amax / 127.0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_reference_is_the_unfused_path_and_near_float64(dtype, offset, residual):
    x, w, r = _inputs(37, 264, dtype)
    r = r if residual else None
    got = nq.reference(x, w, 1e-6, offset, r, normed=True)
    new_r = r + x if residual else x
    normed = rms_norm(new_r, w, 1e-6, offset)
    xq, sx = quantize_activations(normed)
    assert torch.equal(got.xq, xq) and torch.equal(got.sx, sx) and torch.equal(got.normed, normed)
    assert (got.residual is None) == (not residual)
    if residual:
        assert torch.equal(got.residual, new_r)
    want_q, want_s = _float64(x, w, 1e-6, offset, r)
    d = (got.xq.int() - want_q.int()).abs()
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 5e-3
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    assert bool(((got.sx.double() - want_s).abs() <= want_s * ulp).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_normed_two_roundings_bound(dtype):
    """The kernel's rounding order (the reference's: fp32 inverse rms, cast, times the weight, cast) against the
    float64 norm with the same casts: Llama's normalized value can land one ulp away where the fp32 inverse rms
    moves it across a rounding boundary, and the weight product's second rounding then leaves the output up to
    (not including) two ulps away, more than one ulp for some elements; Gemma's single cast stays within one ulp."""
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    x, w, _ = _inputs(1024, 2048, dtype, seed=3)
    w = (torch.rand(2048, generator=torch.Generator().manual_seed(4)) * 1.5 + 0.25).to(dtype)
    for offset, bound in ((0.0, 2 * ulp), (1.0, ulp)):
        got = nq.reference(x, w, 1e-6, offset, None, normed=True).normed.double()
        want = _normed64(x, w, 1e-6, offset, None).double()
        rel = (got - want).abs() / want.abs().clamp_min(1e-30)
        assert bool((rel <= bound).all()), (offset, float(rel.max()) / ulp)
        if offset == 0.0:
            assert bool((rel > ulp).any())  # a one-ulp bound on Llama's normed output is wrong, not just tight


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_two_roundings_stay_below_two_ulps(dtype):
    """Exhaustively over a binade of normalized values and the weights of the GPU test: one ulp of the normalized
    value becomes less than two ulps of the output, and more than one for some."""
    p = 10 if dtype == torch.float16 else 7
    n = torch.unique(torch.arange(1.0, 2.0, 2.0**-p, dtype=torch.float64).to(dtype))
    w = torch.unique(torch.arange(0.25, 1.75, 2.0 ** -(p + 2), dtype=torch.float64).to(dtype))
    a = (w.double()[:, None] * n.double()[None]).to(dtype).double()
    b = (w.double()[:, None] * (n.double() + 2.0**-p)[None]).to(dtype).double()  # n's upper neighbour, exact
    rel = (b - a).abs() / torch.minimum(a.abs(), b.abs()) / 2.0**-p
    assert float(rel.max()) < 2.0 and float(rel.max()) > 1.0


def test_reference_matches_float64_bound_can_fail():
    x, w, r = _inputs(8, 128, torch.float16)
    got = nq.reference(x, w, 1e-6, 0.0, r)
    want_q, _ = _float64(x, w, 1e-6, 0.0, r)
    bad = got.xq.clone()
    bad[0, 0] = torch.where(bad[0, 0] > 0, bad[0, 0] - 2, bad[0, 0] + 2)
    assert int((bad.int() - want_q.int()).abs().max()) > 1


def test_dispatch_without_gpu_is_the_reference():
    x, w, r = _inputs(4, 64, torch.bfloat16)
    assert not nq.is_available(x)
    got, want = nq.rms_norm_quant(x, w, 1e-5, 0.0, r), nq.reference(x, w, 1e-5, 0.0, r)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3], strict=True))


def test_validation_errors():
    x, w, r = _inputs(3, 64, torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        nq.validate(x.float(), w, 1e-6)
    with pytest.raises(TypeError, match="torch.Tensor"):
        nq.validate([[1.0]], w, 1e-6)
    with pytest.raises(nq.NormQuantError, match="multiple of 8"):
        nq.validate(x[:, :60], w[:60], 1e-6)
    with pytest.raises(nq.NormQuantError, match="2-D"):
        nq.validate(x[None], w, 1e-6)
    with pytest.raises(nq.NormQuantError, match="norm weight"):
        nq.validate(x, w[:32], 1e-6)
    with pytest.raises(nq.NormQuantError, match="norm weight"):
        nq.validate(x, w.bfloat16(), 1e-6)
    with pytest.raises(nq.NormQuantError, match="residual"):
        nq.validate(x, w, 1e-6, 0.0, r[:2])
    with pytest.raises(nq.NormQuantError, match="residual"):
        nq.validate(x, w, 1e-6, 0.0, r.bfloat16())
    with pytest.raises(nq.NormQuantError, match="eps"):
        nq.validate(x, w, -1.0)
    with pytest.raises(nq.NormQuantError, match="eps"):
        nq.validate(x, w, float("nan"))
    with pytest.raises(nq.NormQuantError, match="offset"):
        nq.validate(x, w, 1e-6, float("inf"))
    with pytest.raises(nq.NormQuantError, match="device"):
        nq.validate(x, w.to("meta"), 1e-6)
    with pytest.raises(nq.NormQuantError, match="CUDA"):
        nq.rms_norm_quant_cuda(x, w, 1e-6)
    assert nq.validate(x, w, 1e-6, 1.0, r) == (3, 64)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("normed", [False, True])
def test_op_fake_shapes(residual, normed):
    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        w = torch.empty(256, dtype=torch.bfloat16)
        r = torch.empty(5, 256, dtype=torch.bfloat16) if residual else None
        xq, sx, res, y = torch.ops.quick.rms_norm_quant(x, r, w, 1e-6, 0.0, normed)
    assert (xq.shape, xq.dtype, sx.shape, sx.dtype) == ((5, 256), torch.int8, (5,), torch.float32)
    assert res.shape == ((5, 256) if residual else (0,)) and res.dtype == torch.bfloat16
    assert y.shape == ((5, 256) if normed else (0,))


def test_op_fake_rejects_bad_input():
    with FakeTensorMode(), pytest.raises(nq.NormQuantError):
        torch.ops.quick.rms_norm_quant(torch.empty(5, 100, dtype=torch.float16), None,
                                       torch.empty(100, dtype=torch.float16), 1e-6, 0.0, False)  # fmt: skip


def test_op_cpu_and_opcheck():
    x, w, r = _inputs(6, 128, torch.float16)
    xq, sx, res, y = torch.ops.quick.rms_norm_quant(x, r, w, 1e-6, 0.0, True)
    ref = nq.reference(x, w, 1e-6, 0.0, r, normed=True)
    assert torch.equal(xq, ref.xq) and torch.equal(sx, ref.sx) and torch.equal(res, ref.residual)
    assert torch.equal(y, ref.normed)
    torch.library.opcheck(torch.ops.quick.rms_norm_quant, (x, r, w, 1e-6, 0.0, True))
    torch.library.opcheck(torch.ops.quick.rms_norm_quant, (x, None, w, 1e-6, 1.0, False))


# ---------------------------------------------------------------------------------------- the W4A8 layer


def _layer(group: int, layout: str = "w4a8", bias: bool = True) -> QuickLinearW4A8:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=gen) * 0.05
    b = torch.randn(256, generator=gen) if bias else None
    return QuickLinearW4A8.from_weight(w, group, b, torch.float16, pack=True, layout=layout)


@pytest.mark.parametrize("layout", ["w4a8", "w4a8_sm90"])
@pytest.mark.parametrize("group", [-1, 128])
def test_forward_quantized_is_forward(layout, group):
    """On CPU (reference): the layer on activations quantized beforehand is the layer on the float activations."""
    lin = _layer(group, layout)
    x = torch.randn(3, 5, 256).half()
    xq, sx = quantize_activations(x)
    assert torch.equal(lin.forward_quantized(xq, sx), lin(x))
    assert lin.last_path == "reference"
    op = torch.ops.quick.gemm_w4a8_quantized(
        xq.reshape(-1, 256), sx.reshape(-1), lin.qweight, lin.channel_scale, getattr(lin, "group_scale", None),
        lin.bias, group, layout, torch.float16, False,
    )  # fmt: skip
    assert (op.float() - lin(x).reshape(-1, 256).float()).abs().max() <= 2e-3 * lin(x).abs().max()


def test_forward_quantized_errors_and_takes_quantized():
    lin = _layer(-1)
    xq, sx = quantize_activations(torch.randn(2, 256).half())
    with pytest.raises(ValueError, match="int8"):
        lin.forward_quantized(xq.float(), sx)
    with pytest.raises(ValueError, match="int8"):
        lin.forward_quantized(xq, sx[:1])
    assert not lin.takes_quantized(torch.randn(2, 256).half())  # CPU: no kernel
    lin.backend = "kernel"
    with pytest.raises(RuntimeError, match="no W4A8 GPU kernel"):
        lin.forward_quantized(xq, sx)


def test_offer_is_used_only_for_that_tensor():
    """An offered quantization is used by the next forward of that very tensor, and dropped by any other call."""
    lin = _layer(128)
    x = torch.randn(2, 256).half()
    other_q, other_s = quantize_activations(torch.randn(2, 256).half())
    lin.offer_quantized(x, other_q, other_s)
    assert torch.equal(lin(x), lin.forward_quantized(other_q, other_s))  # the offer, not x's own quantization
    assert torch.equal(lin(x), lin.forward_quantized(*quantize_activations(x)))  # consumed once
    lin.offer_quantized(x, other_q, other_s)
    y = x.clone()
    assert torch.equal(lin(y), lin.forward_quantized(*quantize_activations(y)))
    assert lin._offered is None


def test_gemm_quantized_fake_and_validation():
    lin = _layer(128)
    with FakeTensorMode(allow_non_fake_inputs=True):
        xq = torch.empty(7, 256, dtype=torch.int8)
        sx = torch.empty(7, dtype=torch.float32)
        out = torch.ops.quick.gemm_w4a8_quantized(xq, sx, lin.qweight, lin.channel_scale, lin.group_scale, None,
                                                  128, "w4a8", torch.bfloat16, False)  # fmt: skip
    assert out.shape == (7, 256) and out.dtype == torch.bfloat16
    xq, sx = quantize_activations(torch.randn(2, 256).half())
    w = (lin.qweight, lin.channel_scale, lin.group_scale)
    with pytest.raises(ValueError, match="W4A8 layouts"):
        select.validate_quantized("quick", xq, sx, *w, 128, None, torch.float16)
    with pytest.raises(TypeError, match="int8"):
        select.validate_quantized("w4a8", xq.half(), sx, *w, 128, None, torch.float16)
    with pytest.raises(TypeError, match="sx"):
        select.validate_quantized("w4a8", xq, sx.half(), *w, 128, None, torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        select.validate_quantized("w4a8", xq, sx, *w, 128, None, torch.float32)
    with pytest.raises(ValueError):
        select.validate_quantized("w4a8", xq[:, :128], sx, *w, 128, None, torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        select.prepare_quantized("w4a8", xq, sx, *w, 128, None, torch.float16)
    assert select.validate_quantized("w4a8", xq, sx, *w, 128, None, torch.float16) == (2, 256, 256)


# ---------------------------------------------------------------------------------------- the fusion


def test_fusion_switch(monkeypatch):
    check_fusion_switch(monkeypatch, "normquant", normquant.enabled)


def test_attach_on_a_fused_w4a8_model_falls_back_on_cpu(monkeypatch):
    """fuse_model attaches the fused forward to both input norms of every layer (no change to the state dict);
    on CPU the norms run their own forward, so the logits are those of the unfused model; detach restores."""
    transformers = pytest.importorskip("transformers")
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.models.fuse import fuse_model

    torch.manual_seed(0)
    kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = tiny_causal_lm(transformers.LlamaConfig, **kw)
    quantize_model_rtn_w4a8(model, 128, dtype=torch.float16, progress=False)
    ids = torch.randint(0, 256, (2, 9))
    monkeypatch.setenv("QUICK_FUSIONS", "normquant")
    with torch.no_grad():
        want = model(ids).logits
        keys = set(model.state_dict())
        assert fuse_model(model) == 4
        norms = [m for m in model.modules() if "_quick_normquant" in m.__dict__]
        assert len(norms) == 4
        assert set(model.state_dict()) != keys  # fused names; the norms add none of their own
        assert not any("normquant" in k for k in model.state_dict())
        got = model(ids).logits
        assert torch.equal(got, want)
        assert normquant.detach(model) == 4
        assert not any("_quick_normquant" in m.__dict__ for m in model.modules())
        assert torch.equal(model(ids).logits, want)
