"""Device correctness of the Hopper W4A8 kernel (wgmma s8, register-A int4 weights) against the float64
``w4a8_reference``.

Skipped without an sm_90 GPU. Fresh random inputs per case, NaN-poisoned outputs, relative Frobenius bounds
that fail on any indexing error (the integer part is exact: only the fp32 epilogue and the 16-bit output
rounding remain), NaN/inf propagation, bit-exact activation quantization, split-k determinism, bad inputs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, M_ALL, require_sm90

from quick.formats.layouts import pack_w4a8_sm90
from quick.formats.w4a8 import W4A8Weight, quantize_activations, w4a8_reference
from quick.kernels import ops

pytestmark = pytest.mark.gpu

require_sm90("quick.kernels.w4a8_wgmma", "sm_90 W4A8 kernel")

from quick.kernels import w4a8_wgmma as w8  # noqa: E402

# Weight formats: per-channel; per group with scales up to 127 (the per-group fold); per group with scales <= 16
# (what the quantizers write: the widened kernels run them).
GROUPS = [-1, 128, "128w"]
BOUND = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
_CACHE: dict = {}


def _fmt(g) -> tuple[int, int]:
    """(group size, largest group scale) of a GROUPS entry."""
    return (128, 16) if g == "128w" else (g, 127)


def _weights(k: int, n: int, g):
    key = (k, n, g)
    if key not in _CACHE:
        gsz, smax = _fmt(g)
        gen = torch.Generator().manual_seed(hash(key) % 2**31)
        q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        cs = (torch.rand(n, generator=gen) * 0.75 + 0.25) * (2e-3 if gsz < 0 else 3e-5 * 127 / smax)
        gs = torch.randint(1, smax + 1, (k // gsz, n), generator=gen, dtype=torch.int16) if gsz > 0 else None
        g = gsz
        w = W4A8Weight(q, cs, gs, g)
        wd = w.dequantize(torch.float64).cuda()
        _CACHE[key] = (w, {name: t.cuda() for name, t in pack_w4a8_sm90(w).items()}, wd)
    return _CACHE[key]


def _reference(x, wd, bias=None):
    """``w4a8_reference`` with the float64 weight dequantized once (the big shapes would redo it per case)."""
    xq, sx = quantize_activations(x)
    y = (xq.to(torch.float64) @ wd.t()) * sx.to(torch.float64)[:, None]
    return y + bias.to(torch.float64) if bias is not None else y


def test_reference_helper_is_the_contract():
    w, _p, wd = _weights(384, 640, 128)
    x = torch.randn(5, 384, device="cuda").half()
    b = torch.randn(640, device="cuda").half()
    assert torch.allclose(_reference(x, wd, b), w4a8_reference(x, w, b), rtol=1e-12, atol=0)


def _run(m, k, n, g, dtype, bias=False, config=None, splits=None, x=None, widen=None):
    w, p, wd = _weights(k, n, g)
    if x is None:
        x = torch.randn(m, k, device="cuda").to(dtype)
    b = (torch.randn(n, device="cuda") * 0.1).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    gsz = _fmt(g)[0]
    w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p.get("group_scale"), gsz, b, config, splits, out, widen)
    torch.cuda.synchronize()
    return out, _reference(x, wd, b)


def _check(out, ref, dtype):
    o = out.double()
    assert torch.isfinite(o).all(), "non-finite output (poison not overwritten or overflow)"
    err = float((o - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err <= BOUND[dtype], f"relative error {err:.3e} > {BOUND[dtype]:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("m", M_ALL)
def test_small_shape_all_m(m, g, dtype):
    out, ref = _run(m, 384, 640, g, dtype, bias=(m % 2 == 1))
    _check(out, ref, dtype)


@pytest.mark.parametrize("kn", [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (128, 64), (1152, 1088)])
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("m", [1, 16, 33, 255, 1000, 4096])
def test_model_shapes(kn, g, m):
    k, n = kn
    dtype = torch.bfloat16 if m == 33 else torch.float16
    out, ref = _run(m, k, n, g, dtype)
    _check(out, ref, dtype)


@pytest.mark.parametrize("g", GROUPS)
def test_every_tile_and_split(g):
    gsz, smax = _fmt(g)
    cfgs = [c for c in w8.CONFIGS[gsz] if smax <= 16 or not c.widen]  # widened variants need scales <= 16
    for cfg in cfgs:
        for splits in (1, 5):
            out, ref = _run(300, 1408, 640, g, torch.float16, config=cfg, splits=splits)
            _check(out, ref, torch.float16)


def test_widened_equals_folded_bitwise():
    """On scales <= 16 the widened kernel (q * s_g in int8, one accumulator) and the per-group fold compute the
    same exact integer sums: identical output bits, for every widened variant against the fold default."""
    x = torch.randn(200, 1408, device="cuda").half()
    ref, _ = _run(200, 1408, 640, "128w", torch.float16, config=w8.default_config(200, 128), x=x)
    for cfg in w8.CONFIGS[128]:
        if cfg.widen:
            out, _ = _run(200, 1408, 640, "128w", torch.float16, config=cfg, x=x, widen=True)
            assert torch.equal(out, ref), cfg


def test_widened_config_refused_for_large_scales():
    with pytest.raises(w8.W4A8Sm90Error, match="<= 16"):
        _run(8, 384, 640, 128, torch.float16, config=w8.WIDEN_SMEMW[8])
    # the automatic choice reads the scales and takes the fold for scales > 16
    out, ref = _run(8, 384, 640, 128, torch.float16)
    _check(out, ref, torch.float16)


def test_quantization_bit_exact():
    for dt in DTYPES:
        x = (torch.randn(37, 4096, device="cuda") * 4).to(dt)
        x[3] = 0
        x[5, :100] *= 1000
        xq, sx = w8.quantize_activations_sm90(x)
        rq, rs = quantize_activations(x)
        assert torch.equal(xq, rq) and torch.equal(sx, rs)


def test_split_k_deterministic_and_exact():
    """Integer split-k partials are exact: any split count gives identical bits, run after run."""
    x = torch.randn(64, 8192, device="cuda").half()
    for g in (128, "128w"):
        outs = [_run(64, 8192, 1024, g, torch.float16, splits=s, x=x)[0] for s in (1, 8, 8, 16)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_non_finite_rows_stay_in_their_row():
    """A NaN or inf in row r makes row r non-finite (s_x is NaN/inf) and leaves the other rows correct."""
    x = torch.randn(20, 1024, device="cuda").half()
    x[3, 7] = float("nan")
    x[11, 100] = float("inf")
    out, _ = _run(20, 1024, 256, -1, torch.float16, x=x)
    assert not torch.isfinite(out[3]).any() and not torch.isfinite(out[11]).any()
    keep = [i for i in range(20) if i not in (3, 11)]
    _, ref = _run(18, 1024, 256, -1, torch.float16, x=x[keep].contiguous())
    _check(out[keep], ref, torch.float16)


@pytest.mark.parametrize("g", [128, "128w"])
def test_op_and_dispatcher_entry(g):
    w, p, _wd = _weights(1024, 512, g)
    widen = g == "128w"
    x = torch.randn(9, 1024, device="cuda").half()
    y = torch.ops.quick.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], None, 128, widen)
    _check(y, w4a8_reference(x, w), torch.float16)
    y2 = ops.linear_w4a8_sm90(x, p, 128, widen=widen)
    assert torch.equal(y, y2)


def test_layer_widens_quantizer_output():
    """A QQQ/RTN-quantized layer (scales <= 16) runs the widened kernel and matches the reference path."""
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    lin = torch.nn.Linear(1024, 512, bias=True).half()
    layer = QuickLinearW4A8.from_weight(lin.weight.data, 128, lin.bias, torch.float16, True, "w4a8_sm90").cuda()
    assert layer.widen and layer.storage == "w4a8_sm90"
    x = torch.randn(3, 7, 1024, device="cuda").half()
    y = layer(x)
    assert layer.last_path == "kernel"
    layer.backend = "reference"
    ref = layer(x)
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err < 2e-3, err


def test_bad_inputs_raise():
    _w, p, _wd = _weights(1024, 512, 128)
    x = torch.randn(4, 1024, device="cuda").half()
    with pytest.raises(w8.W4A8Sm90Error):
        w8.gemm_w4a8_sm90(x.float(), p["qweight"], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error):
        w8.gemm_w4a8_sm90(x[:, :640], p["qweight"], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error):
        w8.gemm_w4a8_sm90(x.cpu(), p["qweight"], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error):
        w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], None, 128)
    with pytest.raises(w8.W4A8Sm90Error):
        out = torch.empty(4, 256, device="cuda", dtype=torch.float16)
        w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, out=out)
    assert w8.gemm_w4a8_sm90(x[:0], p["qweight"], p["channel_scale"], p["group_scale"], 128).shape == (0, 512)
