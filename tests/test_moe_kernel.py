"""The grouped MoE kernel's host side on CPU: validation errors, launch arithmetic, the selection entry, the op's fake
implementation on meta / fake tensors, the capturable plan, and QuickMoEExperts' choice of path."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import quick.kernels.ops  # noqa: F401  (registers torch.ops.quick.moe_gemm_w4a16)
from quick.kernels import moe as qmoe
from quick.kernels import select
from quick.nn.moe import QuickMoEExperts, build_plan, plan_capacity


def _inputs(e=4, t=3, k=2, kk=256, n=128, g=128, dtype=torch.float16, device="cpu", block=16, gated=False):
    nn = 2 * n if gated else n
    x = torch.zeros(t, kk, dtype=dtype, device=device)
    qw = torch.zeros(e, kk // 16, 2 * nn, dtype=torch.int32, device=device)
    gg = kk if g == -1 else g
    sc = torch.zeros(e, kk // gg, nn, dtype=dtype, device=device)
    cap = plan_capacity(t, k, e, block)
    ids = torch.zeros(cap, dtype=torch.int32, device=device)
    blocks = torch.zeros(cap // block, dtype=torch.int32, device=device)
    npad = torch.zeros(1, dtype=torch.int32, device=device)
    return x, qw, sc, sc.clone(), g, ids, blocks, npad, k


def test_validation_errors_are_clear():
    good = _inputs()
    d = qmoe.validate(*good, need_cuda=False)
    assert (d.m, d.k, d.n, d.e, d.g, d.slots, d.n_out, d.block_size) == (3, 256, 128, 4, 128, 6, 128, 16)
    x, qw, sc, z, g, ids, blocks, npad, k = good
    cases = [
        ((x.float(), qw, sc, z, g, ids, blocks, npad, k), TypeError, "float16 or bfloat16"),
        ((x, qw.long(), sc, z, g, ids, blocks, npad, k), TypeError, "int32"),
        ((x, qw, sc.bfloat16(), z, g, ids, blocks, npad, k), TypeError, "scales must have x's dtype"),
        ((x, qw, sc, z, g, ids.long(), blocks, npad, k), TypeError, "sorted_ids must be a 1-D int32"),
        ((x, qw, sc, z, g, ids, blocks[None], npad, k), TypeError, "block_experts must be a 1-D int32"),
        ((x[:, :128], qw, sc, z, g, ids, blocks, npad, k), qmoe.MoEKernelError, "k16 rows"),
        ((x, qw[0], sc, z, g, ids, blocks, npad, k), qmoe.MoEKernelError, "3-D"),
        ((x, qw, sc[:, :1], z, g, ids, blocks, npad, k), qmoe.MoEKernelError, r"scales must have shape \[4, 2, 128\]"),
        ((x, qw, sc, z, 48, ids, blocks, npad, k), qmoe.MoEKernelError, "unsupported group_size"),
        ((x, qw, sc, z, g, ids[:-1], blocks, npad, k), qmoe.MoEKernelError, "whole number of blocks"),
        ((x, qw, sc, z, g, ids[:40], blocks, npad, k), qmoe.MoEKernelError, "block size 8 has no kernel"),
        ((x, qw, sc, z, g, ids, blocks, npad.repeat(2), k), qmoe.MoEKernelError, "one value"),
        ((x, qw, sc, z, g, ids, blocks, npad, 0), qmoe.MoEKernelError, "positive int"),
        ((x[0], qw, sc, z, g, ids, blocks, npad, k), qmoe.MoEKernelError, "2-D"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            qmoe.validate(*args, need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="act must be one of"):
        qmoe.validate(*good, act="tanh", need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="I a multiple of 64"):
        qmoe.validate(*_inputs(n=192), act="silu", need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="one weight per slot"):
        qmoe.validate(*good, topk_weights=torch.ones(5), need_cuda=False)
    with pytest.raises(TypeError, match="floating-point"):
        qmoe.validate(*good, topk_weights=torch.ones(6, dtype=torch.int32), need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="multiples of 64"):
        qmoe.validate(*_inputs(n=96), need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="runs on CUDA tensors"):
        qmoe.validate(*good)
    with pytest.raises(qmoe.MoEKernelError, match="runs on CUDA tensors"):
        qmoe.grouped_gemm(*good)
    with pytest.raises(ValueError, match="no grouped kernels for layout"):
        select.moe_matmul("w4a8", *good)


def test_host_id_check():
    e, t, k = 4, 3, 2
    plan = build_plan(torch.tensor([[0, 1], [1, 3], [4, 2]]), e, 16, static=True)
    qmoe.check_ids(plan.sorted_ids, plan.block_experts, t * k, e)
    bad = plan.sorted_ids.clone()
    bad[0] = t * k + 1
    with pytest.raises(qmoe.MoEKernelError, match="sorted_ids must lie"):
        qmoe.check_ids(bad, plan.block_experts, t * k, e)
    bad = plan.block_experts.clone()
    bad[-1] = e
    with pytest.raises(qmoe.MoEKernelError, match="block_experts must lie"):
        qmoe.check_ids(plan.sorted_ids, bad, t * k, e)


def test_launch_arithmetic():
    assert qmoe.block_size_for(1, 8, 128) == 16
    assert qmoe.block_size_for(64, 8, 128) == 16
    assert qmoe.block_size_for(1024, 8, 128) == 64
    assert qmoe.block_size_for(16, 2, 8) == 16 and qmoe.block_size_for(256, 2, 8) == 64
    assert qmoe.default_config(16, 2048).name == "m16k8"
    assert qmoe.default_config(16, 768).name == "m16k8"
    assert qmoe.default_config(16, 192).name == "m16k4"
    assert qmoe.default_config(64, 14336).name == "m64"
    with pytest.raises(qmoe.MoEKernelError, match="no grouped-GEMM variant"):
        qmoe.default_config(32, 256)
    for cfg in qmoe.CONFIGS.values():
        assert cfg.smem_bytes <= 48 * 1024  # no opt-in needed on any sm_80+ GPU
        assert cfg.nb % 2 == 0  # the gated epilogue pairs gate and up blocks
    # Qwen3-30B-A3B gate|up at one token: 8 blocks of 16 rows x 12 output tiles of 64 columns (gated)
    d = qmoe.validate(*_inputs(e=128, t=1, k=8, kk=2048, n=768, gated=True), act="silu", need_cuda=False)
    p = qmoe.plan_launch(d, True)
    assert (p.config.name, p.grid, p.gshift) == ("m16k8", (8, 12), 7)
    d = qmoe.validate(*_inputs(e=128, t=8, k=1, kk=768, n=2048), need_cuda=False)  # down: one row per slot
    p = qmoe.plan_launch(d, False)
    assert p.grid == (plan_capacity(8, 1, 128, 16) // 16, 16)
    d = qmoe.validate(*_inputs(kk=256, g=-1), need_cuda=False)
    assert qmoe.plan_launch(d, False).gshift == 30  # one group spans every stage
    d = qmoe.validate(*_inputs(kk=256, g=32), need_cuda=False)
    assert qmoe.plan_launch(d, False, "m16k4").gshift == 5
    with pytest.raises(qmoe.MoEKernelError, match="takes block size 64"):
        qmoe.plan_launch(d, False, "m64")
    with pytest.raises(qmoe.MoEKernelError, match="unknown grouped-GEMM config"):
        qmoe.plan_launch(d, False, "m8")
    gemm = [v for v in qmoe.VARIANTS if v[0] == qmoe.SOURCE]
    assert len(gemm) == 2 * len(qmoe.CONFIGS) * 2
    assert {v[1]["QM_GATED"] for v in gemm} == {0, 1}
    assert sorted(v[1]["QP_IDX64"] for v in qmoe.VARIANTS if v[0] == qmoe.PLAN_SOURCE) == [0, 1]


def test_fake_implementation_shapes():
    args = _inputs(e=8, t=5, k=2, n=128, gated=True, device="meta")
    out = torch.ops.quick.moe_gemm_w4a16(*args, None, "silu")
    assert out.shape == (10, 128) and out.device.type == "meta"
    x, qw, sc, z, g, ids, blocks, npad, _ = _inputs(e=8, t=10, k=1, n=256, device="meta")
    out = torch.ops.quick.moe_gemm_w4a16(x, qw, sc, z, g, ids, blocks, npad, 1, torch.ones(10, device="meta"))
    assert out.shape == (10, 256)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _inputs(t=7, k=4)]
        out = torch.ops.quick.moe_gemm_w4a16(*fake)
        assert out.shape == (28, 128)
    with pytest.raises(qmoe.MoEKernelError, match="scales must have shape"):
        torch.ops.quick.moe_gemm_w4a16(x, qw, sc[:, :1], z, g, ids, blocks, npad, 1)


def test_selection_entry():
    p = select.MoEProblem("quick", 4, 8, 128, 1536, 2048, 128, 16, torch.float16, torch.device("cpu"), "silu")
    assert p.m == 32
    kern = select.MOE_KERNELS["moe_mma"]
    assert kern.why_not(p) == "needs an sm_80+ GPU"
    assert not select.moe_available(p)
    assert select.moe_reasons(p) == [("moe_mma", "needs an sm_80+ GPU")]
    assert [c.config for c in kern.candidates(p, 132)] == ["m16k8", "m16k4"]
    assert kern.model(p).config == "m16k8"
    assert kern.config_from(p, {"name": "m16k4"}) == "m16k4"
    assert kern.config_from(p, {"name": "m64"}) is None  # another row tile than the plan's
    with pytest.raises(ValueError, match="no grouped kernel can run"):
        select.choose_moe(p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unchecked_plan_equals_checked_plan(seed):
    gen = torch.Generator().manual_seed(seed)
    e, t, k = 8, 11, 3
    idx = torch.randint(0, e + 1, (t, k), generator=gen)  # e: dropped slots
    for block in (1, 16, 64):
        a = build_plan(idx, e, block, static=True)
        b = build_plan(idx, e, block, static=True, check=False)
        for name in ("sorted_ids", "block_experts", "offsets", "counts", "num_padded"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    bad = idx.clone()
    bad[0, 0], bad[1, 1] = -3, e + 5  # unchecked: out-of-range ids are dropped, never indexed
    a = build_plan(bad, e, 16, static=True, check=False)
    fixed = bad.clone()
    fixed[0, 0], fixed[1, 1] = e, e
    assert torch.equal(a.sorted_ids, build_plan(fixed, e, 16, static=True).sorted_ids)


def test_experts_module_takes_the_reference_path_on_cpu():
    q = QuickMoEExperts(4, 64, 64, group_size=32)
    x = torch.randn(3, 64)
    assert q.kernel_unavailable(x, 2) == "the grouped kernel runs on CUDA tensors"
    q.backend = "kernel"
    with pytest.raises(RuntimeError, match="no grouped 4-bit MoE kernel.*runs on CUDA tensors"):
        q(x, torch.randint(0, 4, (3, 2)), torch.rand(3, 2))
    p_gu, p_dn = q._problems(x, 2)
    assert (p_gu.tokens, p_gu.top_k, p_gu.n, p_gu.k, p_gu.act) == (3, 2, 128, 64, "silu")
    assert (p_dn.tokens, p_dn.top_k, p_dn.n, p_dn.k, p_dn.act) == (6, 1, 64, 64, "")
    assert p_gu.block_size == p_dn.block_size == 16


def test_static_plan_off_cuda_is_the_pytorch_plan():
    """On CPU (no plan kernel) the static plan is build_plan's, and the op's fake gives the kernel's shapes."""
    from quick.nn.moe import static_plan

    ids = torch.randint(0, 16, (5, 4), generator=torch.Generator().manual_seed(0))
    got, want = static_plan(ids, 16, 16), build_plan(ids, 16, 16, static=True, check=False)
    for f in ("sorted_ids", "block_experts", "offsets", "counts", "num_padded"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    cap = plan_capacity(5, 4, 16, 16)
    with FakeTensorMode():
        out = torch.ops.quick.moe_plan(torch.empty(5, 4, dtype=torch.int64), 16, 16, cap)
    assert [tuple(o.shape) for o in out] == [(cap,), (cap // 16,), (17,), (16,), (1,)]
    assert all(o.dtype == torch.int32 for o in out)


def test_route_kernel_host_side():
    """The router's kernel says why it cannot run (off CUDA here: the PyTorch routing runs) and its fake gives the
    kernel's outputs: int64 ids, fp32 weights, the plan tensors (empty sorted ids and blocks at capacity 0)."""
    x = torch.randn(5, 128).bfloat16()
    assert "CUDA" in qmoe.route_unavailable(x, 8, 16, plan_capacity(5, 8, 128, 16))
    assert "2-D" in qmoe.route_unavailable(x[0], 8, 16, 0)
    with pytest.raises(qmoe.MoEKernelError, match="cannot take"):
        qmoe.route(x, 8, True, True, 16, 0)
    cap = plan_capacity(5, 8, 128, 16)
    with FakeTensorMode():
        fx = torch.empty(5, 128, dtype=torch.bfloat16)
        full = torch.ops.quick.moe_route(fx, 8, True, True, 16, cap)
        bare = torch.ops.quick.moe_route(fx, 8, False, False, 16, 0)
    assert [tuple(o.shape) for o in full] == [(5, 8), (5, 8), (cap,), (cap // 16,), (129,), (128,), (1,)]
    assert full[0].dtype == torch.int64 and full[1].dtype == torch.float32
    assert all(o.dtype == torch.int32 for o in full[2:])
    assert bare[1].dtype == torch.float32 and bare[2].numel() == 0 and bare[3].numel() == 0


def test_decode_kernel_over_experts_host_side():
    """The decode kernel's grouped variant: the per-expert strides it adds to its pointers are the stacks' own, its
    validation names what it cannot take, its fake gives the output shape, and the selection picks it only for
    16-row plans it can run."""
    from quick.kernels import decode as qd
    from quick.nn.moe import QuickExpertStack
    from quick.testing import random_quantized

    e, kk, n, g = 3, 192, 128, 64
    gen = torch.Generator().manual_seed(0)
    stack = QuickExpertStack.from_quantized([random_quantized(kk, n, g, torch.float16, "cpu", gen) for _ in range(e)],
                                            "quick").packed()  # fmt: skip
    # csrc/quick_dec.cu (QD_GROUPED): qweight + e * K * N / 2 bytes, scales / zeros + e * (K / G) * N * 2 bytes
    assert stack["qweight"].stride(0) * 4 == kk * n // 2
    assert stack["scales"].stride(0) * 2 == (kk // g) * n * 2 == stack["zeros"].stride(0) * 2
    # the defines of every variant are the dense decode kernel's (B-side, one n64 block per warp) plus QD_GROUPED
    assert {tuple(sorted(d)) for _s, d, _a in qmoe.DEC_VARIANTS} == {
        tuple(sorted({**qmoe.DEC_CONFIG.defines(16, 128, torch.float16, a), "QD_GROUPED": 1}))
        for a in set(qmoe.DEC_ACTS.values())
    }
    assert qmoe.DEC_CONFIG.wb == 1 and qd.LAYOUTS[1] == "quick"

    x, qw, sc, z, _, ids, blocks, npad, k = _inputs(e=4, t=3, k=2, kk=256, n=128)
    d = qmoe.validate_dec(x, qw, sc, z, 128, ids, blocks, npad, k, 3, need_cuda=False)
    assert (d.slots, d.n) == (6, 128)
    gu = torch.zeros(6, 512, dtype=torch.float16)  # the down launch: [slots, 2K] gate|up product, K = 256
    d = qmoe.validate_dec(gu, qw, sc, z, 128, ids, blocks, npad, 1, 3, None, "silu", need_cuda=False)
    assert (d.slots, d.k, d.n) == (6, 256, 128)
    for args, match in (
        ((gu, qw, sc, z, 128, ids, blocks, npad, 2, 3, None, "silu"), "gdiv = 1"),
        ((gu, qw, sc, z, 128, ids, blocks, npad, 1, 3, None, "gelu"), "stages act"),
        ((x, qw, sc, z, 128, ids, blocks, npad, k, 0), "tokens must be"),
        ((x, qw, sc, z, 128, ids, blocks, npad, k, True), "tokens must be"),
        ((x[:, :128], qw, sc, z, 128, ids, blocks, npad, k, 3), "k16 rows"),
    ):
        with pytest.raises(qmoe.MoEKernelError, match=match):
            qmoe.validate_dec(*args, need_cuda=False)
    with FakeTensorMode():
        fx, fqw, fsc, fz, _, fids, fblocks, fnpad, _ = _inputs(e=4, t=3, k=2, kk=256, n=128)
        out = torch.ops.quick.moe_dec_w4a16(fx, fqw, fsc, fz, 128, fids, fblocks, fnpad, 2, 3)
        assert tuple(out.shape) == (6, 128) and out.dtype == torch.float16

    cpu = torch.device("cpu")
    assert "sm_80" in qmoe.dec_unavailable(3, 256, 128, 128, 16, "", torch.float16, cpu)
    p_gu = select.MoEProblem("quick", 3, 2, 4, 256, 256, 128, 16, torch.float16, cpu, "silu")
    p_dn = select.MoEProblem("quick", 6, 1, 4, 256, 128, 128, 16, torch.float16, cpu)
    assert select.moe_dec_unavailable(p_gu, p_dn) is not None and select.moe_mlp_kernel(p_gu, p_dn) == "mma"
    p_dn_bad = select.MoEProblem("quick", 6, 1, 4, 256, 64, 128, 16, torch.float16, cpu)
    assert "half of gate|up" in select.moe_dec_unavailable(p_gu, p_dn_bad)


def test_sm90_stacks_validation_fake_and_choice():
    """The ``quick_sm90`` stacks ([E, K/64, 8N]): the grouped wgmma GEMM's checks and its op's fake shapes (plan order
    in and out), the decode kernel over experts with the weight as the A operand, and which path runs where."""
    from quick.kernels import moe_sm90

    x, qw16, sc, z, g, ids, blocks, npad, k = _inputs(e=4, t=3, k=2, kk=256, n=128)
    qw = torch.zeros(4, 256 // 64, 8 * 128, dtype=torch.int32)
    d, slots = moe_sm90.validate(x, qw, sc, z, g, ids, blocks, npad, k, need_cuda=False)
    assert (d.k, d.n, d.e, slots) == (256, 128, 4, 6)
    cap = ids.shape[0]
    xp = torch.zeros(cap, 256, dtype=torch.float16)
    d, slots = moe_sm90.validate(xp, qw, sc, z, g, ids, blocks, npad, 1, None, 6, True, need_cuda=False)
    assert slots == 6
    for args, match in (
        ((x, qw16, sc, z, g, ids, blocks, npad, k), "quick_sm90"),  # a stack in the quick layout
        ((x[:, :128], qw, sc, z, g, ids, blocks, npad, k), "k64 rows"),
        ((x, qw, sc, z, g, ids, blocks, npad, k, None, 6, True), "capacity"),
        ((xp, qw, sc, z, g, ids, blocks, npad, 1, None, -1, True), "num_slots"),
        ((xp, qw, sc, z, g, ids, blocks, npad, 2, None, 6, True), "top_k 1"),
        ((x, qw, sc, z, g, ids, blocks, npad, k, torch.ones(6), -1, False, True), "slot weights apply"),
    ):
        with pytest.raises(qmoe.MoEKernelError, match=match):
            moe_sm90.validate(*args, need_cuda=False)
    with pytest.raises(qmoe.MoEKernelError, match="CUDA|sm_90"):
        moe_sm90.validate(x, qw, sc, z, g, ids, blocks, npad, k)
    with FakeTensorMode():
        fx, _, fsc, fz, _, fids, fblocks, fnpad, _ = _inputs(e=4, t=3, k=2, kk=256, n=128)
        fqw = torch.zeros(4, 4, 1024, dtype=torch.int32)
        out = torch.ops.quick.moe_gemm_w4a16_sm90(fx, fqw, fsc, fz, 128, fids, fblocks, fnpad, 2)
        assert tuple(out.shape) == (6, 128)
        out = torch.ops.quick.moe_gemm_w4a16_sm90(fx, fqw, fsc, fz, 128, fids, fblocks, fnpad, 2, None, -1, False,
                                                  True)  # fmt: skip
        assert tuple(out.shape) == (cap, 128)
        out = torch.ops.quick.moe_dec_w4a16(fx, fqw, fsc, fz, 128, fids, fblocks, fnpad, 2, 3, None, "", True,
                                            "quick_sm90")  # fmt: skip
        assert tuple(out.shape) == (6, 128)
    # one variant per plan block size, both dtypes and scale-group paths, all with QS_GROUPED
    # one variant per plan block size, dtype and scale-group path (group size 32 up to 128-row blocks)
    assert len(moe_sm90.VARIANTS) == 2 * (2 * len(qmoe.SM90_BLOCK_SIZES) - 1)
    assert all(dd["QS_GROUPED"] == 1 and dd["QS_NT"] in qmoe.SM90_BLOCK_SIZES for _s, _k, dd in moe_sm90.VARIANTS)
    assert not any(dd["QS_G32"] and dd["QS_NT"] > qmoe.SM90_G32_MAX_BLOCK for _s, _k, dd in moe_sm90.VARIANTS)
    # larger plan blocks for quick_sm90 stacks once the experts average twice the block (up to max_block)
    bsf = qmoe.block_size_for
    assert [bsf(t, 2, 8, "quick_sm90", max_block=256) for t in (16, 192, 1024, 2048)] == [16, 64, 128, 256]
    assert bsf(2048, 2, 8, "quick_sm90", 32, 256) == 128 and bsf(2048, 2, 8, max_block=256) == 64
    assert bsf(4096, 8, 128, "quick_sm90", max_block=256) == 128 and bsf(1024, 8, 128, "quick_sm90", 128, 256) == 64
    assert bsf(2048, 2, 8, "quick_sm90") == qmoe.SM90_AUTO_MAX_BLOCK
    x256 = torch.zeros(3, 256, dtype=torch.float16)
    ids256 = torch.zeros(plan_capacity(3, 2, 4, 256), dtype=torch.int32)
    blocks256 = torch.zeros(ids256.shape[0] // 256, dtype=torch.int32)
    d, _ = moe_sm90.validate(x256, qw, sc, z, g, ids256, blocks256, npad, 2, need_cuda=False)
    assert d.block_size == 256
    with pytest.raises(qmoe.MoEKernelError, match="block size 256 has no kernel"):
        qmoe.validate(x256, qw16, sc, z, g, ids256, blocks256, npad, 2, need_cuda=False)
    assert {dd["QD_WB"] for _s, dd, _a in qmoe.DEC_VARIANTS} == {0, 1}
    cpu = torch.device("cpu")
    assert "no decode kernel" in qmoe.dec_unavailable(3, 256, 128, 128, 16, "", torch.float16, cpu, layout="w4a8")
    p_gu = select.MoEProblem("quick_sm90", 300, 2, 4, 256, 256, 128, 64, torch.float16, cpu, "silu")
    p_dn = select.MoEProblem("quick_sm90", 600, 1, 4, 256, 128, 128, 64, torch.float16, cpu)
    assert select.moe_mlp_kernel(p_gu, p_dn) == "wgmma"
    assert not select.moe_available(p_gu)  # no sm_90 GPU here: the reference path
    assert select.MOE_KERNELS["moe_wgmma"].why_not(p_gu) == "needs an sm_90 GPU with nvcc"
