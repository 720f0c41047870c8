"""CPU-side checks of the QUICK mma.sync launcher: the kernels' fragment math and loop bookkeeping emulated in
Python, launch planning, input validation, the custom op's fake implementation, and the dispatcher's
registry and fallback to the reference path when no GPU kernel applies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import check_fusion_switch

from quick.formats.layouts import get_layout
from quick.kernels import dispatch, mma, ops, select
from quick.testing import random_quantized

MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


def _halves(u32: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed 32-bit pairs into (low, high) 16-bit values of ``dtype``."""
    t = torch.from_numpy(u32.astype(np.uint32).view(np.int32).copy())
    pairs = t.view(torch.int16).view(dtype).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def emulate_b_fragments(packed: dict, k: int, n: int, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild dequant(W) [K, N] exactly as quick_gemm / quick_gemv threads do: the same uint4 address per
    (k16 step, n64 block, lane), the same 16-byte scale/zero slot, lop3 + magic numbers in the 16-bit type,
    subtract-then-multiply, and the mma.m16n8k16 B-fragment placement of each register."""
    magic_bits, magic = MAGIC[dtype]
    qw = packed["qweight"].reshape(-1).numpy().view(np.uint32)
    sc = packed["scales"].reshape(-1)
    zr = packed["zeros"].reshape(-1)
    out = torch.full((k, n), float("nan"), dtype=torch.float64)
    lane = np.arange(32)
    gq, cq = lane // 4, lane % 4
    for step in range(k // 16):
        grp = step * 16 // g
        for blk in range(n // 64):
            base = 4 * (step * (n // 2) + blk * 32 + lane)  # uint4 index -> int32 words
            svec = [sc[grp * n + blk * 64 + 8 * gq + j] for j in range(8)]  # slot 8*(lane/4) + j
            zvec = [zr[grp * n + blk * 64 + 8 * gq + j] for j in range(8)]
            for w in range(4):
                word = qw[base + w]
                for p in range(4):
                    h = ((word >> (4 * p)) & 0x000F000F) | (magic_bits * 0x10001)
                    lo, hi = _halves(h, dtype)
                    tile = 2 * w + p // 2
                    s = svec[tile].to(dtype)
                    zm = (zvec[tile].to(dtype) + magic).to(dtype)
                    reg = p % 2
                    for half, v in ((0, lo), (1, hi)):
                        val = ((v - zm).to(dtype) * s).to(dtype)
                        kk = 16 * step + 2 * cq + 8 * reg + half
                        nn = 64 * blk + 8 * tile + gq
                        assert torch.isnan(out[kk, nn]).all(), "two registers hold one element"
                        out[kk, nn] = val.to(torch.float64)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n,g", [(64, 64, 32), (128, 128, 64), (256, 64, 128), (192, 128, -1)])
def test_emulated_fragments_equal_dequantized_weight(k, n, g, dtype):
    gs = k if g == -1 else g
    qw = random_quantized(k, n, g, dtype, "cpu", torch.Generator().manual_seed(k + n + gs))
    packed = get_layout("quick").pack(qw)
    emu = emulate_b_fragments(packed, k, n, gs, dtype)
    ref = qw.dequantize(torch.float64).to(dtype).to(torch.float64)  # one rounding, like the kernel
    assert not torch.isnan(emu).any()
    assert torch.equal(emu, ref)


# ----------------------------------------------------------------------------- loop bookkeeping emulation


def emulate_gemv_warp(tb: int, te: int, r: int, gs_static: int, gsteps: int) -> list[tuple[int, int]]:
    """(step, scale group used) in consumption order, following quick_gemv's ring and scale bookkeeping."""
    used = []
    if tb >= te:
        return used
    if gs_static:
        nslot = r // gs_static
        slots = [None] * nslot
        for j in range(nslot):
            if tb + j * gs_static < te:
                slots[j] = (tb + j * gs_static) // gs_static
    else:
        cur = tb // gsteps
        nxt = None
        next_start = (tb // gsteps + 1) * gsteps
        next_load = next_start
        if next_load < min(te, tb + r):
            nxt = next_load // gsteps
            next_load += gsteps
    for t0 in range(tb, te, r):
        for i in range(r):
            t = t0 + i
            if t >= te:
                continue
            if gs_static:
                js = i // gs_static
                used.append((t, slots[js]))
                if i % gs_static == gs_static - 1:
                    u = t + 1 - gs_static + r
                    if u < te:
                        slots[js] = u // gs_static
            else:
                if t == next_start:
                    cur = nxt
                    next_start += gsteps
                used.append((t, cur))
                u = t + r
                if u < te and u == next_load:
                    nxt = u // gsteps
                    next_load += gsteps
    return used


@pytest.mark.parametrize("k", [64, 1024, 2240, 4160, 11008])
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_gemv_plan_and_scale_ring_cover_every_step_once(k, g, splits):
    if g > 0 and k % g:
        return
    gs = k if g == -1 else g
    for n in (64, 4096):
        p = mma.plan_gemv(4, n, k, gs, 132, splits=splits)
        ksteps = k // 16
        assert p.steps_per_warp % p.config.r == 0 and p.splits >= 1
        assert p.gs == (gs // 16 if gs // 16 < p.config.r else 0)
        seen = []
        for y in range(p.splits):
            warps_used = 0
            for w in range(p.config.warps):
                tb = (y * p.config.warps + w) * p.steps_per_warp
                te = min(tb + p.steps_per_warp, ksteps)
                used = emulate_gemv_warp(tb, te, p.config.r, p.gs, gs // 16)
                warps_used += bool(used)
                for step, grp in used:
                    assert grp == step * 16 // gs, f"step {step} used group {grp}"
                seen += [s for s, _ in used]
            assert warps_used > 0, "empty split"
        assert sorted(seen) == list(range(ksteps))


@pytest.mark.parametrize("name", sorted(mma.GEMM_CONFIGS))
@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_gemm_plan_steps_and_scale_rows(name, g):
    """Every k16 step is consumed once across (split, tile, k-warp, j) and reads the right scale row."""
    cfg = mma.GEMM_CONFIGS[name]
    for k in (cfg.bks, 6 * cfg.bks, 8192):
        gs = k if g == -1 else g
        if k % gs or k % cfg.bks:
            continue
        for splits in (None, 1, 2, 3, 7):
            p = mma.plan_gemm(40, 4096, k, 132, cfg, splits)
            gshift = int(math.log2(gs)) if gs < cfg.bks else 30
            srows = cfg.bks // gs if gs < cfg.bks else 1
            assert srows <= max(1, cfg.bks // 32)
            total = k // cfg.bks
            seen = []
            for z in range(p.splits):
                tile_begin = z * p.tiles_per_split
                ntiles = min(p.tiles_per_split, total - tile_begin)
                assert ntiles >= 1
                for tile in range(ntiles):
                    k0 = (tile_begin + tile) * cfg.bks
                    g0 = k0 // gs
                    for wk in range(cfg.warps_k):
                        for j in range(cfg.sw):
                            kl = (wk * cfg.sw + j) * 16
                            step = (tile_begin + tile) * (cfg.bks // 16) + wk * cfg.sw + j
                            assert step * 16 == k0 + kl
                            row = g0 + (kl >> gshift)
                            assert row == step * 16 // gs
                            assert (kl >> gshift) < srows
                            seen.append(step)
            assert sorted(seen) == list(range(k // 16))


def test_default_plans_are_sane():
    for m in (1, 9, 16, 17, 33, 64, 100, 128, 256, 1000, 4096):
        for k, n in ((4096, 4096), (8192, 8192), (11008, 4096), (4160, 576), (64, 64)):
            p = mma.plan_gemm(m, n, k, 132)
            assert k % p.config.bks == 0
            assert p.grid == (math.ceil(n / p.config.bn), math.ceil(m / p.config.bm), p.splits)
            assert p.config.smem_bytes <= mma.SMEM_LIMIT[8]


def test_smem_formula_matches_kernel_layout():
    c = mma.GEMM_CONFIGS["m16k8"]
    a_stage = 16 * (512 + 8) * 2
    assert c.smem_bytes == 3 * (a_stage + 2 * 16 * 64 * 2)
    assert mma.GEMV_CONFIGS["v16"].smem_bytes == 16 * 8 * 32 * 8


# ------------------------------------------------------------------------------------------------ validation


def _meta(k=256, n=128, g=64, m=4, dtype=torch.float16, device="meta"):
    gs = k if g == -1 else g
    x = torch.empty(m, k, dtype=dtype, device=device)
    qweight = torch.empty(k // 16, 2 * n, dtype=torch.int32, device=device)
    scales = torch.empty(k // gs, n, dtype=dtype, device=device)
    zeros = torch.empty(k // gs, n, dtype=dtype, device=device)
    return x, qweight, scales, zeros


def test_validate_accepts_and_reports_shape():
    x, q, s, z = _meta()
    assert mma.validate(x, q, s, z, 64, need_cuda=False) == (4, 256, 128, 64)
    x, q, s, z = _meta(k=320, g=-1)
    assert mma.validate(x, q, s, z, -1, need_cuda=False) == (4, 320, 128, 320)


def test_validate_errors():
    x, q, s, z = _meta()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        mma.validate(x.float(), q, s, z, 64, need_cuda=False)
    with pytest.raises(TypeError, match="int32"):
        mma.validate(x, q.long(), s, z, 64, need_cuda=False)
    with pytest.raises(TypeError, match="zeros"):
        mma.validate(x, q, s, z.to(torch.bfloat16), 64, need_cuda=False)
    with pytest.raises(ValueError, match="unsupported group_size"):
        mma.validate(x, q, s, z, 100, need_cuda=False)
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        mma.validate(*_meta(k=320, g=64), 128, need_cuda=False)
    with pytest.raises(ValueError, match="multiples of 64"):
        mma.validate(*_meta(k=272, g=-1), -1, need_cuda=False)
    with pytest.raises(ValueError, match="multiples of 64"):
        mma.validate(*_meta(n=96), 64, need_cuda=False)
    with pytest.raises(ValueError, match="bias must have shape"):
        mma.validate(x, q, s, z, 64, torch.empty(64, dtype=torch.float16, device="meta"), need_cuda=False)
    with pytest.raises(ValueError, match="2-D"):
        mma.validate(x[None], q, s, z, 64, need_cuda=False)


def test_cpu_tensors_are_refused_with_a_clear_error():
    x, q, s, z = _meta(device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        select.matmul("quick", x, q, s, z, 64)
    with pytest.raises(ValueError, match="CUDA"):
        torch.ops.quick.gemm_w4a16(x, q, s, z, 64)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, q, s, z = _meta(m=7)
    out = torch.ops.quick.gemm_w4a16(x, q, s, z, 64)
    assert out.shape == (7, 128) and out.dtype == torch.float16 and out.device.type == "meta"
    x3 = torch.empty(2, 3, 256, dtype=torch.bfloat16, device="meta")
    _, q, s, z = _meta(dtype=torch.bfloat16)
    assert torch.ops.quick.gemm_w4a16(x3, q, s, z, 64).shape == (2, 3, 128)
    with FakeTensorMode():
        x, q, s, z = (torch.empty(t.shape, dtype=t.dtype) for t in _meta(m=5))
        out = torch.ops.quick.gemm_w4a16(x, q, s, z, 64, torch.empty(128, dtype=torch.float16))
        assert out.shape == (5, 128)
    with pytest.raises(ValueError):
        torch.ops.quick.gemm_w4a16(*_meta(), 32)


# ------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_falls_back_without_gpu():
    x = torch.randn(2, 256, dtype=torch.float16)
    assert dispatch.kernel_for("quick", x) is None
    assert dispatch.kernel_for("awq_gemm", x) is None
    names = [e.name for e in dispatch.registered("quick")]
    assert "quick_mma" in names


def test_dispatch_registry_priority_and_availability():
    calls = []
    lo = dispatch.register_kernel("test_layout", lambda x, p, g: calls.append("lo"), lambda x: True, 1, "lo")
    hi = dispatch.register_kernel("test_layout", lambda x, p, g: calls.append("hi"), lambda x: x.dim() == 2, 5, "hi")
    try:
        dispatch.kernel_for("test_layout", torch.zeros(2, 2))(None, None, 0)
        dispatch.kernel_for("test_layout", torch.zeros(2))(None, None, 0)
        assert calls == ["hi", "lo"]
        dispatch.register_kernel("test_layout", lambda x, p, g: None, lambda x: 1 / 0, 9, "broken")
        assert dispatch.kernel_for("test_layout", torch.zeros(2, 2)) is hi.fn  # a raising probe is skipped
    finally:
        for name in ("lo", "hi", "broken"):
            dispatch.unregister_kernel("test_layout", name)
    assert lo.priority == 1


def test_quicklinear_cpu_uses_reference_path():
    from quick.nn.linear import QuickLinear

    torch.manual_seed(0)
    mod = QuickLinear.from_linear(torch.nn.Linear(128, 64), 32)
    x = torch.randn(3, 128, dtype=torch.float16)
    assert mod(x).shape == (3, 64)


def test_variants_cover_every_config_and_both_archs():
    srcs = {(s, tuple(sorted(d.items()))) for s, d, _ in mma.VARIANTS}
    for dt in (torch.float16, torch.bfloat16):
        for cfg in mma.GEMM_CONFIGS.values():
            assert (mma.GEMM_SOURCE, tuple(sorted(cfg.defines(dt).items()))) in srcs
        for g in (32, 64, 128, 4096):
            d = mma.gemv_config_for(g).defines(dt, g)
            assert (mma.GEMV_SOURCE, tuple(sorted(d.items()))) in srcs
    assert all(a == mma.ARCHS for _, _, a in mma.VARIANTS)
    assert ops.linear_fn is not None


def test_pdl_launch_structs_match_cuda_h_and_the_switch(monkeypatch):
    """cuLaunchKernelEx's structs as cuda.h (CUDA 12/13) lays them out: CUlaunchAttribute 72 bytes with the value at
    8, CUlaunchConfig 56 bytes with the stream at 32, the attributes at 40 and their count at 48; the PDL switch."""
    import ctypes

    from quick.kernels import jit

    assert ctypes.sizeof(jit.LaunchAttribute) == 72 and jit.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(jit.LaunchConfig) == 56
    assert (jit.LaunchConfig.stream.offset, jit.LaunchConfig.attrs.offset, jit.LaunchConfig.num_attrs.offset) == (
        32,
        40,
        48,
    )
    cfg, attr = jit.pdl_config((5, 2, 1), (256, 1, 1), 4096)
    assert list(cfg.grid) == [5, 2, 1] and list(cfg.block) == [256, 1, 1] and cfg.smem == 4096
    assert cfg.num_attrs == 1 and cfg.attrs.contents.id == 6 and cfg.attrs.contents.value == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fusion_switch(monkeypatch, "pdl", jit.pdl_enabled)
    monkeypatch.setenv("QUICK_FUSIONS", "pdl")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not jit.pdl_enabled()  # griddepcontrol is sm_90


def test_raw_launch_plain_and_pdl(monkeypatch):
    """The one launch helper of CudaKernel and the decode launchers: cuLaunchKernel with grid, block, shared memory,
    stream and parameters in the driver's order, or cuLaunchKernelEx with the PDL config, its stream filled in."""
    from quick.kernels import jit

    calls = []

    class Driver:
        def cuLaunchKernel(self, *args):
            calls.append(("plain", args))
            return 0

        def cuLaunchKernelEx(self, cfg, fn, params, extra):
            c = cfg._obj
            calls.append(("ex", (list(c.grid), list(c.block), c.smem, c.stream, c.attrs.contents.id, fn, params)))
            return 7

    monkeypatch.setattr(jit, "_CUDA", Driver())
    params = object()
    assert jit.raw_launch("fn", (4, 2, 1), (128, 1, 1), 96, 1234, params) == 0
    kind, a = calls[-1]
    assert kind == "plain" and a[:8] == ("fn", 4, 2, 1, 128, 1, 1, 96) and a[8].value == 1234
    assert a[9] is params and a[10] is None
    pdl = jit.pdl_config((4, 2, 1), (128, 1, 1), 96)
    assert jit.raw_launch("fn", (4, 2, 1), (128, 1, 1), 96, 1234, params, pdl) == 7
    assert calls[-1] == ("ex", ([4, 2, 1], [128, 1, 1], 96, 1234, 6, "fn", params))


def test_out_buffer_checks_a_callers_output():
    """Every launcher takes the caller's ``out`` through one check: shape, dtype, device, contiguity, 16 bytes."""
    from quick.kernels import jit

    class Err(ValueError):
        pass

    dev = torch.device("cpu")
    assert jit.out_buffer(None, 3, 8, torch.float16, dev, Err).shape == (3, 8)
    good = torch.empty(3, 8, dtype=torch.float16)
    assert jit.out_buffer(good, 3, 8, torch.float16, dev, Err) is good
    bad = {
        "shape": torch.empty(3, 16, dtype=torch.float16),
        "dtype": torch.empty(3, 8, dtype=torch.bfloat16),
        "strided": torch.empty(8, 3, dtype=torch.float16).t(),
        "misaligned": torch.empty(3 * 8 + 1, dtype=torch.float16)[1:].view(3, 8),
    }
    for t in bad.values():
        with pytest.raises(Err, match="16-byte aligned"):
            jit.out_buffer(t, 3, 8, torch.float16, dev, Err)
