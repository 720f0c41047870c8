"""Device correctness of the decode kernel (``csrc/quick_dec.cu``: ``quick_sm90`` layout M <= 64, ``quick`` layout
M <= 16) against the
float64 reference: fresh random inputs per case, NaN-poisoned outputs, relative Frobenius bounds that fail on any
indexing error, bitwise determinism of the in-kernel split-k, CUDA-graph capture, and bad input.
Skipped without an sm_80+ GPU and nvcc."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import DTYPES, require_sm80_and_nvcc
from helpers import check_output as _check

from quick.formats.layouts import get_layout
from quick.kernels import select
from quick.testing import poisoned, random_quantized, reference_matmul

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

from quick.kernels import decode as qd  # noqa: E402
from quick.kernels import ops  # noqa: E402

M_DEC = [1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 63, 64]
_CACHE: dict = {}


def _weights(k: int, n: int, g: int, dtype: torch.dtype, layout: str = "quick_sm90"):
    """Random codes for (k, n, g, dtype), packed for ``layout`` on demand (a shape one layout takes may not suit the
    other: N = 1056 is a multiple of 16, not of 64)."""
    key = (k, n, g, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        qw = random_quantized(k, n, g, dtype, "cpu", torch.Generator().manual_seed(hash(key) % 2**31))
        _CACHE[key] = (type(qw)(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.group_size), {})
    qw, packs = _CACHE[key]
    if layout not in packs:
        packs[layout] = get_layout(layout).pack(qw)
    return qw, packs[layout]


def _run(m, k, n, g, dtype, bias=False, config=None, splits=None, layout="quick_sm90"):
    qw, p = _weights(k, n, g, dtype, layout)
    x = torch.randn(m, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    out = poisoned((m, n), dtype, "cuda")
    qd.gemv(layout, x, p["qweight"], p["scales"], p["zeros"], g, b, config=config, splits=splits, out=out)
    torch.cuda.synchronize()
    return out, reference_matmul(x, qw, b)


@pytest.mark.parametrize("layout", qd.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", M_DEC)
def test_all_decode_batch_sizes(m, dtype, layout):
    if m > qd.MAX_M_BY_LAYOUT[layout]:
        pytest.skip(f"{layout} takes M <= {qd.MAX_M_BY_LAYOUT[layout]}")
    _check(*_run(m, 4096, 4096, 128, dtype, layout=layout), dtype)


@pytest.mark.parametrize("layout", qd.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096), (8192, 8192), (5120, 13824), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 8, 16, 32, 64])
def test_model_shapes(k, n, m, dtype, layout):
    if m > qd.MAX_M_BY_LAYOUT[layout]:
        pytest.skip(f"{layout} takes M <= {qd.MAX_M_BY_LAYOUT[layout]}")
    _check(*_run(m, k, n, 128, dtype, layout=layout), dtype)


@pytest.mark.parametrize("layout", qd.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("k,n", [(128, 64), (192, 128), (4160, 1088), (128, 256), (4160, 1280)])
@pytest.mark.parametrize("m", [1, 5, 12, 29, 50])
def test_groups_and_small_shapes(k, n, g, m, dtype, layout):
    if g > 0 and k % g:
        pytest.skip("K not a multiple of the group (refusal tested elsewhere)")
    if not qd.takes(layout, m, n):
        pytest.skip(f"{layout}: M={m} above the limit or N={n} not a multiple of the default config's channels")
    _check(*_run(m, k, n, g, dtype, bias=m == 5, layout=layout), dtype)


@pytest.mark.parametrize("top,cfg", qd.all_configs(), ids=str)
@pytest.mark.parametrize("splits", [None, 1, 3, 7])
@pytest.mark.parametrize("g", [32, 128])
def test_every_config_and_split(top, cfg, splits, g):
    if not cfg.supports(g):
        pytest.skip("config cannot take this group size")
    m = 9 if top == 16 else top - 5  # the bucket's token-tile count
    # a partial last wave of channel tiles; N a multiple of 64 too (the layouts' entry points require it)
    n = 2 * cfg.channels if cfg.channels >= 512 else 1024 + max(cfg.channels, 64) * (1024 % cfg.channels == 0)
    _check(*_run(m, 4096, n, g, torch.float16, True, cfg, splits, qd.LAYOUTS[cfg.wb]), torch.float16)


@pytest.mark.parametrize("layout", qd.LAYOUTS)
def test_split_k_is_bitwise_deterministic(layout):
    qw, p = _weights(8192, 1024, 128, torch.float16, layout)
    x = torch.randn(4, 8192, device="cuda").half()
    outs = [qd.gemv(layout, x, p["qweight"], p["scales"], p["zeros"], 128, splits=6) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("entry", ["gemv_sm90", "op"])
def test_graph_capture_and_forced_decode_through_the_sm90_entry(entry, monkeypatch):
    """The decode kernel on the sm90 layout captured in a CUDA graph: called directly, and through the layout's op
    with the decode kernel forced (``QUICK_KERNEL=dec``)."""
    qw, p = _weights(4096, 4096, 128, torch.float16)
    x = torch.randn(1, 4096, device="cuda").half()
    ref = reference_matmul(x, qw)
    if entry == "gemv_sm90":
        fn = lambda: qd.gemv_sm90(x, p["qweight"], p["scales"], p["zeros"], 128)  # noqa: E731
    else:
        monkeypatch.setenv("QUICK_KERNEL", "dec")
        prob = select.prepare("quick_sm90", x, p["qweight"], p["scales"], p["zeros"], 128, None)[0]
        assert (select.choose(prob).kernel, select.choose(prob).source) == ("dec", "override")
        fn = lambda: torch.ops.quick.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], None, 128)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    _check(out, ref, torch.float16)


def test_bad_input_is_a_clear_error():
    qw, p = _weights(4096, 1024, 128, torch.float16)
    x = torch.randn(65, 4096, device="cuda").half()
    with pytest.raises(qd.DecError, match="M <= 64"):
        qd.gemv_sm90(x, p["qweight"], p["scales"], p["zeros"], 128)
    pq = get_layout("quick").pack(qw)
    with pytest.raises(qd.DecError, match="M <= 16"):
        qd.gemv_quick(x[:17], pq["qweight"], pq["scales"], pq["zeros"], 128)
    with pytest.raises(ValueError, match="shape"):
        qd.gemv_sm90(x[:1, :2048], p["qweight"], p["scales"], p["zeros"], 128)
    with pytest.raises(qd.DecError, match="contiguous"):
        qd.gemv_sm90(x[:1], p["qweight"].t().contiguous().t(), p["scales"], p["zeros"], 128)


def test_dispatch_switches_route_decode_batches_to_the_kernel(monkeypatch):
    """With the decode kernel forced up to 64 rows (``QUICK_KERNEL=dec@64``), both layouts' automatic entries take
    it within its limits, and their GEMMs beyond them (M above the layout's limit, N not a multiple of the CTA's
    channels)."""
    calls = []
    real = qd.run_validated
    monkeypatch.setattr(qd, "run_validated", lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    monkeypatch.setenv("QUICK_KERNEL", "dec@64")
    for layout in ("quick", "quick_sm90"):
        fn = functools.partial(select.matmul, layout)
        for m, n, routed in ((3, 2048, True), (40, 2048, layout == "quick_sm90"), (40, 1024 + 128, False)):
            calls.clear()
            qw, p = _weights(4096, n, 128, torch.float16, layout)
            x = torch.randn(m, 4096, device="cuda").half()
            _check(fn(x, p["qweight"], p["scales"], p["zeros"], 128), reference_matmul(x, qw), torch.float16)
            assert calls == ([m] if routed else []), (layout, m, n, calls)
            prob = select.prepare(layout, x, p["qweight"], p["scales"], p["zeros"], 128, None)[0]
            assert (select.choose(prob).kernel == "dec") == routed, (layout, m, n, select.choose(prob))


# ---- QD_ACT: the gated MLP's down projection stages act(gate) * up itself


def _gated64(gu: torch.Tensor, act: str, dtype: torch.dtype) -> torch.Tensor:
    """act(gate) * up in float64, rounded once to the model dtype (as the kernel stages it)."""
    k = gu.shape[1] // 2
    g, u = gu[:, :k].double(), gu[:, k:].double()
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (a * u).to(dtype)


def _run_act(m, k, n, dtype, act, config=None, splits=None, bias=False, scale=3.0):
    qw, p = _weights(k, n, 128, dtype)
    gu = (torch.randn(m, 2 * k, device="cuda") * scale).to(dtype)  # gates well into silu's / gelu's curve
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    out = poisoned((m, n), dtype, "cuda")
    qd.run_validated("quick_sm90", gu, p["qweight"], p["scales"], p["zeros"], b, m, n, k, 128, config, splits, out,
                     act=qd.ACTS[act])  # fmt: skip
    torch.cuda.synchronize()
    return out, reference_matmul(_gated64(gu, act, dtype), qw, b)


@pytest.mark.parametrize("act", sorted(qd.ACTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", sorted(qd.ACT_CONFIGS, key=repr), ids=repr)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_act_every_config(m, cfg, dtype, act):
    """Every QD_ACT config, the automatic split and a forced uneven one, bias on the second."""
    k, n = 2816, 2048  # K: 44 k64 steps (uneven slices over 16 warps); N: a multiple of every config's channels
    _check(*_run_act(m, k, n, dtype, act, config=cfg), dtype)
    _check(*_run_act(m, k, n, dtype, act, config=cfg, splits=3, bias=True), dtype)


@pytest.mark.parametrize("fusions", ["none", "act"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(11008, 4096), (14336, 4096), (13824, 5120)])
@pytest.mark.parametrize("m", [1, 8])
def test_act_model_shapes_through_the_op(k, n, m, dtype, fusions, monkeypatch):
    """The op on down-projection shapes, whatever the choice for the shape (one launch or the two steps), with the
    ``act`` fusion off and on."""
    monkeypatch.setenv("QUICK_FUSIONS", fusions)
    qw, p = _weights(k, n, 128, dtype)
    gu = (torch.randn(m, 2 * k, device="cuda") * 3).to(dtype)
    out = torch.ops.quick.gated_gemm_w4a16_sm90(gu, p["qweight"], p["scales"], p["zeros"], None, 128, "silu")
    _check(out, reference_matmul(_gated64(gu, "silu", dtype), qw), dtype)


def test_act_falls_back_where_no_variant_applies(monkeypatch):
    """M = 16 (two token tiles) and group size 64 take the two steps even with the ``act`` fusion on: the same as
    gated() then the layout's automatic product."""
    monkeypatch.setenv("QUICK_FUSIONS", "act")
    for m, g in ((16, 128), (4, 64)):
        qw, p = _weights(1024, 512, g, torch.float16)
        gu = torch.randn(m, 2048, device="cuda").half()
        prob = select.Problem("quick_sm90", m, 512, 1024, g, gu.dtype, gu.device)
        assert select.fused_choice(prob, True, False) is None, (m, g)
        out = ops.gated_gemm(gu, p["qweight"], p["scales"], p["zeros"], g, None, "gelu_tanh")
        want = select.matmul("quick_sm90", qd.gated(gu[:, :1024], gu[:, 1024:], "gelu_tanh"), p["qweight"],
                             p["scales"], p["zeros"], g)  # fmt: skip
        assert torch.equal(out, want)


