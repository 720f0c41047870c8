"""The fused (residual add +) RMSNorm + W4A8 activation quantization kernel on a GPU: against a float64 reference of
the norm then the quantization over hidden sizes 8 .. 20480 and 1 .. 4096 tokens (fp16, bf16, Gemma's offset),
into NaN / -128 poisoned outputs; against the unfused CUDA path; and a tiny W4A8 Llama whose logits are the same
with the ``normquant`` fusion on and off, eager (transformers' layers) and in the graphed fast decode step."""

from __future__ import annotations

import pytest
import torch

from quick.kernels import normquant as nq

pytestmark = pytest.mark.gpu

EPS = 1e-6
# one ulp of the model dtype, relative (the largest spacing just above a power of two)
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _ulps(dtype: torch.dtype, offset: float) -> float:
    """Bound on normed / s_x relative to the reference: Gemma's single cast is one ulp off at most; Llama's normalized
    value can be one ulp off (fp32 inverse rms at a rounding boundary) and times the weight, rounded again, that is
    under two ulps of the output (tests/test_normquant.py checks both on CPU)."""
    return ULP[dtype] * (2.0 if offset == 0.0 else 1.0)


@pytest.fixture(scope="module", autouse=True)
def _gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    from quick.kernels import jit

    if not jit.nvcc_available():
        pytest.skip("needs nvcc to build the kernel")


def _inputs(m: int, k: int, dtype: torch.dtype, residual: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(m, k, generator=gen, device="cuda") * 3).to(dtype)
    w = (torch.rand(k, generator=gen, device="cuda") * 1.5 + 0.25).to(dtype)
    r = torch.randn(m, k, generator=gen, device="cuda").to(dtype) if residual else None
    return x, w, r


