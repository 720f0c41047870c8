"""CPU-side checks of the sm_90 kernel: its indexing emulated thread by thread, launch planning, validation,
the op's fake implementation, and (where nvcc exists) that variants assemble with wgmma and no spills."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from quick.formats.layouts import get_layout
from quick.kernels import jit, ops
from quick.kernels import wgmma as sm
from quick.testing import random_quantized, rel_error

MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}


def _emulate_a_operand(packed: dict, k: int, n: int, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild W^T [N, K] exactly as the kernel's consumer threads do: the same word addresses, scale slots,
    magic-number dequantization in the 16-bit type, and A-register -> (row, k) placement of wgmma."""
    qw = packed["qweight"].reshape(-1)  # int32 words, row stride 8N per k64 step
    sc = packed["scales"].reshape(-1)
    zr = packed["zeros"].reshape(-1)
    a_full = torch.full((n, k), float("nan"), dtype=torch.float64)
    lane = torch.arange(32)
    for nb in range(0, n, 64):  # one consumer warpgroup
        for warp in range(4):
            col = nb + 16 * warp + 2 * (lane // 4)  # scale slot of (row lane/4, row lane/4 + 8)
            for step in range(k // 64):
                # uint4 index: step * 2N + (nb/16 + warp) * 32 + lane  ->  words 4x that
                base = 4 * (step * 2 * n + (nb // 16 + warp) * 32 + lane)
                words = torch.stack([qw[base + w] for w in range(4)], dim=1)  # [32 lanes, 4 words]
                for w in range(4):
                    grp = (64 * step + 16 * w) // g
                    s_pair = torch.stack([sc[grp * n + col], sc[grp * n + col + 1]], 1)  # low = row, high = row+8
                    z_pair = torch.stack([zr[grp * n + col], zr[grp * n + col + 1]], 1)
                    for i in range(4):  # a-register i = nibble pair (i, i + 4)
                        half_sel = i % 2
                        s = s_pair[:, half_sel].to(dtype)
                        zm = (z_pair[:, half_sel].to(dtype) + MAGIC[dtype]).to(dtype)
                        for h in range(2):
                            nib = (words[:, w] >> (4 * (i + 4 * h))) & 0xF
                            v = (nib.to(dtype) + MAGIC[dtype]).to(dtype)  # exact: (magic | q)
                            val = ((v - zm).to(dtype) * s).to(dtype)
                            row = nb + 16 * warp + lane // 4 + 8 * (i % 2)
                            kk = 64 * step + 16 * w + 2 * (lane % 4) + 8 * (i // 2) + h
                            assert torch.isnan(a_full[row, kk]).all(), "two threads fill one element"
                            a_full[row, kk] = val.to(torch.float64)
    return a_full


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n,g", [(128, 64, 32), (192, 128, 64), (256, 192, 128), (128, 64, -1)])
def test_emulated_register_operand_equals_dequantized_weight(k, n, g, dtype):
    gen = torch.Generator().manual_seed(k * n + (g if g > 0 else 7))
    qw = random_quantized(k, n, g, dtype, "cpu", gen)
    packed = get_layout("quick_sm90").pack(qw)
    gg = k if g == -1 else g
    a = _emulate_a_operand(packed, k, n, gg, dtype)
    assert not torch.isnan(a).any(), "some weight never reached a register"
    # The kernel rounds (q - z) * s once to the 16-bit type: compare exactly with that rounding.
    want = qw.dequantize(torch.float64).to(dtype).to(torch.float64).t()
    assert torch.equal(a, want)


@pytest.mark.parametrize("nt", sm.TOKEN_TILES)
def test_accumulator_fragment_covers_tile_once(nt):
    """acc[4j + 2v1 + v0] of thread (warp, lane) -> (channel 16w + lane/4 + 8v1, token 8j + 2(lane%4) + v0):
    every (channel, token) of the 64 x nt tile exactly once, and workspace slots are a bijection too."""
    seen = torch.zeros(64, nt, dtype=torch.int64)
    slots = set()
    for tid in range(128):
        warp, lane = divmod(tid, 32)
        for i in range(nt // 2):
            j, v1, v0 = i // 4, (i // 2) % 2, i % 2
            seen[16 * warp + lane // 4 + 8 * v1, 8 * j + 2 * (lane % 4) + v0] += 1
            slots.add(((i // 4) * 128 + tid) * 4 + i % 4)
    assert torch.equal(seen, torch.ones_like(seen))
    assert slots == set(range(64 * nt))


def test_choose_splits_fills_the_chip():
    # K = N = 8192, two warpgroups: 64 channel tiles, 128 k64 steps on 132 SMs -> 2 splits, 128 CTAs busy.
    assert sm.choose_splits(64, 128, 132) == 2
    # Many tiles (prefill): no split-k.
    assert sm.choose_splits(1024, 128, 132) == 1
    # Fewer tiles than SMs get split further.
    assert sm.choose_splits(32, 172, 132) >= 4


def test_tuned_round_policy_reproduces_measured_splits():
    """The best measured splits (132 SMs, docs/kernels.md): at K = N = 8192
    4 for the 4-warpgroup 8-token tile, 2 for 16..256 tokens, 1 beyond; at 4096^2, 8 and 4."""
    want = {1: 4, 16: 2, 32: 2, 64: 2, 128: 2, 256: 2, 1024: 1, 4096: 1}
    for m, splits in want.items():
        cfg, rounds = sm.tuned_config(m, torch.float16)
        assert sm.plan(m, 8192, 8192, 132, cfg, None, 128, rounds).splits == splits, m
    for m, splits in {1: 8, 16: 4, 64: 4}.items():
        cfg, rounds = sm.tuned_config(m, torch.float16)
        assert sm.plan(m, 4096, 4096, 132, cfg, None, 128, rounds).splits == splits, m
    # the round policy never leaves a unit with fewer than 8 k64 steps (pipeline fill) unless K is shorter
    assert sm.choose_splits(1, 64, 132, rounds=2) == 8


def test_tuned_configs_are_compiled_variants():
    defines = [d for _, _, d in sm.VARIANTS]
    for key in ("fp16", "bf16"):
        dt = torch.float16 if key == "fp16" else torch.bfloat16
        for _, cfg, _ in sm.TUNED[key]:
            assert cfg.defines(128, dt) in defines, cfg


@pytest.mark.parametrize("m", [1, 3, 16, 33, 100, 128, 255, 256, 1000, 4096])
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 11008), (192, 320), (64, 64), (5120, 13824)])
def test_plan_covers_every_k_step(m, k, n):
    p = sm.plan(m, n, k, 132)
    nk = k // 64
    covered = []
    for s in range(p.splits):
        lo = s * p.steps_per_split
        hi = min(nk, lo + p.steps_per_split)
        assert hi > lo, "empty split"
        covered += list(range(lo, hi))
    assert covered == list(range(nk))
    assert p.n_tiles * 64 * p.config.nwg >= n and p.m_tiles * p.config.nt >= m
    assert 1 <= p.grid <= 132 and p.grid <= p.units
    assert p.config.smem_bytes() <= sm.SMEM_LIMIT


def test_all_variants_fit_shared_memory():
    for m in (1, 8, 16, 32, 64, 128, 256):
        assert sm.default_config(m).smem_bytes() <= sm.SMEM_LIMIT
    for _, _, d in sm.VARIANTS:
        cfg = sm.Sm90Config(d["QS_NT"], d["QS_NWG"], d["QS_STAGES"], d["QS_PREF"], d["QS_PREF"])
        assert cfg.smem_bytes() <= sm.SMEM_LIMIT


def _tensors(m=4, k=128, n=64, g=64, dtype=torch.float16):
    qw = random_quantized(k, n, g, dtype, "cpu", torch.Generator().manual_seed(0))
    p = get_layout("quick_sm90").pack(qw)
    return torch.randn(m, k).to(dtype), p["qweight"], p["scales"], p["zeros"]


def test_validate_accepts_packed_layout():
    x, q, s, z = _tensors()
    assert sm.validate(x, q, s, z, 64) == (4, 64, 128, 64)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, q, s, z: (x.float(), q, s, z), "float16 or bfloat16"),
        (lambda x, q, s, z: (x[:, :96].contiguous(), q, s, z), "multiples of 64|shape"),
        (lambda x, q, s, z: (x, q[:, :-8], s, z), "qweight has shape"),
        (lambda x, q, s, z: (x, q.float(), s, z), "int32"),
        (lambda x, q, s, z: (x, q, s.to(torch.bfloat16), z), "dtype"),
        (lambda x, q, s, z: (x, q, s, z[:1]), "zeros has shape"),
        (lambda x, q, s, z: (x[None], q, s, z), "2-D"),
    ],
)
def test_validate_rejects(mutate, match):
    with pytest.raises(sm.Sm90Error, match=match):
        sm.validate(*mutate(*_tensors()), 64)


def test_validate_rejects_group_size_and_bias():
    x, q, s, z = _tensors(g=64)
    with pytest.raises(sm.Sm90Error):
        sm.validate(x, q, s, z, 48)
    with pytest.raises(sm.Sm90Error, match="bias"):
        sm.validate(x, q, s, z, 64, torch.zeros(63, dtype=torch.float16))


def test_cpu_tensors_are_refused_with_a_clear_error():
    x, q, s, z = _tensors()
    with pytest.raises(sm.Sm90Error, match="CUDA"):
        sm.gemm_w4a16_sm90(x, q, s, z, 64)


def test_fake_impl_gives_output_shape():
    x, q, s, z = (t.to("meta") for t in _tensors(m=5))
    out = torch.ops.quick.gemm_w4a16_sm90(x, q, s, z, None, 64)
    assert out.shape == (5, 64) and out.dtype == torch.float16 and out.device.type == "meta"


def test_dispatcher_registration_follows_device_verification():
    """Offered to the dispatcher for layout quick_sm90 only once it has passed the device matrix."""
    from quick.kernels import dispatch

    names = [e.name for e in dispatch.registered("quick_sm90")]
    assert "quick_sm90" in names  # offered always: its availability check decides per input


def test_dispatch_entry_falls_back_for_unsupported_n():
    """The layout admits N % 16 == 0; the kernel needs N % 64 == 0: the entry must still compute x @ W."""
    qw = random_quantized(128, 48, 64, torch.float16, "cpu", torch.Generator().manual_seed(3))
    packed = get_layout("quick_sm90").pack(qw)
    x = torch.randn(3, 128).half()
    out = ops.linear_fn_sm90(x, packed, 64)
    ref = x.double() @ qw.dequantize(torch.float64)
    assert out.shape == (3, 48) and rel_error(out, ref) < 2e-3


@pytest.mark.skipif(shutil.which("nvcc") is None and not jit.os.environ.get("QUICK_NVCC"), reason="no nvcc")
@pytest.mark.parametrize(
    "nt,g,dtype",
    [(8, 128, torch.float16), (64, 32, torch.bfloat16), (256, 128, torch.float16), (128, 32, torch.float16)],
)
def test_variant_assembles_with_wgmma_and_no_spills(nt, g, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("QUICK_CACHE_DIR", str(tmp_path))
    res = jit.compile_cubin(sm.SOURCE, "sm_90a", sm.default_config(nt, g).defines(g, dtype))
    assert res.spills == 0, res.log
    assert re.search(r"Used \d+ registers", res.log)
    assert "serialized" not in res.log, res.log  # ptxas C7512: wgmma pipeline broken
    defs = [f"-D{k}={v}" for k, v in sm.default_config(nt, g).defines(g, dtype).items()]
    ptx = tmp_path / "k.ptx"
    cmd = [jit.find_nvcc(), "-ptx", "-std=c++17", "-gencode=arch=compute_90a,code=compute_90a", *defs, "-o", str(ptx)]
    subprocess.run([*cmd, str(jit.CSRC / sm.SOURCE)], check=True, capture_output=True)
    text = ptx.read_text()
    assert text.count("wgmma.mma_async") >= 4 and "cp.async.bulk.tensor.2d" in text
    # weights: 16-byte loads straight to registers (read-only path, or relaxed.gpu for pipeline 2)
    relaxed = sm.default_config(nt, g).pipe == 2
    want = "ld.relaxed.gpu.global.v4.u32" if relaxed else "ld.global.nc.L1::no_allocate.v4.u32"
    assert want in text


def test_tensor_maps_ask_the_driver_for_the_operand_layout(monkeypatch):
    """Both Hopper kernels' activation maps, with the driver call captured: 2-D, K innermost, byte row strides,
    boxes of 128 bytes of k x nt tokens, 128-byte swizzle, 256-byte L2 promotion, zero fill; misaligned views are
    refused before the driver is asked."""
    from quick.kernels import w4a8_wgmma as w8

    calls = []

    class FakeDriver:
        def cuTensorMapEncodeTiled(self, desc, dtype, rank, ptr, dims, strides, box, elem, il, sw, l2, oob):  # noqa: N802
            calls.append((dtype, rank, list(dims), list(strides), list(box), list(elem), il, sw, l2, oob))
            return 0

    monkeypatch.setattr(jit, "_driver", lambda: FakeDriver())
    x = torch.zeros(5, 320, dtype=torch.float16)
    sm.encode_x_map(x, 16)
    xq = torch.zeros(7, 384, dtype=torch.int8)
    w8.encode_xq_map(xq, 64)
    assert calls == [
        (1, 2, [320, 5], [640], [64, 16], [1, 1], 0, 3, 3, 0),  # uint16, 64 k x 16 tokens
        (0, 2, [384, 7], [384], [128, 64], [1, 1], 0, 3, 3, 0),  # uint8, 128 k x 64 tokens
    ]
    with pytest.raises(sm.Sm90Error, match="row stride"):
        sm.encode_x_map(torch.zeros(5, 324, dtype=torch.float16)[:, :320], 16)
    with pytest.raises(w8.W4A8Sm90Error, match="row stride"):
        w8.encode_xq_map(torch.zeros(7, 392, dtype=torch.int8)[:, :384], 64)
    assert len(calls) == 2
