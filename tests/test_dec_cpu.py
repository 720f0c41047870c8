"""CPU-side checks of the decode kernel (``csrc/quick_dec.cu``): a thread-level model of the kernel (the same
work split, byte addresses, magic-number dequantization in the 16-bit type, ldmatrix and mma fragment semantics,
fp32 scale fold, k-slice reduction and split-k sum) must reproduce the float64 reference; launch planning;
and validation. (tests/test_compile.py assembles every variant, with no spills allowed.)"""

from __future__ import annotations

import pytest
import torch
from helpers import check_fusion_switch

from quick.formats.layouts import get_layout
from quick.kernels import decode as qd
from quick.kernels import ops
from quick.kernels import wgmma as sm
from quick.testing import REL_BOUND, random_quantized, reference_matmul, rel_error

MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


def _halves(u32: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed 16-bit pair (int64 holding 32 bits) -> (low, high) as ``dtype`` values."""
    lo = (u32 & 0xFFFF).to(torch.int32).to(torch.int16)
    hi = ((u32 >> 16) & 0xFFFF).to(torch.int32).to(torch.int16)
    return lo.view(dtype), hi.view(dtype)


def _lop3(w: torch.Tensor, mask: int, magic: int) -> torch.Tensor:
    return (w & mask) | (magic | (magic << 16))


def _dequant(w: torch.Tensor, zs: list, dtype: torch.dtype) -> list:
    """dequant_a / dequant_b of the kernel for one word per lane: pair p (nibbles p, p + 4) minus the zero point
    zs[p], as 4 registers x (low, high), every step rounded to ``dtype`` as the packed 16-bit instructions do. fp16
    takes pairs 1 and 3 with the 0x00f000f0 mask (16 q) and subtracts 64 + z after a multiply by 1/16."""
    m = MAGIC[dtype]
    magic_v = _halves(torch.tensor([m | (m << 16)]), dtype)[0]
    if dtype == torch.float16:
        t = w >> 8
        pairs = [_lop3(w, 0x000F000F, m), _lop3(w, 0x00F000F0, m), _lop3(t, 0x000F000F, m), _lop3(t, 0x00F000F0, m)]
        scale = [1.0, 1.0 / 16, 1.0, 1.0 / 16]
        offset = [magic_v, 64, magic_v, 64]
    else:
        pairs = [_lop3(w >> (4 * p), 0x000F000F, m) for p in range(4)]
        scale = [1.0] * 4
        offset = [magic_v] * 4
    out = []
    for p in range(4):
        z = (-(zs[p] + offset[p])).to(dtype)  # neg_magic_zero / the -(64 + z) constant, exact
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


class _XSlice:
    """x of a split in shared memory, as one warp may read it: with one warp group (NW = 1) a warp copies only the
    columns of its own k-slice (kernel: no CTA barrier before the loop), so a read outside them is an error."""

    def __init__(self, x: torch.Tensor, lo: int, hi: int) -> None:
        self.x, self.lo, self.hi = x, lo, hi

    def __getitem__(self, idx):
        rows, cols = idx
        assert int(cols.min()) >= self.lo and int(cols.max()) < self.hi, "x read outside the columns this warp copied"
        return self.x[rows, cols]


def _xread(xs: _XSlice, rows: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xs[rows, col], xs[rows, col + 1]


def _step_b(acc, xs, words, sc, zr, s, kloc, nb0, n, m, gps, gshift, dtype) -> None:
    """One k64 step of a warp for the ``quick`` layout (weight = B operand), all RB n64 blocks."""
    lane = torch.arange(32)
    g_, c_ = lane // 4, lane % 4
    for rb in range(acc.shape[0]):
        for gi in range(gps):
            row = 2 * s + gi if gps == 2 else s >> gshift
            base = row * n + (nb0 + rb) * 64
            zt = [zr[base + 8 * g_ + t] for t in range(8)]  # zero of column lane/4 of tile t (slot 8 (lane/4) + t)
            sa = [sc[base + 16 * c_ + t].double() for t in range(8)]  # scale of column 2c of tile t
            sb = [sc[base + 16 * c_ + 8 + t].double() for t in range(8)]  # ... of column 2c + 1
            part = torch.zeros(8, 32, 4, dtype=torch.float64)
            for j in range(4 // gps):
                kk = gi * (4 // gps) + j
                # ldmatrix.x4 of x as the m16 x k16 A operand: matrix r from provider lanes 8r .. 8r + 7
                a = []
                for r in range(4):
                    prov = 8 * r + g_
                    t = 8 * ((prov >> 3) & 1) + (prov & 7)
                    col = 8 * (prov >> 4) + kloc + 16 * kk + 2 * c_
                    tt = t.clamp(max=m - 1)  # rows >= M re-read row M - 1; their outputs are dropped
                    a.append(_xread(xs, tt, col))
                base_w = ((4 * s + kk) * (2 * n) + (nb0 + rb) * 128) + lane * 4
                for w in range(4):
                    b = _dequant(words[base_w + w], [zt[2 * w], zt[2 * w], zt[2 * w + 1], zt[2 * w + 1]], dtype)
                    part[2 * w] += _mma(a, b[0:2])
                    part[2 * w + 1] += _mma(a, b[2:4])
            for t in range(8):
                acc[rb, t, 0] += sa[t] * part[t, :, 0]
                acc[rb, t, 1] += sb[t] * part[t, :, 1]
                if m > 8:
                    acc[rb, t, 2] += sa[t] * part[t, :, 2]
                    acc[rb, t, 3] += sb[t] * part[t, :, 3]


def emulate(x, packed, g, cfg: qd.DecConfig, p: qd.DecPlan, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel, CTA by CTA and warp by warp, with lanes vectorized."""
    m, k = x.shape
    n = packed["scales"].shape[1]
    dtype = x.dtype
    rb_n, warps, nw = cfg.rb, cfg.warps, cfg.nw
    nt_n = 8 if cfg.wb else qd.token_tiles(m)  # accumulator tiles per block
    gps = 2 if g == 32 else 1
    gshift = sm.group_shift(g, k)
    words = packed["qweight"].reshape(-1).to(torch.int64) & 0xFFFFFFFF
    sc = packed["scales"].reshape(-1)
    zr = packed["zeros"].reshape(-1)
    lane = torch.arange(32)
    out = torch.full((m, n), float("nan"), dtype=torch.float64)
    ws = torch.zeros(p.splits, m, n, dtype=torch.float64)
    for bx in range(p.n_tiles):
        nb0 = bx * rb_n * nw
        for by in range(p.splits):
            s_beg = by * p.steps_per_split
            s_end = min(s_beg + p.steps_per_split, k // 64)
            nsteps = s_end - s_beg
            per_warp = -(-nsteps // warps)
            # x of the split in "shared memory": rows < M, the zero line for the others
            x_split = x[:, s_beg * 64 : s_end * 64]
            red = torch.zeros(warps, nw * rb_n, nt_n, 4, 32, dtype=torch.float64)
            for warp in range(warps * nw):
                kslice, nsl = warp % warps, warp // warps
                nbw = nb0 + nsl * rb_n  # the warp's first channel block
                w_beg = s_beg + kslice * per_warp
                w_n = max(0, min(per_warp, s_end - w_beg))
                lo = (w_beg - s_beg) * 64 if nw == 1 else 0
                xs = _XSlice(x_split, lo, lo + w_n * 64 if nw == 1 else nsteps * 64)
                acc = torch.zeros(rb_n, nt_n, 4, 32, dtype=torch.float64)
                for i in range(w_n):
                    s = w_beg + i
                    kloc = (w_beg - s_beg + i) * 64
                    if cfg.wb:
                        _step_b(acc, xs, words, sc, zr, s, kloc, nbw, n, m, gps, gshift, dtype)
                        continue
                    # ldmatrix.x4: provider lane q gives row (q & 7) of matrix q >> 3; receiver l gets row l / 4,
                    # elements 2 (l % 4) + {0, 1} of matrix j -> b[2h + j / 2][nt][j % 2]
                    b = [[[None, None] for _ in range(nt_n)] for _ in range(4)]
                    for nt in range(nt_n):
                        for h in range(2):
                            for j in range(4):
                                prov = 8 * j + lane // 4
                                t = 8 * nt + (prov & 7)
                                col = (prov >> 3) * 8 + kloc + 32 * h + 2 * (lane % 4)
                                tt = t.clamp(max=m - 1)  # rows >= M re-read row M - 1 (outputs dropped)
                                b[2 * h + j // 2][nt][j % 2] = _xread(xs, tt, col)
                    for rb in range(rb_n):
                        base = (s * (n // 16) + nbw + rb) * 128 + lane * 4  # int32 index of the lane's chunk
                        for gi in range(gps):
                            row = 2 * s + gi if gps == 2 else s >> gshift
                            slot = row * n + (nbw + rb) * 16 + 2 * (lane // 4)
                            s_lo, s_hi = sc[slot], sc[slot + 1]
                            z_lo, z_hi = zr[slot], zr[slot + 1]
                            part = torch.zeros(nt_n, 32, 4, dtype=torch.float64)
                            for jw in range(4 // gps):
                                w = gi * (4 // gps) + jw
                                a = _dequant(words[base + w], [z_lo, z_hi, z_lo, z_hi], dtype)
                                for nt in range(nt_n):
                                    part[nt] += _mma(a, b[w][nt])
                            for nt in range(nt_n):
                                acc[rb, nt, 0] += s_lo.double() * part[nt, :, 0]
                                acc[rb, nt, 1] += s_lo.double() * part[nt, :, 1]
                                acc[rb, nt, 2] += s_hi.double() * part[nt, :, 2]
                                acc[rb, nt, 3] += s_hi.double() * part[nt, :, 3]
                red[kslice, nsl * rb_n : (nsl + 1) * rb_n] = acc
            flat = red.reshape(warps, -1)
            ch = 64 if cfg.wb else 16
            for idx in range(flat.shape[1]):  # the kernel's reduction loop and its (token, channel) decode
                l, e, nt, rb = idx & 31, (idx >> 5) & 3, (idx >> 7) % nt_n, idx // (128 * nt_n)
                row, col = (l >> 2) + 8 * (e >> 1), 2 * (l & 3) + (e & 1)
                token = row if cfg.wb else 8 * nt + col
                chan = (nb0 + rb) * ch + (8 * nt + col if cfg.wb else row)
                if token >= m:
                    continue
                v = flat[:, idx].sum()
                if p.splits > 1:
                    ws[by, token, chan] = v
                else:
                    out[token, chan] = v + (bias[chan].double() if bias is not None else 0.0)  # no split: here
        if p.splits > 1:
            c0, c1 = nb0 * (64 if cfg.wb else 16), (nb0 + nw * rb_n) * (64 if cfg.wb else 16)
            out[:, c0:c1] = ws[:, :, c0:c1].sum(0) + (bias[c0:c1].double() if bias is not None else 0.0)
    return out.to(dtype)


CASES = [
    # m, k, n, g, dtype, cfg, splits
    (1, 256, 128, 128, torch.float16, qd.DecConfig(4, 2, 2), None),
    (3, 256, 64, 32, torch.float16, qd.DecConfig(4, 2, 2), 2),
    (9, 192, 64, 64, torch.bfloat16, qd.DecConfig(2, 2, 2), None),
    (16, 256, 128, -1, torch.float16, qd.DecConfig(2, 3, 2), 2),
    (5, 320, 128, 64, torch.bfloat16, qd.DecConfig(4, 4, 2), 3),
    (8, 256, 64, 32, torch.bfloat16, qd.DecConfig(1, 2, 2), None),
    # M up to 64 (4 and 8 token tiles), warp groups side by side over channels
    (17, 256, 128, 128, torch.float16, qd.DecConfig(2, 2, 2, nw=2), None),
    (32, 320, 128, 64, torch.bfloat16, qd.DecConfig(1, 2, 2, nw=4), 2),
    (40, 256, 192, 32, torch.float16, qd.DecConfig(2, 1, 2, nw=3), 2),
    (64, 192, 64, 64, torch.bfloat16, qd.DecConfig(2, 1, 2, nw=2), None),
    (61, 256, 128, -1, torch.float16, qd.DecConfig(1, 3, 2, nw=2), None),
]


CASES_B = [
    (1, 256, 128, 128, torch.float16, qd.DecConfig(1, 2, 2, wb=1), None),
    (12, 256, 64, 32, torch.float16, qd.DecConfig(1, 2, 2, wb=1), 2),
    (5, 192, 128, 64, torch.bfloat16, qd.DecConfig(2, 2, 2, wb=1), None),
    (16, 128, 64, -1, torch.bfloat16, qd.DecConfig(1, 3, 2, wb=1), None),
    (7, 256, 256, 128, torch.float16, qd.DecConfig(1, 2, 2, wb=1, nw=2), 2),
]


@pytest.mark.parametrize("m,k,n,g,dtype,cfg,splits", CASES + CASES_B)
def test_thread_model_matches_reference(m, k, n, g, dtype, cfg, splits):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    qw = random_quantized(k, n, g, dtype, "cpu", gen)
    packed = get_layout(qd.LAYOUTS[cfg.wb]).pack(qw)
    x = (torch.randn(m, k, generator=gen) * 0.5).to(dtype)
    gg = k if g == -1 else g
    p = qd.plan(m, n, k, gg, 132, cfg, splits)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype) if m % 2 else None  # the kernel adds it where it writes
    got = emulate(x, packed, gg, cfg, p, bias)
    assert torch.isfinite(got).all(), "an output element was never written"
    err = rel_error(got, reference_matmul(x, qw, bias))
    assert err < REL_BOUND[dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_trick_is_exact_for_every_code_and_zero(dtype):
    """(MAGIC | q) - (MAGIC + z) and (MAGIC | 16q) / 16 - (MAGIC/16 + z) give q - z exactly, all q, z in 0..15."""
    q = torch.arange(16).repeat_interleave(16)
    z = torch.arange(16).repeat(16).to(dtype)
    for p in range(4):
        for h in range(2):
            w = q << (4 * (p + 4 * h))  # the code alone at nibble p + 4h of the word
            a = _dequant(w.to(torch.int64), [z] * 4, dtype)
            assert torch.equal(a[p][h].double(), (q - z.long()).double()), (p, h)


def test_plan_splits_fit_and_cover():
    for m in (1, 8, 9, 16, 17, 32, 33, 64):
        for k, n in ((8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (4096, 11008), (128, 256)):
            cfg = qd.default_config("quick_sm90", m)
            if n % cfg.channels:
                continue
            p = qd.plan(m, n, k, 128, 132)
            assert p.config == cfg
            nk = k // 64
            assert p.splits * p.steps_per_split >= nk > (p.splits - 1) * p.steps_per_split  # no empty split
            assert p.smem <= qd.SMEM_LIMIT
            assert p.smem >= cfg.ring_bytes(128) + m * p.steps_per_split * 128  # x of the split fits beside the ring
            assert p.n_tiles * cfg.channels == n


def test_plan_fits_the_device_shared_memory(monkeypatch):
    """sm_80 (163 KB) and sm_86/89 (99 KB) allow less shared memory per block than sm_90: more splits, never more."""
    import types

    for optin, major in ((163 * 1024, 8), (99 * 1024, 8), (227 * 1024, 9), (0, 9)):
        props = types.SimpleNamespace(shared_memory_per_block_optin=optin, major=major)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx, p=props: p)
        limit = qd._smem(0)
        assert limit <= (optin or 227 * 1024) - 1024
        for m in (1, 16, 33, 64):
            for k in (4096, 8192, 14336):
                for splits in (None, 1, 5, 17, 1000):
                    p = qd.plan(m, 8192, k, 128, 108, splits=splits, smem_limit=limit)
                    nk = k // 64
                    assert p.smem <= limit
                    assert p.splits * p.steps_per_split >= nk > (p.splits - 1) * p.steps_per_split


def test_default_configs_by_batch():
    assert qd.default_config("quick_sm90", 1).nw == 1
    assert qd.token_tiles(1) == 1 and qd.token_tiles(9) == 2 and qd.token_tiles(17) == 4 and qd.token_tiles(33) == 8
    assert qd.default_config("quick_sm90", 64) is dict(qd.DEFAULTS["quick_sm90"])[64]
    with pytest.raises(qd.DecError, match="M <= 16"):
        qd.default_config("quick", 17)
    # every (bucket, config) builds for sm_80/sm_90a in the compile check: the registry holds its token-tile count
    for top, cfg in qd.all_configs():
        assert any(v[2].get("QD_NT") == qd.token_tiles(top, cfg.wb) and v[2]["QD_RB"] == cfg.rb for v in qd.VARIANTS)


def test_plan_refuses_what_the_kernel_cannot_take():
    with pytest.raises(qd.DecError, match="1 <= M <= 64"):
        qd.plan(65, 4096, 4096, 128, 132)
    with pytest.raises(qd.DecError, match="1 <= M <= 16"):
        qd.plan(17, 4096, 4096, 128, 132, qd.DecConfig(1, 8, 4, wb=1))
    with pytest.raises(qd.DecError, match="multiple of 128"):
        qd.plan(1, 192, 4096, 128, 132, qd.DecConfig(8, 8, 3))
    with pytest.raises(qd.DecError, match="multiple of 256"):
        qd.plan(64, 4096 + 128, 4096, 128, 132)


def test_gemv_sm90_validates_before_touching_the_gpu():
    qw = random_quantized(128, 64, 128)
    p = get_layout("quick_sm90").pack(qw)
    x = torch.randn(1, 128, dtype=torch.float16)
    with pytest.raises(qd.DecError, match="CUDA"):
        qd.gemv_sm90(x, p["qweight"], p["scales"], p["zeros"], 128)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        qd.gemv_sm90(x.float(), p["qweight"], p["scales"], p["zeros"], 128)
    pq = get_layout("quick").pack(qw)
    with pytest.raises(qd.DecError, match="CUDA"):
        qd.gemv_quick(x, pq["qweight"], pq["scales"], pq["zeros"], 128)
    with pytest.raises(qd.DecError, match="layouts"):
        qd.gemv("awq_gemm", x, pq["qweight"], pq["scales"], pq["zeros"], 128)


def _random_cases(count: int, seed: int = 20261204):
    """Random (config, M, K, N, group, dtype, splits) combinations over every default and candidate config: the
    configs' real RB / NW / k-slice counts at small shapes, so every warp-to-block and k-slice mapping is exercised."""
    import random

    rng = random.Random(seed)
    configs = qd.all_configs()
    out = []
    for i in range(count):
        top, cfg = configs[i % len(configs)]
        lo = 1 if top == 16 else top // 2 + 1
        m = rng.randint(lo, top)
        g = rng.choice([g for g in (32, 64, 128, -1) if cfg.supports(g if g > 0 else 128)])
        n = cfg.channels * rng.randint(1, 2)
        k = 128 * rng.randint(1, 3) if g != 32 else 64 * rng.randint(2, 5)
        dtype = rng.choice([torch.float16, torch.bfloat16])
        splits = rng.choice([None, 1, 2, 3])
        out.append((m, k, n, g, dtype, cfg, splits))
    return out


@pytest.mark.parametrize("m,k,n,g,dtype,cfg,splits", _random_cases(len(qd.all_configs())), ids=str)
def test_thread_model_random_configs(m, k, n, g, dtype, cfg, splits):
    test_thread_model_matches_reference(m, k, n, g, dtype, cfg, splits)


# ---- QD_ACT: x = act(gate) * up staged from a [M, 2K] gate/up product


def _stage_act(gu: torch.Tensor, cfg: qd.DecConfig, p: qd.DecPlan, by: int, act: str) -> torch.Tensor:
    """The kernel's QD_ACT staging of split ``by``, lane by lane: each (warp, lane) walks idx = lane, lane + 32, ...
    (NW = 1: its own k-slice's chunks; NW > 1: the CTA's threads over the whole range) and writes chunk c of row r
    from the gate at ``r * 2K + s_beg * 64 + 8c`` and the up ``K`` further. NaN where nothing was staged."""
    m, k2 = gu.shape
    k = k2 // 2
    s_beg = by * p.steps_per_split
    nsteps = min(s_beg + p.steps_per_split, k // 64) - s_beg
    per_warp = -(-nsteps // cfg.warps)
    xs = torch.full((m, nsteps * 64), float("nan"), dtype=gu.dtype)
    flat = gu.reshape(-1)
    threads = cfg.threads
    for warp in range(cfg.warps * cfg.nw):
        kslice = warp % cfg.warps
        w_beg = s_beg + kslice * per_warp
        w_n = max(0, min(per_warp, s_beg + nsteps - w_beg))
        c0, cn = ((w_beg - s_beg) * 8, w_n * 8) if cfg.nw == 1 else (0, nsteps * 8)
        for lane in range(32):
            t0, step = (lane, 32) if cfg.nw == 1 else (warp * 32 + lane, threads)
            for idx in range(t0, m * cn, step):
                r, c = idx // cn, c0 + idx % cn
                src = r * 2 * k + s_beg * 64 + c * 8
                g, u = flat[src : src + 8].float(), flat[src + k : src + k + 8].float()
                a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
                xs[r, c * 8 : c * 8 + 8] = (a * u).to(gu.dtype)
    return xs


@pytest.mark.parametrize("act", sorted(qd.ACTS))
@pytest.mark.parametrize(
    "m,k,cfg,splits",
    [(1, 2816, qd.DecConfig(2, 16, 4), None), (8, 2816, qd.DecConfig(4, 8, 4), 3), (3, 1024, qd.DecConfig(8, 8, 3), 2)],
)
def test_act_staging_covers_the_split_with_the_gated_product(m, k, cfg, splits, act):
    gen = torch.Generator().manual_seed(m + k)
    gu = (torch.randn(m, 2 * k, generator=gen) * 3).to(torch.bfloat16)
    p = qd.plan(m, 2048, k, 128, 132, cfg, splits)
    want = qd.gated(gu[:, :k].float(), gu[:, k:].float(), act).to(gu.dtype)
    for by in range(p.splits):
        xs = _stage_act(gu, cfg, p, by, act)
        s0 = by * p.steps_per_split * 64
        assert not xs.isnan().any(), "a column of the split was never staged"
        # from the right gate and up (CPU's vectorized and 8-wide tanh may differ in the last bit)
        torch.testing.assert_close(xs, want[:, s0 : s0 + xs.shape[1]], rtol=1e-2, atol=1e-3)


def test_act_variants_configs_and_switch(monkeypatch):
    per_flags = len(qd.ACT_CONFIGS) * len(qd.ACT_GROUP_SIZES) * 2  # configs x group sizes x dtypes
    acts = [v for v in qd.VARIANTS if "QD_ACT" in v[2]]
    norms = [v for v in qd.VARIANTS if "QD_NORM" in v[2]]
    pdls = [v for v in qd.VARIANTS if "QD_PDL" in v[2]]
    assert len(acts) == per_flags * len(qd.ACTS) * 2 * 2  # alone and with the norm tail; with and without PDL
    assert len(norms) == per_flags * (1 + len(qd.ACTS)) * 2  # alone (o) and with each activation (down); PDL or not
    assert len(pdls) == per_flags * (1 + len(qd.FUSED_FLAGS))  # the plain kernel and each fused one
    assert all(d["QD_NT"] == 1 and d["QD_WB"] == 0 and d["QD_G32"] == 0 for _s, _k, d in acts + norms + pdls)
    table_down = qd.DecConfig(2, 16, 4)  # the H200 table's choice for 11008 x 4096 at M = 1
    assert qd.takes_act(table_down, 1, 128) and qd.takes_act(table_down, 8, 128)
    assert not qd.takes_act(table_down, 9, 128) and not qd.takes_act(table_down, 1, 64)
    assert not qd.takes_act(qd.DecConfig(1, 8, 4, wb=1), 1, 128)  # the quick layout: no act variant
    assert qd.DecConfig(4, 8, 4).defines(1, 128, torch.float16, 2)["QD_ACT"] == 2
    assert "QD_ACT" not in qd.DecConfig(4, 8, 4).defines(1, 128, torch.float16)  # plain variants keep their keys
    check_fusion_switch(monkeypatch, "act", qd.act_fusion_enabled)
    check_fusion_switch(monkeypatch, "norm", qd.norm_fusion_enabled)


def test_gated_op_fake_and_errors():
    k, n = 256, 128
    qw = random_quantized(k, n, 128, torch.float16, "cpu", torch.Generator().manual_seed(0))
    p = {name: t.to("meta") for name, t in get_layout("quick_sm90").pack(qw).items()}
    gu = torch.empty(3, 2 * k, dtype=torch.float16, device="meta")
    out = torch.ops.quick.gated_gemm_w4a16_sm90(gu, p["qweight"], p["scales"], p["zeros"], None, 128, "silu")
    assert out.shape == (3, n) and out.device.type == "meta"
    with pytest.raises(sm.Sm90Error, match="gate/up"):
        torch.ops.quick.gated_gemm_w4a16_sm90(gu[:, :-1], p["qweight"], p["scales"], p["zeros"], None, 128, "silu")
    cpu = {name: t for name, t in get_layout("quick_sm90").pack(qw).items()}
    x = torch.zeros(3, 2 * k, dtype=torch.float16)
    with pytest.raises(sm.Sm90Error, match="activation"):
        ops.gated_gemm(x, cpu["qweight"], cpu["scales"], cpu["zeros"], 128, None, "relu")
    with pytest.raises(sm.Sm90Error, match="CUDA"):
        ops.gated_gemm(x, cpu["qweight"], cpu["scales"], cpu["zeros"], 128, None, "silu")
    with pytest.raises(qd.DecError, match="activation"):
        qd.gated(x, x, "relu")


def test_forward_gated_off_the_gpu_is_the_two_steps():
    from quick.nn.linear import QuickLinear

    qw = random_quantized(256, 128, 128, torch.bfloat16, "cpu", torch.Generator().manual_seed(1))
    lin = QuickLinear.from_quantized(qw, layout="quick_sm90")
    gu = torch.randn(2, 5, 512).bfloat16()
    for act in qd.ACTS:
        assert torch.equal(lin.forward_gated(gu, act), lin(qd.gated(gu[..., :256], gu[..., 256:], act)))


# ---- QD_NORM: the residual add + RMSNorm tail


def _norm_tail_model(h, resid, weight, eps, offset, threads):
    """The kernel's tail: the M x N / 8 chunks flat (chunk j of token j // (N / 8)), thread tid taking j = tid,
    tid + threads, ... in order; pass 1 writes r = cast(resid + h) and adds each chunk's fp32 sum of squares into the
    thread's slot of its token; warp t folds token t's slots (lane-strided, then 32 lanes); pass 2 re-reads r."""
    m, n = h.shape
    dt, cpt = h.dtype, n // 8
    r = torch.full((m * n,), float("nan"), dtype=dt)
    normed = torch.full((m * n,), float("nan"), dtype=dt)
    hf, rf = h.reshape(-1), resid.reshape(-1)
    slots = torch.zeros(m, threads, dtype=torch.float32)
    for tid in range(threads):
        for j in range(tid, m * cpt, threads):
            q = (rf[8 * j : 8 * j + 8].float() + hf[8 * j : 8 * j + 8].float()).to(dt)
            r[8 * j : 8 * j + 8] = q
            slots[j // cpt, tid] += (q.float() ** 2).sum()
    lanes = torch.stack([slots[:, i::32].sum(1) for i in range(32)], 1)  # lane-strided partial sums
    inv = torch.rsqrt(lanes.sum(1) / n + eps)
    for tid in range(threads):
        for j in range(tid, m * cpt, threads):
            rr, w = r[8 * j : 8 * j + 8].float(), weight[(j % cpt) * 8 : (j % cpt) * 8 + 8].float()
            if offset == 0.0:
                normed[8 * j : 8 * j + 8] = (w * (rr * inv[j // cpt]).to(dt).float()).to(dt)
            else:
                normed[8 * j : 8 * j + 8] = (rr * inv[j // cpt] * (offset + w)).to(dt)
    return r.view(m, n), normed.view(m, n)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,threads", [(1, 4096, 512), (3, 1024, 256), (8, 2048, 512), (2, 64, 256), (5, 576, 256)])
def test_norm_tail_model_matches_the_torch_norm(m, n, threads, dtype, offset):
    """Every column of every token written once by the tail's loops, and its arithmetic is transformers' RMSNorm
    (decode.rms_norm, which the unfused step runs) up to the order of the fp32 sum."""
    gen = torch.Generator().manual_seed(m * n + threads)
    h, resid = (torch.randn(m, n, generator=gen) * 3).to(dtype), (torch.randn(m, n, generator=gen) * 5).to(dtype)
    weight = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    r, normed = _norm_tail_model(h, resid, weight, 1e-5, offset, threads)
    assert not r.isnan().any() and not normed.isnan().any()
    assert torch.equal(r, resid + h)  # the add in the model dtype, exactly as torch's
    want = qd.rms_norm(resid + h, weight, 1e-5, offset)
    assert rel_error(normed, want.double()) < REL_BOUND[dtype] / 4


def test_norm_op_fake_errors_and_cpu_steps():
    from quick.nn.linear import QuickLinear

    k, n = 256, 128
    qw = random_quantized(k, n, 128, torch.bfloat16, "cpu", torch.Generator().manual_seed(3))
    pk = get_layout("quick_sm90").pack(qw)
    meta = {name: t.to("meta") for name, t in pk.items()}
    x = torch.empty(3, k, dtype=torch.bfloat16, device="meta")
    res, w = torch.empty(3, n, dtype=torch.bfloat16, device="meta"), torch.empty(n, dtype=torch.bfloat16, device="meta")
    normed, r = torch.ops.quick.gemm_add_norm_sm90(x, meta["qweight"], meta["scales"], meta["zeros"], None, 128, res, w,
                                                   1e-6, 0.0, "")  # fmt: skip
    assert normed.shape == r.shape == (3, n) and normed.device.type == "meta"
    xc, rc, wc = torch.zeros(3, k).bfloat16(), torch.zeros(3, n).bfloat16(), torch.ones(n).bfloat16()
    with pytest.raises(sm.Sm90Error, match="residual"):
        ops.gemm_add_norm(xc, pk["qweight"], pk["scales"], pk["zeros"], 128, None, rc[:, :64], wc, 1e-6)
    with pytest.raises(sm.Sm90Error, match="norm weight"):
        ops.gemm_add_norm(xc, pk["qweight"], pk["scales"], pk["zeros"], 128, None, rc, wc.half(), 1e-6)
    with pytest.raises(sm.Sm90Error, match="2K"):
        ops.gemm_add_norm(xc[:, :-1], pk["qweight"], pk["scales"], pk["zeros"], 128, None, rc, wc, 1e-6, 0, "silu")
    with pytest.raises(sm.Sm90Error, match="CUDA"):
        ops.gemm_add_norm(xc, pk["qweight"], pk["scales"], pk["zeros"], 128, None, rc, wc, 1e-6)
    # off the GPU, QuickLinear takes the steps: exactly the add and rms_norm after its own forward
    lin = QuickLinear.from_quantized(qw, layout="quick_sm90")
    gen = torch.Generator().manual_seed(4)
    xs, rs = torch.randn(2, 3, k, generator=gen).bfloat16(), torch.randn(2, 3, n, generator=gen).bfloat16()
    ws = (torch.rand(n, generator=gen) + 0.5).bfloat16()
    got_n, got_r = lin.forward_add_norm(xs, rs, ws, 1e-6, 1.0)
    want_r = rs + lin(xs)
    assert torch.equal(got_r, want_r) and torch.equal(got_n, qd.rms_norm(want_r, ws, 1e-6, 1.0))
    assert not lin.fuses(1, torch.device("cpu"), torch.bfloat16, norm=True)