def test_act_graph_capture_and_linear_forward_gated(monkeypatch):
    """QuickLinear.forward_gated under CUDA-graph capture, fused (``QUICK_FUSIONS=act``) against the two steps."""
    from quick.nn.linear import QuickLinear

    qw, _p = _weights(2048, 1024, 128, torch.bfloat16)
    lin = QuickLinear.from_quantized(qw, layout="quick_sm90")
    gu = (torch.randn(1, 4096, device="cuda") * 3).bfloat16()
    monkeypatch.setenv("QUICK_FUSIONS", "none")
    two = lin.forward_gated(gu, "silu")
    monkeypatch.setenv("QUICK_FUSIONS", "act")
    one = lin.forward_gated(gu, "silu")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = lin.forward_gated(gu, "silu")
    gu.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_matmul(_gated64(gu, "silu", torch.bfloat16), qw)
    _check(cap, ref, torch.bfloat16)
    from quick.testing import rel_error

    assert rel_error(one, two.double()) < 2e-2  # one rounding of act(g) * u against two


# ---- QD_NORM: the o / down projection ends with the residual add and RMSNorm


def _norm64(r: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    r = r.double()
    n = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return n * (w.double() if offset == 0.0 else offset + w.double())


def _run_norm(m, k, n, dtype, act="", offset=0.0, config=None, splits=None, bias=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qw, p = _weights(k, n, 128, dtype)
    x = (torch.randn(m, 2 * k if act else k, device="cuda", generator=gen) * (3 if act else 1)).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    resid = (torch.randn(m, n, device="cuda", generator=gen) * 4).to(dtype)
    w = (torch.rand(n, device="cuda", generator=gen) + 0.5).to(dtype)
    r, normed = poisoned((m, n), dtype, "cuda"), poisoned((m, n), dtype, "cuda")
    qd.run_validated("quick_sm90", x, p["qweight"], p["scales"], p["zeros"], b, m, n, k, 128, config, splits, r,
                     qd.ACTS.get(act, 0), (resid, w, 1e-5, offset, normed))  # fmt: skip
    torch.cuda.synchronize()
    h = reference_matmul(_gated64(x, act, dtype) if act else x, qw, b)
    r_ref = resid.double() + h
    return r, normed, r_ref, _norm64(r_ref, w, 1e-5, offset)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("act", ["", "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", sorted(qd.ACT_CONFIGS, key=repr), ids=repr)
@pytest.mark.parametrize("m", [1, 5, 8])
def test_norm_every_config(m, cfg, dtype, act, offset):
    """Every QD_NORM config, alone (o projection) and after act (down), llama and Gemma norms, with and without
    split-k (the tile's last split then counts for the row)."""
    for splits, bias in ((None, False), (3, True)):
        r, normed, r_ref, n_ref = _run_norm(m, 2816, 2048, dtype, act, offset, cfg, splits, bias, seed=m)
        _check(r, r_ref, dtype)
        _check(normed, n_ref, dtype)


@pytest.mark.parametrize("fusions", ["none", "act,norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,act", [(4096, 4096, ""), (11008, 4096, "silu"), (14336, 4096, "silu")])
def test_norm_model_shapes_through_the_op_and_determinism(k, n, act, dtype, fusions, monkeypatch):
    """The op on o / down shapes (one launch or the steps, as the choice for the shape goes), twice: bitwise equal;
    with the fusions off and on."""
    monkeypatch.setenv("QUICK_FUSIONS", fusions)
    qw, p = _weights(k, n, 128, dtype)
    x = torch.randn(1, 2 * k if act else k, device="cuda").to(dtype)
    resid, w = torch.randn(1, n, device="cuda").to(dtype), (torch.rand(n, device="cuda") + 0.5).to(dtype)
    args = (x, p["qweight"], p["scales"], p["zeros"], None, 128, resid, w, 1e-5, 0.0, act)
    normed, r = torch.ops.quick.gemm_add_norm_sm90(*args)
    again = torch.ops.quick.gemm_add_norm_sm90(*args)
    assert torch.equal(normed, again[0]) and torch.equal(r, again[1])
    r_ref = resid.double() + reference_matmul(_gated64(x, act, dtype) if act else x, qw)
    _check(r, r_ref, dtype)
    _check(normed, _norm64(r_ref, w, 1e-5, 0.0), dtype)


def test_norm_falls_back_and_linear_under_graph_capture(monkeypatch):
    """M = 16 takes the steps even with the ``norm`` fusion on (the same as add + rms_norm after the layout's
    automatic product); QuickLinear.forward_add_norm captured in a CUDA graph with ``QUICK_FUSIONS=norm`` replays on
    new inputs."""
    from quick.nn.linear import QuickLinear

    monkeypatch.setenv("QUICK_FUSIONS", "norm")
    qw, p = _weights(2048, 1024, 128, torch.float16)
    x16, res16 = torch.randn(16, 2048, device="cuda").half(), torch.randn(16, 1024, device="cuda").half()
    w = (torch.rand(1024, device="cuda") + 0.5).half()
    prob16 = select.Problem("quick_sm90", 16, 1024, 2048, 128, x16.dtype, x16.device)
    assert select.fused_choice(prob16, False, True) is None
    normed, r = ops.gemm_add_norm(x16, p["qweight"], p["scales"], p["zeros"], 128, None, res16, w, 1e-6)
    want_r = res16 + select.matmul("quick_sm90", x16, p["qweight"], p["scales"], p["zeros"], 128)
    assert torch.equal(r, want_r) and torch.equal(normed, qd.rms_norm(want_r, w, 1e-6))
    lin = QuickLinear.from_quantized(qw, layout="quick_sm90")
    x, res = torch.randn(2, 2048, device="cuda").half(), torch.randn(2, 1024, device="cuda").half()
    prob = select.Problem("quick_sm90", 2, 1024, 2048, 128, x.dtype, x.device)
    assert lin.fuses(2, x.device, x.dtype, norm=True) == (select.fused_choice(prob, False, True) is not None)
    lin.forward_add_norm(x, res, w, 1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_n, out_r = lin.forward_add_norm(x, res, w, 1e-6)
    x.mul_(-0.5)
    res.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    r_ref = res.double() + reference_matmul(x, qw)
    _check(out_r, r_ref, torch.float16)
    _check(out_n, _norm64(r_ref, w, 1e-6, 0.0), torch.float16)


# ---- QD_PDL: programmatic dependent launches (sm_90)


def _need_sm90():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", sorted(qd.ACT_CONFIGS, key=repr), ids=repr)
def test_pdl_chain_is_bitwise_the_plain_launch(cfg, dtype):
    """Three dependent launches (each reads the previous one's output, the third with the norm tail after act), as
    PDL variants and as plain ones, eager and graph-captured: bitwise equal. A wait in the wrong place would let a
    kernel read its input before the previous kernel wrote it."""
    _need_sm90()
    k = n = 2048
    qw, p = _weights(k, n, 128, dtype)
    w = (p["qweight"], p["scales"], p["zeros"])
    x0 = torch.randn(3, k, device="cuda").to(dtype)
    resid, nw = torch.randn(3, n, device="cuda").to(dtype), (torch.rand(n, device="cuda") + 0.5).to(dtype)

    def chain(pdl):
        a = qd.run_validated("quick_sm90", x0, *w, None, 3, n, k, 128, cfg, None, None, pdl=pdl)
        b = qd.run_validated("quick_sm90", a, *w, None, 3, n, k, 128, cfg, 2, None, pdl=pdl)
        gu = torch.cat((b, a), dim=1)  # a torch kernel between: the next launch follows a non-PDL kernel
        r, normed = torch.empty_like(resid), torch.empty_like(resid)
        qd.run_validated("quick_sm90", gu, *w, None, 3, n, k, 128, cfg, None, r, 1, (resid, nw, 1e-5, 0.0, normed),
                         pdl=pdl)  # fmt: skip
        c = qd.run_validated("quick_sm90", normed, *w, None, 3, n, k, 128, cfg, None, None, pdl=pdl)
        return a, b, r, normed, c

    plain = chain(False)
    eager = chain(True)
    assert all(torch.equal(u, v) for u, v in zip(plain, eager, strict=True))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = chain(True)
    x0.mul_(-1.0)
    graph.replay()
    torch.cuda.synchronize()
    again = chain(False)
    assert all(torch.equal(u, v) for u, v in zip(again, cap, strict=True))
    _check(again[0], reference_matmul(x0, qw), dtype)
