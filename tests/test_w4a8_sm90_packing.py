"""Layout ``w4a8_sm90`` and the Hopper W4A8 launcher, on the CPU: exact round trips, clear errors, a CPU
emulation of every consumer thread's loads + int4 -> int8 conversion checked against the PTX ISA's wgmma A
fragment for .s8 (m64nNk32), the kernel's integer arithmetic (16q sums, exact group folds) against the float64
reference, the launch plan, and (marked ``compile``) ptxas on the variants: no spills, no wgmma serialization."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import check_w4a8_round_trip, check_w4a8_unpack_errors, have_nvcc, random_w4a8

from quick.formats.layouts import (
    W4A8_LAYOUTS,
    W4A8_SM90,
    LayoutError,
    pack_w4a8_sm90,
    unpack_w4a8_sm90,
)
from quick.formats.w4a8 import W4A8Weight, quantize_activations, w4a8_reference
from quick.kernels import w4a8_wgmma as w8

SHAPES = [(128, 16), (128, 64), (256, 48), (384, 640), (1408, 320)]  # (K, N)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("group_size", [-1, 128])
def test_round_trip(k, n, group_size):
    check_w4a8_round_trip(W4A8_SM90, pack_w4a8_sm90, unpack_w4a8_sm90, k, n, group_size, (k // 128, 16 * n))


def test_registry_and_errors():
    assert W4A8_LAYOUTS["w4a8_sm90"] is W4A8_SM90
    check_w4a8_unpack_errors(pack_w4a8_sm90, unpack_w4a8_sm90, 256)
    with pytest.raises(LayoutError, match="K % 128"):
        pack_w4a8_sm90(W4A8Weight(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), None, -1))
    with pytest.raises(LayoutError, match="N % 16"):
        pack_w4a8_sm90(W4A8Weight(torch.zeros(24, 128, dtype=torch.int8), torch.ones(24), None, -1))


# ------------------------------------------------------------------------------------------------ fragment


def ptx_wgmma_a_s8(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """PTX ISA, wgmma .m64nNk32 register fragment for A with .s8/.u8 (one warp's 16 rows; CUTLASS
    ALayout_64x32 = ((4,8,4),(4,2,2)):((256,1,16),(64,8,1024)) decodes to the same): register a_r of a lane
    holds 4 bytes, byte e = A[row = lane/4 + 8*(r%2)][k = 4*(lane%4) + 16*(r/2) + e] (rows + 16*warp)."""
    return lane // 4 + 8 * (reg % 2), 4 * (lane % 4) + 16 * (reg // 2) + byte


def to_i8_bytes(word: int) -> list[int]:
    return [((word >> (8 * e)) & 0xFF) - 256 * (((word >> (8 * e)) & 0xFF) >= 128) for e in range(4)]


def q1_regs(w0: int, w1: int) -> list[int]:
    """The kernel's QW_Q1 conversion (int8 q itself): ((c ^ 8) + 0x78) ^ 0x80 per byte, no carry between bytes."""

    def f(c: int) -> int:
        return (((c & 0x0F0F0F0F) ^ 0x08080808) + 0x78787878) ^ 0x80808080

    return [f(w0), f(w0 >> 4), f(w1), f(w1 >> 4)]


def widen_regs(w0: int, w1: int, s0: int, s1: int) -> list[int]:
    """The kernel's QW_WIDEN conversion (int8 q * s_g): u = c ^ 8 = q + 8 per nibble, one multiply of the packed
    bytes u by s plus (128 - 8 s) per byte (no carry: at most 240), ^ 0x80; s0 for rows lane/4, s1 for + 8."""
    u0, u1 = w0 ^ 0x88888888, w1 ^ 0x88888888

    def f(u: int, s: int) -> int:
        return (((u & 0x0F0F0F0F) * s + (128 - 8 * s) * 0x01010101) & 0xFFFFFFFF) ^ 0x80808080

    return [f(u0, s0), f(u0 >> 4, s1), f(u1, s0), f(u1 >> 4, s1)]


@pytest.mark.parametrize("s", [1, 2, 7, 15, 16])
def test_widen_bytes_have_no_carry(s):
    """Every code c in [0, 16) and scale s <= 16 in every byte position: the widened byte is exactly q * s."""
    for c in range(16):
        q = c - 16 if c >= 8 else c
        word = sum(c << (4 * i) for i in range(8))  # all eight nibbles = c
        for reg in widen_regs(word, word, s, s):
            assert to_i8_bytes(reg) == [q * s] * 4