def _reference64(x, w, eps: float, offset: float, residual):
    """float64 RMSNorm (with the model's two casts) of r = residual + x (torch's add), then the quantization."""
    dt = x.dtype
    r = residual + x if residual is not None else x
    rd = r.double()
    inv = ((rd * rd).sum(-1, keepdim=True) / r.shape[-1] + eps).rsqrt()
    if offset == 0.0:
        y = (w.double() * (rd * inv).to(dt).double()).to(dt)
    else:
        y = (rd * inv * (offset + w.double())).to(dt)
    amax = y.double().abs().amax(-1)
    scale = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(y.double() * scale[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, amax / 127.0, r, y


def _mismatch(got: nq.NormQuant, want, dtype, offset: float) -> str | None:
    """Why ``got`` is not within one int8 step (and :func:`_ulps` of s_x) of ``want``, or None."""
    xq, sx = want[0], want[1]
    d = (got.xq.int() - xq.int()).abs()
    if int(d.max()) > 1:
        return f"x_q off by {int(d.max())} steps"
    frac = float((d > 0).float().mean())
    if frac > 2e-3:
        return f"{frac:.2e} of x_q differ by a step"
    err = (got.sx.double() - sx).abs()
    if bool((err > sx * (_ulps(dtype, offset) + 1e-6) + 1e-30).any()):
        return f"s_x off by {float((err / sx.clamp_min(1e-30)).max()):.2e} relative"
    return None


def _poisoned(m: int, k: int, dtype, residual: bool, normed: bool) -> nq.NormQuant:
    dev = "cuda"
    return nq.NormQuant(
        torch.full((m, k), -128, dtype=torch.int8, device=dev),  # a value the kernel never writes
        torch.full((m,), float("nan"), dtype=torch.float32, device=dev),
        torch.full((m, k), float("nan"), dtype=dtype, device=dev) if residual else None,
        torch.full((m, k), float("nan"), dtype=dtype, device=dev) if normed else None,
    )


KS = (8, 136, 1000, 4096, 5120, 8192, 16384, 16392, 20480)  # 16392 / 20480: past the register cache (re-read tail)
MS = (1, 7, 64, 4096)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_float64_reference(dtype):
    """Every (M, K) of the grid, with and without residual, offset 0 (Llama) and 1 (Gemma), into poisoned
    outputs: every output written, the residual bit-exact, x_q within one step (rarely off at all), s_x and the
    normed rows within :func:`_ulps` of the model dtype."""
    seed = 0
    for k in KS:
        for m in MS:
            if m * k > 4096 * 8192:
                m = 4096 * 8192 // k  # keep the float64 reference small
            residual, offset = (seed % 2 == 0), (1.0 if seed % 3 == 2 else 0.0)
            seed += 1
            x, w, r = _inputs(m, k, dtype, residual, seed)
            out = _poisoned(m, k, dtype, residual, normed=True)
            got = nq.rms_norm_quant_cuda(x, w, EPS, offset, r, normed=True, out=out)
            torch.cuda.synchronize()
            want = _reference64(x, w, EPS, offset, r)
            where = f"M={m} K={k} residual={residual} offset={offset}"
            assert not bool((got.xq == -128).any()), f"unwritten x_q ({where})"
            assert not bool(got.sx.isnan().any()), f"unwritten s_x ({where})"
            why = _mismatch(got, want, dtype, offset)
            assert why is None, f"{why} ({where})"
            if residual:
                assert torch.equal(got.residual, want[2]), f"residual ({where})"
            nd = (got.normed.double() - want[3].double()).abs()
            tiny = 2.0**-24 if dtype == torch.float16 else 1e-38  # one subnormal step
            assert bool((nd <= want[3].double().abs() * _ulps(dtype, offset) + tiny).all()), f"normed ({where})"


def test_the_bound_can_fail():
    """The check above rejects an x_q two steps off and an s_x three ulps off (Llama's bound is two)."""
    x, w, r = _inputs(64, 4096, torch.float16, True)
    got = nq.rms_norm_quant_cuda(x, w, EPS, 0.0, r)
    want = _reference64(x, w, EPS, 0.0, r)
    assert _mismatch(got, want, torch.float16, 0.0) is None
    bad = got.xq.clone()
    bad[3, 7] = torch.where(bad[3, 7] > 0, bad[3, 7] - 2, bad[3, 7] + 2)
    assert "steps" in _mismatch(got._replace(xq=bad), want, torch.float16, 0.0)
    assert "s_x" in _mismatch(got._replace(sx=got.sx * (1 + 3 * ULP[torch.float16])), want, torch.float16, 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_unfused_cuda_path(dtype):
    """Against torch's add + ``decode.rms_norm`` on the GPU, then the existing activation quantization kernel
    (``quick::quantize_act_w4a8``): the same x_q but where the sum of squares' order moved a normed element by
    one ulp (then one step), the same residual bit for bit; deterministic."""
    import quick.kernels.ops  # noqa: F401
    from quick.kernels.decode import rms_norm

    for m, k, offset in ((1, 4096, 0.0), (33, 5120, 0.0), (256, 2048, 1.0), (4096, 1024, 0.0)):
        x, w, r = _inputs(m, k, dtype, True, seed=m)
        got = nq.rms_norm_quant_cuda(x, w, EPS, offset, r, normed=True)
        again = nq.rms_norm_quant_cuda(x, w, EPS, offset, r, normed=True)
        res = r + x
        normed = rms_norm(res, w, EPS, offset)
        xq, sx = torch.ops.quick.quantize_act_w4a8(normed)
        assert torch.equal(got.residual, res)
        d = (got.xq.int() - xq.int()).abs()
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3, (m, k)
        assert float((got.normed != normed).float().mean()) < 1e-3
        assert bool(((got.sx - sx).abs() <= sx * _ulps(dtype, offset)).all())
        assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


def test_zero_and_nan_rows():
    """A zero row quantizes to zeros with s_x = 0; a NaN row gets s_x = NaN (like the activation kernel) and
    leaves the other rows alone."""
    x, w, _ = _inputs(4, 256, torch.float16, False)
    x[1] = 0
    x[2, 5] = float("nan")
    got = nq.rms_norm_quant_cuda(x, w, EPS)
    assert bool((got.xq[1] == 0).all()) and float(got.sx[1]) == 0.0
    assert bool(got.sx[2].isnan())
    keep = torch.tensor([0, 3], device="cuda")
    want = _reference64(x[keep], w, EPS, 0.0, None)
    assert _mismatch(nq.NormQuant(got.xq[keep], got.sx[keep], None, None), want, torch.float16, 0.0) is None


def test_op_and_empty_batch():
    import quick.kernels.ops  # noqa: F401

    x, w, r = _inputs(5, 640, torch.bfloat16, True)
    xq, sx, res, normed = torch.ops.quick.rms_norm_quant(x, r, w, EPS, 0.0, False)
    ref = nq.rms_norm_quant_cuda(x, w, EPS, 0.0, r)
    assert torch.equal(xq, ref.xq) and torch.equal(sx, ref.sx) and torch.equal(res, ref.residual)
    assert normed.numel() == 0
    empty = nq.rms_norm_quant_cuda(x[:0], w, EPS, 0.0, r[:0])
    assert empty.xq.shape == (0, 640) and empty.sx.shape == (0,)


# --------------------------------------------------------------------------------------------------- model


def _model(group: int):
    """A 2-layer W4A8 Llama every projection of which the kernels take, fused, in this GPU's preferred layout."""
    transformers = pytest.importorskip("transformers")
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.models.fuse import fuse_model
    from quick.nn.linear_w4a8 import LAYOUT, QuickLinearW4A8, preferred_w4a8_layout

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape))
    model = model.to("cuda", torch.float16)
    quantize_model_rtn_w4a8(model, group, dtype=torch.float16, progress=False)
    layout = preferred_w4a8_layout("cuda")
    if layout != LAYOUT:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuickLinearW4A8):
                new = QuickLinearW4A8(mod.weight(), mod.bias, mod.dtype, mod.logical_in_features, True, layout)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
    assert fuse_model(model) == 4
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused kernel ran (the GEMMs on their model choice: no candidates timed, few builds)."""
    monkeypatch.setenv("QUICK_AUTOTUNE", "0")
    seen = []
    real = nq.rms_norm_quant_cuda

    def counted(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(nq, "rms_norm_quant_cuda", counted)
    return seen


def test_model_logits_fusion_on_and_off(monkeypatch, calls):
    """Transformers' layers (the norms attached by fuse_model): prompt logits with ``normquant`` on are those
    with it off within the rare one-step differences, and the fused kernel ran for both norms of both layers."""
    model = _model(-1)
    ids = torch.randint(0, 512, (2, 8), device="cuda")  # the prefill shape of the decode test: the same builds
    with torch.no_grad():
        monkeypatch.setenv("QUICK_FUSIONS", "none")
        off = model(ids).logits
        assert not calls
        monkeypatch.setenv("QUICK_FUSIONS", "normquant")
        on = model(ids).logits
    assert len(calls) == 4
    assert model.model.layers[0].self_attn.qkv_proj.linear.last_path == "kernel"
    assert torch.isfinite(on).all()
    assert _rel(on, off) < 2e-3, _rel(on, off)
    assert float((on.argmax(-1) == off.argmax(-1)).float().mean()) > 0.98


def test_graphed_fast_decode_fusion_on_and_off(monkeypatch, calls):
    """The CUDA-graphed fast decode step (add + norm + quantization in one launch before q/k/v and gate/up) against
    the same step with the fusion off, teacher-forced on the unfused tokens: logits within a tight bound at every
    step, the greedy tokens nearly all the same."""
    from quick import inference
    from quick.inference import StaticGenerator

    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")  # dynamo tracing, no inductor build
    torch._dynamo.reset()
    model = _model(-1)
    ids = torch.randint(0, 512, (2, 8), device="cuda")
    monkeypatch.setenv("QUICK_FUSIONS", "none")
    off = StaticGenerator(model, 2, 32, use_graph=True, compile="fast")
    tokens, _ = off.generate(ids, 12)
    monkeypatch.setenv("QUICK_FUSIONS", "normquant")
    on = StaticGenerator(model, 2, 32, use_graph=True, compile="fast")
    worst, agree = 0.0, 0
    with torch.inference_mode():  # the generators' cache tensors are inference tensors: reset them in that mode
        off.cache.reset()
        on.prefill(ids)
        monkeypatch.setenv("QUICK_FUSIONS", "none")
        off.prefill(ids)
        for i in range(tokens.shape[1] - 1):
            monkeypatch.setenv("QUICK_FUSIONS", "normquant")
            a = on.decode_step(tokens[:, i], 8 + i).clone()
            monkeypatch.setenv("QUICK_FUSIONS", "none")
            b = off.decode_step(tokens[:, i], 8 + i)
            assert torch.isfinite(a).all()
            worst = max(worst, _rel(a, b))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    torch._dynamo.reset()
    assert on._fast is not None and on._fast.layers[0].nq_attn is not None
    assert any(s[0] == 2 for s in calls)  # the decode step's [B, hidden] rows went through the fused kernel
    assert worst < 2e-3, worst
    assert agree >= 0.95 * 2 * (tokens.shape[1] - 1)
