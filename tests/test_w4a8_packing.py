"""Layout ``w4a8``: exact round trips, clear errors, and a CPU emulation of the kernel's loads and int4 -> int8
conversion checked against the PTX ISA's fragment definition of ``mma.m16n8k32`` (.s8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import check_w4a8_round_trip, check_w4a8_unpack_errors, random_w4a8

from quick.formats.layouts import W4A8, W4A8_LAYOUTS, LayoutError, pack_w4a8, unpack_w4a8
from quick.formats.w4a8 import W4A8Weight

SHAPES = [(128, 32), (128, 128), (256, 96), (384, 640), (1024, 352)]  # (K, N)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("group_size", [-1, 128])
def test_round_trip(k, n, group_size):
    check_w4a8_round_trip(W4A8, pack_w4a8, unpack_w4a8, k, n, group_size, (k // 32, 4 * n))


def test_registry_and_errors():
    assert W4A8_LAYOUTS["w4a8"] is W4A8
    check_w4a8_unpack_errors(pack_w4a8, unpack_w4a8, 128)
    bad = W4A8Weight(torch.zeros(48, 128, dtype=torch.int8), torch.ones(48), None, -1)
    with pytest.raises(LayoutError, match="N % 32"):
        pack_w4a8(bad)


def _ptx_b_element(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k32 .s8 B fragment: b_i (i = 4*reg + byte) of a lane is B[row][col] with
    groupID = lane >> 2, threadID_in_group = lane % 4, row = threadID_in_group * 4 + (i & 3) (+ 16 for i >= 4),
    col = groupID. B is K x N (32 x 8)."""
    i = 4 * reg + byte
    row = (lane % 4) * 4 + (i & 3) + (16 if i >= 4 else 0)
    return row, lane >> 2


def _as_int8_bytes(reg: np.ndarray) -> np.ndarray:
    """uint32 register -> its 4 bytes (little endian: byte j = bits 8j..8j+7) as int8."""
    return reg.astype("<u4").view(np.int8).reshape(*reg.shape, 4)


@pytest.mark.parametrize("group_size", [-1, 128])
def test_lane_load_and_conversion_match_ptx_fragment(group_size):
    """For every k32 step, n32 block and lane: the lane's 16-byte load, converted as the kernel does
    (b0 = (w << 4) & 0xF0F0F0F0, b1 = w & 0xF0F0F0F0), gives 16 * B of the 4 n8k32 tiles, element for
    element in the PTX fragment order; the lane's 8-byte group-scale load gives the scales of its accumulator
    columns (c0/c1 of tile t sit at column 8t + 2*(lane%4) + {0, 1})."""
    k, n = 256, 96
    w = random_w4a8(k, n, group_size, seed=3)
    packed = pack_w4a8(w)
    words = packed["qweight"].numpy().view(np.uint32)  # [K/32, 4N]
    q = w.q.numpy()  # [N, K]; B[k][n] = q[n, k]
    checked = 0
    for step in range(k // 32):
        for blk in range(n // 32):
            for lane in range(32):
                load = words[step, blk * 128 + lane * 4 : blk * 128 + lane * 4 + 4]  # one 16-byte load
                b0 = _as_int8_bytes((load << np.uint32(4)) & np.uint32(0xF0F0F0F0))
                b1 = _as_int8_bytes(load & np.uint32(0xF0F0F0F0))
                for tile in range(4):
                    for reg, regs in ((0, b0), (1, b1)):
                        for byte in range(4):
                            row, col = _ptx_b_element(lane, reg, byte)
                            want = q[blk * 32 + tile * 8 + col, step * 32 + row]
                            assert int(regs[tile, byte]) == 16 * int(want), (step, blk, lane, tile, reg, byte)
                            checked += 1
    assert checked == k * n
    if group_size > 0:
        gs_packed = packed["group_scale"].numpy()
        gs = w.group_scale.numpy()
        for g in range(k // group_size):
            for blk in range(n // 32):
                for lane in range(32):
                    eight = gs_packed[g, blk * 32 + 8 * (lane % 4) : blk * 32 + 8 * (lane % 4) + 8]
                    for tile in range(4):
                        for e in range(2):
                            col = blk * 32 + tile * 8 + 2 * (lane % 4) + e
                            assert int(eight[2 * tile + e]) == int(gs[g, col])


def test_conversion_range_is_exact():
    """All 16 codes survive the shift-and-mask conversion as 16 * q (no int8 overflow, sign kept)."""
    codes = np.arange(-8, 8)
    nib = (codes & 0xF).astype(np.uint32)
    word = np.uint32(0)
    for i in range(8):
        word |= nib[i] << np.uint32(4 * i)
    b0 = _as_int8_bytes(np.array([(word << np.uint32(4)) & np.uint32(0xF0F0F0F0)], dtype=np.uint32))[0]
    b1 = _as_int8_bytes(np.array([word & np.uint32(0xF0F0F0F0)], dtype=np.uint32))[0]
    assert list(b0) == [16 * int(c) for c in codes[0:8:2]]
    assert list(b1) == [16 * int(c) for c in codes[1:8:2]]


# ----------------------------------------------------------------------------- op / launcher, CPU side


def test_linear_w4a8_cpu_is_reference_and_opcheck():
    """On CPU the op is the float64 reference rounded to x's dtype; opcheck validates schema and fake impl."""
    from quick.formats.w4a8 import w4a8_reference
    from quick.kernels import ops
    from quick.kernels import w4a8_mma as w8

    for group in (-1, 128):
        w = random_w4a8(256, 128, group, seed=11)
        packed = pack_w4a8(w)
        x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
        bias = torch.randn(128, dtype=torch.bfloat16)
        y = torch.ops.quick.gemm_w4a8(
            x, packed["qweight"], packed["channel_scale"], packed.get("group_scale"), group, bias
        )
        ref = w4a8_reference(x.reshape(6, 256), w, bias).to(torch.bfloat16).reshape(2, 3, 128)
        assert y.shape == (2, 3, 128) and torch.equal(y, ref)
        assert torch.equal(ops.linear_w4a8(x.reshape(6, 256), packed, group, bias), ref.reshape(6, 128))
        torch.library.opcheck(
            torch.ops.quick.gemm_w4a8.default,
            (x, packed["qweight"], packed["channel_scale"], packed.get("group_scale"), group, bias),
        )
    with pytest.raises(ValueError, match="K % 128"):
        w8.validate(torch.zeros(2, 96, dtype=torch.float16), packed["qweight"][:3], packed["channel_scale"], None, -1)


def test_plan_covers_every_m_and_k():
    """Pure launch arithmetic: every M of the test list and K % 128 == 0 gets a config whose stage divides K,
    a non-empty split each, and a grid that covers M and N."""
    from quick.kernels import w4a8_mma as w8

    for group in (-1, 128):
        for m in (1, 7, 16, 17, 33, 255, 256, 1000, 4096):
            for k, n in ((128, 128), (384, 640), (4096, 11008), (11008, 4096), (8192, 8192)):
                p = w8.plan(m, n, k, group, 132)
                cfg = p.config
                assert k % cfg.bks == 0
                assert p.grid[0] * cfg.bn >= n and p.grid[1] * cfg.bm >= m
                assert (p.splits - 1) * p.tiles_per_split < k // cfg.bks <= p.splits * p.tiles_per_split
                assert cfg.smem_bytes <= 163 * 1024
                assert any(v[1] == cfg.defines(torch.float16, group) for v in w8.VARIANTS), (cfg.name, group)