@pytest.mark.parametrize("conv", ["16q", "q1", "widen"])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_thread_emulation_matches_ptx_fragment(group_size, conv):
    """Every thread of every consumer warp, as the kernel does it: its 32 bytes of a k128 row at
    qweight_u4[row][(nb/16 + warp)*64 + 2*lane + {0, 1}], registers a[j] = words (2j, 2j+1) converted with
    (w << 4) & 0xF0F0F0F0 / w & 0xF0F0F0F0 (int8 = 16 q), each byte placed where the PTX fragment says; the
    group scales by one 2-byte load at byte offset nb + 16*warp + 2*(lane/4). Must rebuild q and s_g exactly."""
    if conv == "widen" and group_size < 0:
        pytest.skip("widening applies to per-group scales")
    k, n = 256, 128
    w = random_w4a8(k, n, group_size, seed=5, scale_max=16 if conv == "widen" else 127)
    p = pack_w4a8_sm90(w)
    q1 = conv == "q1"
    words = p["qweight"].reshape(k // 128, -1).tolist()
    rebuilt = torch.full((n, k), 99, dtype=torch.int32)
    sg_rebuilt = torch.zeros(k // 128, n, dtype=torch.int32) if group_size > 0 else None
    for step in range(k // 128):
        for blk in range(n // 16):  # n16 block = one warp's rows (nb/16 + warp)
            for lane in range(32):
                base = blk * 256 + lane * 8  # int32 index of the lane's first word (uint4 index 2*lane)
                lw = [words[step][base + i] & 0xFFFFFFFF for i in range(8)]
                for j in range(4):  # k32 step
                    w0, w1 = lw[2 * j], lw[2 * j + 1]
                    lo = hi = 1
                    if group_size > 0:  # the lane's 2-byte group-scale load: rows lane/4 and lane/4 + 8
                        gsb = p["group_scale"].view(torch.uint8)[step].tolist()
                        off = blk * 16 + 2 * (lane // 4)
                        lo, hi = gsb[off], gsb[off + 1]
                        sg_rebuilt[step, 16 * blk + lane // 4] = lo
                        sg_rebuilt[step, 16 * blk + lane // 4 + 8] = hi
                    regs = [(w0 << 4) & 0xF0F0F0F0, w0 & 0xF0F0F0F0, (w1 << 4) & 0xF0F0F0F0, w1 & 0xF0F0F0F0]
                    if q1:
                        regs = q1_regs(w0, w1)
                    elif conv == "widen":
                        regs = widen_regs(w0, w1, lo, hi)
                    for r, reg in enumerate(regs):
                        for e, v in enumerate(to_i8_bytes(reg)):
                            row, kk = ptx_wgmma_a_s8(lane, r, e)
                            if conv == "widen":  # q * s_g of this row's group scale
                                sg = lo if r % 2 == 0 else hi
                                assert v % sg == 0
                                v //= sg
                            elif not q1:
                                assert v % 16 == 0
                                v //= 16
                            rebuilt[16 * blk + row, 128 * step + 32 * j + kk] = v
    assert torch.equal(rebuilt, w.q.to(torch.int32))
    if group_size > 0:
        assert torch.equal(sg_rebuilt, w.group_scale.to(torch.int32))


@pytest.mark.parametrize("group_size", [-1, 128])
def test_integer_arithmetic_plan(group_size):
    """The kernel's arithmetic in int64 (checked to stay inside int32): per-channel sums of x_q * 16q scaled by
    s_x * s_ch / 16; per group, partials of 16q sums shifted right by 4 (exact) times s_g. Equals the float64
    reference up to the fp32 epilogue."""
    k, n, m = 512, 64, 5
    w = random_w4a8(k, n, group_size, seed=11)
    x = torch.randn(m, k, dtype=torch.float64).to(torch.float16)
    x[1, 3] = 300.0  # outlier
    xq, sx = quantize_activations(x)
    a = xq.to(torch.int64)
    q16 = 16 * w.q.to(torch.int64)
    if group_size < 0:
        acc = a @ q16.t()
        assert acc.abs().max() < 2**31
        y = acc.double() * (sx.double()[:, None] * w.channel_scale.double()[None, :] / 16)
    else:
        acc = torch.zeros(m, n, dtype=torch.int64)
        for g in range(k // 128):
            part = a[:, 128 * g : 128 * (g + 1)] @ q16[:, 128 * g : 128 * (g + 1)].t()
            assert part.abs().max() < 2**31 and bool(((part % 16) == 0).all())
            acc += w.group_scale[g].to(torch.int64)[None, :] * (part >> 4)
            assert acc.abs().max() < 2**31
        y = acc.double() * (sx.double()[:, None] * w.channel_scale.double()[None, :])
    ref = w4a8_reference(x, w)
    assert float((y - ref).norm() / ref.norm()) < 1e-12


# ------------------------------------------------------------------------------------------------ launcher


def test_plan_and_configs():
    for m in (1, 7, 64, 300, 4096):
        for g in (-1, 128):
            cfg = w8.default_config(m, g)
            assert cfg.nt in (w8.GROUP_TILES if g > 0 else w8.TOKEN_TILES)
            for k, n in ((128, 64), (4096, 4096), (11008, 4096), (8192, 8192)):
                p = w8.plan(m, n, k, 132, cfg, group_size=g)
                nk = k // 128
                assert p.splits * p.steps_per_split >= nk > (p.splits - 1) * p.steps_per_split  # all splits non-empty
                assert 1 <= p.grid <= 132 and p.n_tiles * cfg.nwg * 64 >= n and p.m_tiles * cfg.nt >= m
    for _src, _name, d in w8.VARIANTS:
        cfg = w8.W4A8Sm90Config(
            d["QW_NT"],
            d["QW_NWG"],
            d["QW_STAGES"],
            d["QW_PREF"],
            d["QW_PIPE"],
            d["QW_ORDER"],
            d["QW_Q1"],
            d["QW_WIDEN"],
        )
        assert cfg.smem_bytes(128 if d["QW_GROUP"] else -1) <= w8.SMEM_LIMIT
        assert not cfg.widen or d["QW_GROUP"]  # widening is a per-group variant
        if d["QW_GROUP"] and not cfg.widen:
            assert cfg.nt in w8.GROUP_TILES  # a partial set next to 256 tokens of accumulators spills
    assert {d["QW_GROUP"] for _s, _n, d in w8.VARIANTS} == {0, 1}
    assert {d["QW_WIDEN"] for _s, _n, d in w8.VARIANTS if d["QW_GROUP"]} == {0, 1}
    for name, g in (("channel", -1), ("group", 128), ("group_widen", 128)):
        for _bound, cfg, _rounds in w8.TUNED[name]:
            assert cfg in w8.CONFIGS[g]  # every tuned config is in the compile check
            assert bool(cfg.widen) == (name == "group_widen")
    for g, widen in ((-1, False), (128, False), (128, True)):
        for m in (1, 16, 64, 256, 1024, 4096):
            assert w8.default_config(m, g, widen) in w8.candidates(m, g, widen)
            assert all(c in w8.CONFIGS[g] for c in w8.candidates(m, g, widen))
            assert all(bool(c.widen) == widen for c in w8.candidates(m, g, widen))
            assert bool(w8.tuned_config(m, g, widen)[0].widen) == widen
    assert w8.default_config(4096, 128, widen=True).nt == 256 and w8.default_config(4096, 128).nt == 128


@pytest.mark.parametrize(
    "k,n,m,g,nt,splits",
    [  # winners of the measured sweep (H200, docs/w4a8.md) that the fitted model reproduces
        (4096, 11008, 128, -1, 128, 1),
        (4096, 11008, 32, 128, 32, 1),
        (4096, 14336, 512, 128, 256, 1),
        (4096, 4096, 256, -1, 64, 1),
        (8192, 8192, 32, 128, 32, 2),
        (4096, 4096, 4096, 128, 256, 1),
    ],
)
def test_plan_model_reproduces_sweep_winners(k, n, m, g, nt, splits):
    cfg, s = w8.model_choice(m, n, k, 132, g, widen=g > 0)
    assert (cfg.nt, s) == (nt, splits)
    assert cfg in w8.CONFIGS[g] and bool(cfg.widen) == (g > 0)


def test_plan_model_stays_in_the_measured_domain():
    for k, n in ((4096, 4096), (8192, 8192), (11008, 4096), (4096, 14336), (128, 64)):
        for m in (17, 33, 100, 300, 1000, 5000):
            for g in (-1, 128):
                cfg, s = w8.model_choice(m, n, k, 132, g, widen=g > 0)
                assert 1 <= s <= min(w8.MODEL_MAX_SPLITS, k // 128)
                cap = w8.MODEL_MAX_M_TILES if m > 128 else 1
                assert -(-m // cfg.nt) <= max(cap, -(-m // 256)) and cfg.pipe == 3
    # decode sizes and the per-group fold keep the measured bucket table
    assert w8.tuned_key(128, False) not in w8.STEP_US and w8.PLAN_MODEL_MIN_M == 17


def test_validate_errors():
    k, n = 256, 128
    p = pack_w4a8_sm90(random_w4a8(k, n, 128))
    x = torch.randn(3, k, dtype=torch.float16)
    assert w8.validate(x, p["qweight"], p["channel_scale"], p["group_scale"], 128) == (3, n, k)
    with pytest.raises(w8.W4A8Sm90Error, match="float16 or bfloat16"):
        w8.validate(x.float(), p["qweight"], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error, match="multiple of 128"):
        w8.validate(x[:, :192], p["qweight"], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error, match="qweight has shape"):
        w8.validate(x, p["qweight"][:1], p["channel_scale"], p["group_scale"], 128)
    with pytest.raises(w8.W4A8Sm90Error, match="needs group_scale"):
        w8.validate(x, p["qweight"], p["channel_scale"], None, 128)
    with pytest.raises(w8.W4A8Sm90Error, match="take no group_scale"):
        w8.validate(x, p["qweight"], p["channel_scale"], p["group_scale"], -1)
    with pytest.raises(w8.W4A8Sm90Error, match="group_size"):
        w8.validate(x, p["qweight"], p["channel_scale"], p["group_scale"], 64)
    with pytest.raises(w8.W4A8Sm90Error, match="bias"):
        w8.validate(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, torch.zeros(n))
    with pytest.raises(w8.W4A8Sm90Error, match="CUDA"):
        w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], 128)


def test_fake_impl_shapes():
    """The op's fake (meta) implementation: output shape and dtype without running anything."""
    k, n = 256, 128
    p = pack_w4a8_sm90(random_w4a8(k, n, -1))
    x = torch.empty(5, k, dtype=torch.bfloat16, device="meta")
    out = torch.ops.quick.gemm_w4a8_sm90(x, p["qweight"].to("meta"), p["channel_scale"].to("meta"), None, None, -1)
    assert out.shape == (5, n) and out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ compile


@pytest.mark.compile
@pytest.mark.skipif(not have_nvcc(), reason="nvcc not found")
@pytest.mark.parametrize(
    "cfg,group",
    [(w8.default_config(8), -1), (w8.default_config(256), -1), (w8.default_config(128, 128), 128)]
    + [
        (w8.RING[256], -1),
        (w8.RING[128], 128),
        (w8.ORDERED[128], 128),
        (w8.ORDERED_Q1[128], 128),
        (w8.ORDERED[256], -1),
        (w8.WIDEN_SMEMW[256], 128),
        (w8.WIDEN_RING[8], 128),
    ],
)
def test_ptxas_no_spills_no_serialization(cfg, group):
    """ptxas: no spills, and no C75xx (C7514/C7515: wgmma serialized, an accumulator read while a wgmma is in
    flight; C7519: registers written between wgmma.fence and the wgmma)."""
    from quick.kernels import compile_check, jit

    res = jit.compile_cubin(w8.SOURCE, "sm_90a", cfg.defines(group, torch.float16))
    reps = {r.name: r for r in compile_check.parse_ptxas(res.log)}
    assert reps[w8.KERNEL].spill_bytes == 0
    assert not re.findall(r"C75\d\d", res.log), res.log
    # setmaxnreg moves registers inside the CTA: with two consumer warpgroups .dec 40 / .inc 232 balance only
    # at a launch allocation of 168 (otherwise .inc waits forever); four warpgroups do not reallocate.
    if cfg.nwg == 2:
        assert reps[w8.KERNEL].registers == 168
    src = (w8.jit.CSRC / w8.SOURCE).read_text()
    assert "constexpr bool SETMAXNREG = NWG == 2;" in src
