"""CPU-side checks of the decode kernel (``csrc/quick_dec.cu``): a thread-level model of the kernel (the same
work split, byte addresses, magic-number dequantization in the 16-bit type, ldmatrix and mma fragment semantics,
fp32 scale fold, k-slice reduction and split-k sum) must reproduce the float64 reference; launch planning;
and validation. (tests/test_compile.py assembles every variant, with no spills allowed.)"""

from __future__ import annotations

import pytest
import torch

from quick.kernels import quick_dec as qd
from quick.kernels import quick_sm90 as sm
from quick.packing.layouts import get_layout
from quick.testing import REL_BOUND, random_quantized, reference_matmul, rel_error

MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


def _halves(u32: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed 16-bit pair (int64 holding 32 bits) -> (low, high) as ``dtype`` values."""
    lo = (u32 & 0xFFFF).to(torch.int32).to(torch.int16)
    hi = ((u32 >> 16) & 0xFFFF).to(torch.int32).to(torch.int16)
    return lo.view(dtype), hi.view(dtype)


def _lop3(w: torch.Tensor, mask: int, magic: int) -> torch.Tensor:
    return (w & mask) | (magic | (magic << 16))


def _dequant_a(w: torch.Tensor, z_lo: torch.Tensor, z_hi: torch.Tensor, dtype: torch.dtype) -> list:
    """dequant_a + zero_consts of the kernel for one word per lane: 4 registers x (low, high) values, each
    arithmetic step rounded to ``dtype`` as the packed 16-bit instructions do."""
    m = MAGIC[dtype]
    magic_v = _halves(torch.tensor([m | (m << 16)]), dtype)[0]
    zr0 = (-(z_lo + magic_v)).to(dtype)  # neg_magic_zero, low half broadcast
    if dtype == torch.float16:
        zr1 = (-(z_hi + 64)).to(dtype)
        t = w >> 8
        pairs = [_lop3(w, 0x000F000F, m), _lop3(w, 0x00F000F0, m), _lop3(t, 0x000F000F, m), _lop3(t, 0x00F000F0, m)]
        scale = [1.0, 1.0 / 16, 1.0, 1.0 / 16]
    else:
        zr1 = (-(z_hi + magic_v)).to(dtype)
        pairs = [_lop3(w >> (4 * p), 0x000F000F, m) for p in range(4)]
        scale = [1.0] * 4
    out = []
    for p in range(4):
        z = zr0 if p % 2 == 0 else zr1
        lo, hi = _halves(pairs[p], dtype)
        out.append(((lo * scale[p] + z).to(dtype), (hi * scale[p] + z).to(dtype)))
    return out


def _mma(a_frag: list, b_frag: list) -> torch.Tensor:
    """mma.m16n8k16 (PTX fragment layouts), float64: returns c[lane, 4]."""
    lane = torch.arange(32)
    g, c = lane // 4, lane % 4
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for r in range(4):  # a_r: row g + 8 (r % 2), k 2c + 8 (r // 2) + half
        for h in range(2):
            A[g + 8 * (r % 2), 2 * c + 8 * (r // 2) + h] = a_frag[r][h].double()
    for r in range(2):  # b_r: k 2c + 8 r + half, n g
        for h in range(2):
            B[2 * c + 8 * r + h, g] = b_frag[r][h].double()
    D = A @ B
    return torch.stack([D[g, 2 * c], D[g, 2 * c + 1], D[g + 8, 2 * c], D[g + 8, 2 * c + 1]], 1)


def emulate(x, packed, g, cfg: qd.DecConfig, p: qd.DecPlan) -> torch.Tensor:
    """The kernel, CTA by CTA and warp by warp, with lanes vectorized."""
    m, k = x.shape
    n = packed["scales"].shape[1]
    dtype = x.dtype
    rb_n, warps = cfg.rb, cfg.warps
    nt_n = 1 if m <= 8 else 2
    gps = 2 if g == 32 else 1
    gshift = sm.group_shift(g, k)
    words = packed["qweight"].reshape(-1).to(torch.int64) & 0xFFFFFFFF
    sc = packed["scales"].reshape(-1)
    zr = packed["zeros"].reshape(-1)
    lane = torch.arange(32)
    out = torch.full((m, n), float("nan"), dtype=torch.float64)
    ws = torch.zeros(p.splits, m, n, dtype=torch.float64)
    for bx in range(p.n_tiles):
        nb0 = bx * rb_n
        for by in range(p.splits):
            s_beg = by * p.steps_per_split
            s_end = min(s_beg + p.steps_per_split, k // 64)
            nsteps = s_end - s_beg
            per_warp = -(-nsteps // warps)
            # x of the split in "shared memory": rows < M, the zero line for the others
            xs = x[:, s_beg * 64 : s_end * 64]
            red = torch.zeros(warps, rb_n, nt_n, 4, 32, dtype=torch.float64)
            for warp in range(warps):
                w_beg = s_beg + warp * per_warp
                w_n = max(0, min(per_warp, s_end - w_beg))
                acc = torch.zeros(rb_n, nt_n, 4, 32, dtype=torch.float64)
                for i in range(w_n):
                    s = w_beg + i
                    kloc = (w_beg - s_beg + i) * 64
                    # ldmatrix.x4: provider lane q gives row (q & 7) of matrix q >> 3; receiver l gets row l / 4,
                    # elements 2 (l % 4) + {0, 1} of matrix j -> b[2h + j / 2][nt][j % 2]
                    b = [[[None, None] for _ in range(nt_n)] for _ in range(4)]
                    for nt in range(nt_n):
                        for h in range(2):
                            for j in range(4):
                                prov = 8 * j + lane // 4
                                t = 8 * nt + (prov & 7)
                                col = (prov >> 3) * 8 + kloc + 32 * h + 2 * (lane % 4)
                                live = t < m
                                tt = torch.where(live, t, 0)
                                v0 = torch.where(live, xs[tt, col], torch.zeros((), dtype=dtype))
                                v1 = torch.where(live, xs[tt, col + 1], torch.zeros((), dtype=dtype))
                                b[2 * h + j // 2][nt][j % 2] = (v0, v1)
                    for rb in range(rb_n):
                        base = (s * (n // 16) + nb0 + rb) * 128 + lane * 4  # int32 index of the lane's chunk
                        for gi in range(gps):
                            row = 2 * s + gi if gps == 2 else s >> gshift
                            slot = row * n + (nb0 + rb) * 16 + 2 * (lane // 4)
                            s_lo, s_hi = sc[slot], sc[slot + 1]
                            z_lo, z_hi = zr[slot], zr[slot + 1]
                            part = torch.zeros(nt_n, 32, 4, dtype=torch.float64)
                            for jw in range(4 // gps):
                                w = gi * (4 // gps) + jw
                                a = _dequant_a(words[base + w], z_lo, z_hi, dtype)
                                for nt in range(nt_n):
                                    part[nt] += _mma(a, b[w][nt])
                            for nt in range(nt_n):
                                acc[rb, nt, 0] += s_lo.double() * part[nt, :, 0]
                                acc[rb, nt, 1] += s_lo.double() * part[nt, :, 1]
                                acc[rb, nt, 2] += s_hi.double() * part[nt, :, 2]
                                acc[rb, nt, 3] += s_hi.double() * part[nt, :, 3]
                red[warp] = acc
            flat = red.reshape(warps, -1)
            for idx in range(flat.shape[1]):  # the kernel's reduction loop and its (token, channel) decode
                l, e, nt, rb = idx & 31, (idx >> 5) & 3, (idx >> 7) % nt_n, idx // (128 * nt_n)
                token = 8 * nt + 2 * (l & 3) + (e & 1)
                chan = (nb0 + rb) * 16 + (l >> 2) + 8 * (e >> 1)
                if token >= m:
                    continue
                v = flat[:, idx].sum()
                if p.splits > 1:
                    ws[by, token, chan] = v
                else:
                    out[token, chan] = v
        if p.splits > 1:
            c0 = nb0 * 16
            out[:, c0 : c0 + rb_n * 16] = ws[:, :, c0 : c0 + rb_n * 16].sum(0)
    return out.to(dtype)


CASES = [
    # m, k, n, g, dtype, cfg, splits
    (1, 256, 128, 128, torch.float16, qd.DecConfig(4, 2, 2), None),
    (3, 256, 64, 32, torch.float16, qd.DecConfig(4, 2, 2), 2),
    (9, 192, 64, 64, torch.bfloat16, qd.DecConfig(2, 2, 2), None),
    (16, 256, 128, -1, torch.float16, qd.DecConfig(2, 3, 2), 2),
    (5, 320, 128, 64, torch.bfloat16, qd.DecConfig(4, 4, 2), 3),
    (8, 256, 64, 32, torch.bfloat16, qd.DecConfig(1, 2, 2), None),
]


@pytest.mark.parametrize("m,k,n,g,dtype,cfg,splits", CASES)
def test_thread_model_matches_reference(m, k, n, g, dtype, cfg, splits):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    qw = random_quantized(k, n, g, dtype, "cpu", gen)
    packed = get_layout("quick_sm90").pack(qw)
    x = (torch.randn(m, k, generator=gen) * 0.5).to(dtype)
    gg = k if g == -1 else g
    p = qd.plan(m, n, k, gg, 132, cfg, splits)
    got = emulate(x, packed, gg, cfg, p)
    assert torch.isfinite(got).all(), "an output element was never written"
    err = rel_error(got, reference_matmul(x, qw))
    assert err < REL_BOUND[dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_trick_is_exact_for_every_code_and_zero(dtype):
    """(MAGIC | q) - (MAGIC + z) and (MAGIC | 16q) / 16 - (MAGIC/16 + z) give q - z exactly, all q, z in 0..15."""
    q = torch.arange(16).repeat_interleave(16)
    z = torch.arange(16).repeat(16).to(dtype)
    for p in range(4):
        for h in range(2):
            w = q << (4 * (p + 4 * h))  # the code alone at nibble p + 4h of the word
            a = _dequant_a(w.to(torch.int64), z, z, dtype)
            assert torch.equal(a[p][h].double(), (q - z.long()).double()), (p, h)


def test_plan_splits_fit_and_cover():
    for m in (1, 8, 9, 16):
        for k, n in ((8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (128, 64)):
            p = qd.plan(m, n, k, 128, 132)
            nk = k // 64
            assert p.splits * p.steps_per_split >= nk > (p.splits - 1) * p.steps_per_split  # no empty split
            assert p.smem <= qd.SMEM_LIMIT
            assert p.n_tiles * 16 * p.config.rb == n


def test_plan_refuses_what_the_kernel_cannot_take():
    with pytest.raises(qd.DecError, match="1 <= M <= 16"):
        qd.plan(17, 4096, 4096, 128, 132)
    with pytest.raises(qd.DecError, match="multiple of 128"):
        qd.plan(1, 192, 4096, 128, 132, qd.DecConfig(8, 8, 3))


def test_gemv_sm90_validates_before_touching_the_gpu():
    qw = random_quantized(128, 64, 128)
    p = get_layout("quick_sm90").pack(qw)
    x = torch.randn(1, 128, dtype=torch.float16)
    with pytest.raises(qd.DecError, match="CUDA"):
        qd.gemv_sm90(x, p["qweight"], p["scales"], p["zeros"], 128)
    with pytest.raises(qd.DecError, match="float16 or bfloat16"):
        qd.gemv_sm90(x.float(), p["qweight"], p["scales"], p["zeros"], 128)
