"""Device correctness of the grouped mixture-of-experts GEMM (``csrc/quick_moe.cu``) against the float64 reference of
dequantize-then-matmul per routed slot: many (experts, top_k, tokens, K, N), experts that receive no token, one token,
ragged counts, dropped slots, both row tiles, fp16 and bf16, per-channel and group sizes 32 / 64 / 128; outputs of the
kernel checked for unwritten rows (a row the plan names must be written, every other row must stay zero, no NaN) and
relative Frobenius error bounds that fail on any indexing error; ``QuickMoEExperts.forward`` against its reference
path, and captured in a CUDA graph and replayed on new routings. Skipped without an sm_80+ GPU and nvcc."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_moe_graph_replays, check_moe_kernel_path, moe_routing, moe_stack, require_sm80_and_nvcc

from quick.testing import REL_BOUND, rel_error, route_errors

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

import quick.kernels.ops  # noqa: E402, F401  (registers torch.ops.quick.moe_gemm_w4a16)
from quick.kernels import jit  # noqa: E402
from quick.kernels import moe as qmoe  # noqa: E402
from quick.kernels.decode import DecConfig  # noqa: E402
from quick.nn.moe import QuickMoEExperts, build_plan  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Build every variant the tests launch in parallel first (nvcc is single-threaded; a few seconds in all)."""
    arch = jit.arch_for_device()
    jit.compile_many((src, arch, d) for src, d, _ in qmoe.VARIANTS)


def _stack(e: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int, layout: str = "quick"):
    """Random codes, scales and zero points per expert, packed as a stack on the GPU, and the float64 weights."""
    return moe_stack(e, k, n, g, dtype, seed, layout)


def _routing(t: int, k: int, e: int, seed: int, used: int | None = None, drop: float = 0.0) -> torch.Tensor:
    return moe_routing(t, k, e, seed, used, drop)


def _reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gdiv: int, act: str, tw) -> torch.Tensor:
    """float64 ``out[s] = x[s // gdiv] @ W[idx[s]]`` (gated: act(gate) * up; weighted), zero rows for dropped slots."""
    flat = idx.reshape(-1)
    e = w.shape[0]
    n = w.shape[2] // 2 if act else w.shape[2]
    out = torch.zeros(flat.numel(), n, dtype=torch.float64, device=DEV)
    for s in range(flat.numel()):
        ex = int(flat[s])
        if ex >= e:
            continue
        y = x[s // gdiv].double() @ w[ex]
        if act:
            y = F.silu(y[:n]) * y[n:]
        out[s] = y * (float(tw[s]) if tw is not None else 1.0)
    return out


def _check(out: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor, e: int, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    dropped = idx.reshape(-1) >= e
    assert (out[dropped] == 0).all(), "a row no slot names was written"
    routed = ~dropped
    err = rel_error(out[routed], ref[routed])
    assert err < REL_BOUND[dtype], f"relative error {err:.3e} over bound {REL_BOUND[dtype]}"
    # per row too: one wrong row in many would hide in the Frobenius norm
    rows = (out[routed].double() - ref[routed]).norm(dim=1) / ref[routed].norm(dim=1).clamp_min(1e-30)
    assert rows.max() < 4 * REL_BOUND[dtype], f"worst row error {rows.max():.3e}"


# (experts, top_k, tokens, K, N, group, used experts, dropped fraction)
CASES = [
    (8, 2, 1, 256, 128, 128, None, 0.0),  # one token
    (16, 4, 5, 512, 256, 64, 6, 0.0),  # ten experts idle, ragged counts
    (16, 8, 3, 192, 192, 32, None, 0.25),  # K not a multiple of 256 (the any-K variant), dropped slots
    (4, 2, 64, 256, 320, -1, None, 0.0),  # per-channel, N not a multiple of the CTA tile
    (32, 8, 40, 256, 128, 128, 20, 0.1),  # many blocks, twelve experts idle, dropped slots
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"E{c[0]}k{c[1]}T{c[2]}K{c[3]}N{c[4]}g{c[5]}" for c in CASES])
@pytest.mark.parametrize("block", [16, 64])
def test_grouped_gemm_against_float64(case, dtype, block):
    e, k, t, kk, n, g, used, drop = case
    stack, w = _stack(e, kk, n, g, dtype, seed=hash(case) % 1000)
    idx = _routing(t, k, e, seed=t * 7 + e, used=used, drop=drop)
    x = (torch.randn(t, kk, generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype).to(DEV)
    if kk % 256 == 0 and block == 16:
        assert qmoe.default_config(block, kk).name == "m16k8"
    plan = build_plan(idx, e, block, static=True)
    p = stack.packed()
    # gate|up-like: input rows gathered per token; down-like: one input row per slot, weighted
    out = qmoe.grouped_gemm(x, p["qweight"], p["scales"], p["zeros"], g, plan.sorted_ids, plan.block_experts,
                            plan.num_padded, k, validate_ids=True)  # fmt: skip
    _check(out, _reference(x, w, idx, k, "", None), idx, e, dtype)
    xs = x.repeat_interleave(k, dim=0)
    tw = torch.rand(t * k, generator=torch.Generator().manual_seed(2)).to(DEV)
    out = torch.ops.quick.moe_gemm_w4a16(xs, p["qweight"], p["scales"], p["zeros"], g, plan.sorted_ids,
                                         plan.block_experts, plan.num_padded, 1, tw, "", True)  # fmt: skip
    _check(out, _reference(xs, w, idx, 1, "", tw), idx, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block", [16, 64])
def test_gated_epilogue(dtype, block):
    e, k, t, kk, i = 8, 2, 9, 256, 192
    stack, w = _stack(e, kk, 2 * i, 128, dtype, seed=3)
    idx = _routing(t, k, e, seed=4, used=5)
    x = torch.randn(t, kk, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    plan = build_plan(idx, e, block, static=True)
    p = stack.packed()
    out = qmoe.grouped_gemm(x, p["qweight"], p["scales"], p["zeros"], 128, plan.sorted_ids, plan.block_experts,
                            plan.num_padded, k, None, "silu")  # fmt: skip
    assert out.shape == (t * k, i)
    _check(out, _reference(x, w, idx, k, "silu", None), idx, e, dtype)


def test_empty_plan_blocks_and_bad_ids_are_safe():
    """Capacity far beyond the routed rows (blocks past num_padded are skipped), and out-of-range ids in a hand-made
    plan: the host check names them; without it the kernel treats them as padding (no illegal access)."""
    e, k, t, kk, n = 8, 2, 2, 128, 64
    stack, w = _stack(e, kk, n, 128, torch.float16, seed=6)
    p = stack.packed()
    x = torch.randn(t, kk).half().to(DEV)
    idx = torch.tensor([[1, 4], [4, 1]], device=DEV)  # both tokens on two experts: 2 of the 4 capacity blocks used
    plan = build_plan(idx, e, 16, static=True)
    assert plan.block_experts.numel() * 16 > int(plan.num_padded)
    args = (p["qweight"], p["scales"], p["zeros"], 128)
    out = qmoe.grouped_gemm(x, *args, plan.sorted_ids, plan.block_experts, plan.num_padded, k)
    _check(out, _reference(x, w, idx, k, "", None), idx, e, torch.float16)
    bad_ids = plan.sorted_ids.clone()
    bad_ids[0] = 10_000
    bad_exp = plan.block_experts.clone()
    bad_exp[0] = 99
    with pytest.raises(qmoe.MoEKernelError, match="sorted_ids must lie"):
        qmoe.grouped_gemm(x, *args, bad_ids, plan.block_experts, plan.num_padded, k, validate_ids=True)
    with pytest.raises(qmoe.MoEKernelError, match="block_experts must lie"):
        qmoe.grouped_gemm(x, *args, plan.sorted_ids, bad_exp, plan.num_padded, k, validate_ids=True)
    qmoe.grouped_gemm(x, *args, bad_ids, bad_exp, plan.num_padded, k)
    torch.cuda.synchronize()  # an illegal access would surface here


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"E{c[0]}k{c[1]}T{c[2]}K{c[3]}N{c[4]}g{c[5]}" for c in CASES])
@pytest.mark.parametrize("layout", ["quick", "quick_sm90"])  # the weight as the mma B / A operand
def test_decode_kernel_over_experts_against_float64(case, dtype, layout):
    """The decode kernel's grouped variant (16-row plans): gate|up-like (rows gathered per token), then a down-like
    launch that stages act(gate) * up from a [slots, 2K] product and weights the slots; outputs poisoned first (rows
    no slot names must keep the poison), and every output row checked against float64."""
    e, k, t, kk, n, g, used, drop = case
    stack, w = _stack(e, kk, n, g, dtype, seed=hash(case) % 997, layout=layout)
    idx = _routing(t, k, e, seed=t * 5 + e, used=used, drop=drop)
    x = (torch.randn(t, kk, generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype).to(DEV)
    plan = build_plan(idx, e, 16, static=True)
    p = stack.packed()
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    assert qmoe.dec_unavailable(t, kk, n, g if g > 0 else kk, 16, "", dtype, DEV, layout=layout) is None
    poison = torch.full((t * k, n), float("nan"), dtype=dtype, device=DEV)
    out = qmoe.dec_grouped(x, p["qweight"], p["scales"], p["zeros"], g, *ids, k, t, None, "", out=poison.clone(),
                           layout=layout)  # fmt: skip
    dropped = idx.reshape(-1) >= e
    assert torch.isnan(out[dropped]).all(), "a row no slot names was written"
    out[dropped] = 0
    _check(out, _reference(x, w, idx, k, "", None), idx, e, dtype)
    # the op without the zero fill (an intermediate): the named rows are the same, bit for bit
    nofill = torch.ops.quick.moe_dec_w4a16(x, p["qweight"], p["scales"], p["zeros"], g, *ids, k, t, None, "", False,
                                           layout)  # fmt: skip
    assert torch.equal(nofill[~dropped], out[~dropped])
    # down-like: x = a [slots, 2K] gate|up product (gate first), act(gate) * up staged, slot weights
    gu = (torch.randn(t * k, 2 * kk, generator=torch.Generator().manual_seed(4)) * 0.5).to(dtype).to(DEV)
    tw = torch.rand(t * k, generator=torch.Generator().manual_seed(5)).to(DEV)
    y = torch.ops.quick.moe_dec_w4a16(gu, p["qweight"], p["scales"], p["zeros"], g, *ids, 1, t, tw, "silu", True,
                                      layout)  # fmt: skip
    staged = (F.silu(gu[:, :kk].float()) * gu[:, kk:].float()).to(dtype)  # rounded once, as the kernel stages it
    _check(y, _reference(staged, w, idx, 1, "", tw), idx, e, dtype)


# other A-side decode configs the MoE benchmark sweeps (--sm90-dec-configs): each must be exact before it is timed
SWEPT_SM90_DEC = [DecConfig(2, 8, 4), DecConfig(1, 8, 4), DecConfig(4, 8, 6)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", SWEPT_SM90_DEC, ids=lambda c: f"rb{c.rb}w{c.warps}s{c.stages}")
def test_decode_kernel_over_experts_at_swept_configs(config, dtype):
    """The A-side grouped decode kernel at the configs the benchmark sweeps: gate|up-like and down-like launches
    against float64, rows no slot names untouched."""
    e, k, t, kk, n, g = 12, 4, 9, 256, 192, 128
    stack, w = _stack(e, kk, n, g, dtype, seed=11, layout="quick_sm90")
    idx = _routing(t, k, e, seed=2, used=7, drop=0.25)
    x = (torch.randn(t, kk, generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype).to(DEV)
    plan = build_plan(idx, e, 16, static=True)
    p = stack.packed()
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    assert qmoe.dec_unavailable(t, kk, n, g, 16, "", dtype, DEV, config, "quick_sm90") is None
    dropped = idx.reshape(-1) >= e
    poison = torch.full((t * k, n), float("nan"), dtype=dtype, device=DEV)
    out = qmoe.dec_grouped(x, p["qweight"], p["scales"], p["zeros"], g, *ids, k, t, None, "", out=poison,
                           config=config, layout="quick_sm90")  # fmt: skip
    assert torch.isnan(out[dropped]).all(), "a row no slot names was written"
    out[dropped] = 0
    _check(out, _reference(x, w, idx, k, "", None), idx, e, dtype)
    gu = (torch.randn(t * k, 2 * kk, generator=torch.Generator().manual_seed(4)) * 0.5).to(dtype).to(DEV)
    tw = torch.rand(t * k, generator=torch.Generator().manual_seed(5)).to(DEV)
    y = qmoe.dec_grouped(gu, p["qweight"], p["scales"], p["zeros"], g, *ids, 1, t, tw, "silu", config=config,
                         layout="quick_sm90")  # fmt: skip
    staged = (F.silu(gu[:, :kk].float()) * gu[:, kk:].float()).to(dtype)
    _check(y, _reference(staged, w, idx, 1, "", tw), idx, e, dtype)


def test_decode_kernel_over_experts_refuses_what_it_cannot_take():
    e, kk, n = 4, 128, 64
    stack, _ = _stack(e, kk, n, 128, torch.float16, seed=21)
    p = stack.packed()
    idx = _routing(3, 2, e, seed=22)
    x = torch.randn(3, kk).half().to(DEV)
    args = (p["qweight"], p["scales"], p["zeros"], 128)
    p64 = build_plan(idx, e, 64, static=True)
    with pytest.raises(qmoe.MoEKernelError, match="16-row plans"):
        torch.ops.quick.moe_dec_w4a16(x, *args, p64.sorted_ids, p64.block_experts, p64.num_padded, 2, 3)
    p16 = build_plan(idx, e, 16, static=True)
    ids = (p16.sorted_ids, p16.block_experts, p16.num_padded)
    with pytest.raises(qmoe.MoEKernelError, match="stages act"):
        torch.ops.quick.moe_dec_w4a16(torch.randn(6, 2 * kk).half().to(DEV), *args, *ids, 1, 3, None, "relu")
    with pytest.raises(qmoe.MoEKernelError, match="gdiv = 1"):
        torch.ops.quick.moe_dec_w4a16(torch.randn(3, 2 * kk).half().to(DEV), *args, *ids, 2, 3, None, "silu")
    with pytest.raises(qmoe.MoEKernelError, match="tokens must be"):
        torch.ops.quick.moe_dec_w4a16(x, *args, *ids, 2, 0)
    # a hand-made plan naming more rows than tokens allows: the kernel keeps to the rows it was sized for
    bad = p16.sorted_ids.clone()
    bad[:16] = torch.arange(16, device=DEV) % 6
    qmoe.dec_grouped(x, *args, bad, p16.block_experts, p16.num_padded, 2, 3)
    torch.cuda.synchronize()


def test_experts_choose_the_decode_kernel_at_decode_sizes():
    from quick.kernels import select

    mod = _module(16, 256, 128, torch.float16, seed=23)
    x = torch.randn(4, 256).half().to(DEV)
    p_gu, p_dn = mod._problems(x, 4)
    assert p_gu.block_size == 16 and select.moe_mlp_kernel(p_gu, p_dn) == "dec"
    big = torch.randn(300, 256).half().to(DEV)
    assert select.moe_mlp_kernel(*mod._problems(big, 4)) == "mma"


def _module(e: int, h: int, i: int, dtype: torch.dtype, seed: int) -> QuickMoEExperts:
    gen = torch.Generator().manual_seed(seed)
    gu = torch.randn(e, 2 * i, h, generator=gen) * 0.05
    dn = torch.randn(e, h, i, generator=gen) * 0.05
    return QuickMoEExperts.from_weights(gu, dn, group_size=128, dtype=dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 300])
def test_experts_forward_matches_reference_path(dtype, t):
    e, k, h, i = 16, 4, 256, 128
    mod = _module(e, h, i, dtype, seed=8)
    idx = _routing(t, k, e, seed=t, used=11, drop=0.05)
    wts = torch.rand(t, k, generator=torch.Generator().manual_seed(9)).to(DEV)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(10)).to(dtype).to(DEV)
    check_moe_kernel_path(mod, x, idx, wts)


def test_experts_forward_in_a_cuda_graph():
    """The whole block (plan, two grouped launches, the slot sum) captured once, replayed on other routings."""
    mod = _module(16, 256, 128, torch.float16, seed=11)
    mod.backend = "kernel"
    check_moe_graph_replays(mod, 6, 4, (13, 14, 15))


PLAN_CASES = [
    # (tokens, top_k, experts, block size, id dtype)
    (1, 8, 128, 16, torch.int64),  # Qwen3-30B-A3B decode, batch 1
    (64, 8, 128, 16, torch.int64),
    (512, 8, 128, 16, torch.int64),  # PLAN_MAX_SLOTS
    (7, 2, 8, 16, torch.int32),  # Mixtral, ragged
    (33, 2, 8, 64, torch.int64),
    (200, 4, 60, 64, torch.int32),  # Qwen2-MoE-sized expert count (not a multiple of 32)
    (3, 1, 1, 16, torch.int64),
    (40, 6, 1000, 16, torch.int64),  # many experts, most empty
]


def _plan_fields(p):
    return (p.sorted_ids, p.block_experts, p.offsets, p.counts, p.num_padded)


@pytest.mark.parametrize("case", PLAN_CASES, ids=str)
@pytest.mark.parametrize("ids_kind", ["random", "skewed", "dropped_and_out_of_range"])
def test_plan_kernel_equals_the_pytorch_plan(case, ids_kind):
    """The one-launch plan is the PyTorch plan element for element: slot order within each expert, padding, the
    experts of the blocks (-1 past the total), offsets, counts, total; dropped (E) and out-of-range ids nowhere."""
    from quick.nn.moe import static_plan

    t, k, e, bs, dt = case
    gen = torch.Generator().manual_seed(t * 1000 + k * 10 + e)
    if ids_kind == "skewed":  # most slots on a few experts: long runs, many empty experts
        ids = torch.randint(0, min(e, 3), (t, k), generator=gen)
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] if k <= e else torch.randint(0, e, (k,), generator=gen)
                           for _ in range(t)])  # fmt: skip
    if ids_kind == "dropped_and_out_of_range":
        drop = torch.rand(t, k, generator=gen) < 0.2
        ids = torch.where(drop, torch.tensor(e), ids)
        ids[0, 0] = -3
        ids[-1, -1] = e + 7
    ids = ids.to(dt).to(DEV)
    assert qmoe.plan_kernel_takes(ids, e)
    want = build_plan(ids, e, bs, static=True, check=False)
    got = static_plan(ids, e, bs)
    torch.cuda.synchronize()
    for name, a, b in zip(("sorted_ids", "block_experts", "offsets", "counts", "num_padded"), _plan_fields(got),
                          _plan_fields(want), strict=True):  # fmt: skip
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: first difference at {int((a != b).nonzero()[0])}"


def test_plan_kernel_in_a_cuda_graph_follows_new_routings():
    """Captured once, replayed on new ids in the same buffer: each replay's plan is that routing's plan."""
    from quick.nn.moe import static_plan

    t, k, e, bs = 16, 8, 128, 16
    ids = torch.randint(0, e, (t, k), device=DEV)
    static_plan(ids, e, bs)  # warm-up: compile and load outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan = static_plan(ids, e, bs)
    for seed in range(3):
        ids.copy_(torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(seed)).to(DEV))
        g.replay()
        torch.cuda.synchronize()
        want = build_plan(ids, e, bs, static=True, check=False)
        for a, b in zip(_plan_fields(plan), _plan_fields(want), strict=True):
            assert torch.equal(a, b)


def test_plan_kernel_refuses_what_it_cannot_take():
    """Beyond its limits the kernel is not used (static_plan falls back) and a direct call says why."""
    from quick.nn.moe import static_plan

    big = torch.randint(0, 8, (qmoe.PLAN_MAX_SLOTS // 2 + 1, 2), device=DEV)
    assert not qmoe.plan_kernel_takes(big, 8)
    want = build_plan(big, 8, 64, static=True, check=False)
    got = static_plan(big, 8, 64)
    assert torch.equal(got.sorted_ids, want.sorted_ids)
    with pytest.raises(qmoe.MoEKernelError, match="plan kernel takes"):
        qmoe.plan(big, 8, 64, 64 * 8)
    with pytest.raises(qmoe.MoEKernelError, match="multiple of block_size"):
        qmoe.plan(big[:4], 8, 16, 17)
    with pytest.raises(qmoe.MoEKernelError, match="below"):
        qmoe.plan(big[:4], 8, 16, 16)  # 8 slots over 8 experts may need 64 rows


ROUTE_CASES = [
    # (tokens, experts, top_k)
    (1, 128, 8),  # Qwen3-30B-A3B decode, batch 1
    (64, 128, 8),
    (512, 128, 8),  # ROUTE_MAX_SLOTS
    (7, 8, 2),  # Mixtral
    (33, 60, 4),  # Qwen2-MoE-sized expert count (not a multiple of 32)
    (5, 256, 8),  # DeepSeek-sized expert count
    (3, 512, 32),  # the widest variant, one choice per lane
    (2, 1, 1),
    (300, 100, 13),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ROUTE_CASES, ids=str)
def test_route_kernel_against_float64_and_its_plan(case, dtype):
    from quick.models.moe import route
    from quick.nn.moe import plan_capacity

    t, e, k = case
    gen = torch.Generator().manual_seed(t * 31 + e + k)
    logits = (torch.randn(t, e, generator=gen) * 3).to(dtype).to(DEV)
    bs = 16 if t * k <= 256 else 64
    cap = plan_capacity(t, k, e, bs)
    assert qmoe.route_unavailable(logits, k, bs, cap) is None
    for renorm in (False, True):
        for rnd in (False, True):
            ids, w, *plan = qmoe.route(logits, k, renorm, rnd, bs, cap)
            torch.cuda.synchronize()
            why = route_errors(logits, k, renorm, rnd, ids, w)
            assert not why, why
            # rows without tied logits: the same picks and weights as the families' PyTorch routing
            w_ref, ids_ref = route(logits, k, renorm)
            rows = (logits.float().sort(dim=1, descending=True).values.diff(dim=1) != 0).all(dim=1)
            assert torch.equal(ids[rows], ids_ref[rows])
            if not rnd:
                torch.testing.assert_close(w[rows], w_ref[rows], rtol=4e-6, atol=0)
            want = build_plan(ids, e, bs, static=True, check=False)
            for name, a, b in zip(("sorted_ids", "block_experts", "offsets", "counts", "num_padded"), plan,
                                  _plan_fields(want), strict=True):  # fmt: skip
                assert a.dtype == torch.int32 and torch.equal(a, b), name


def test_route_kernel_ties_nan_rows_and_strided_logits():
    """Equal probabilities go to the lower expert ids; a row with a NaN logit gets NaN weights and in-range ids
    without disturbing the other rows; logits with a row stride (a slice of a wider tensor) route like a copy."""
    from quick.nn.moe import plan_capacity

    t, e, k = 4, 64, 6
    cap = plan_capacity(t, k, e, 16)
    ids, w, *_ = qmoe.route(torch.zeros(t, e, dtype=torch.bfloat16, device=DEV), k, True, False, 16, cap)
    assert torch.equal(ids, torch.arange(k, device=DEV).expand(t, k))
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / k))
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(3)).half().to(DEV)
    clean_ids, clean_w, *_ = qmoe.route(logits, k, True, True, 16, cap)
    bad = logits.clone()
    bad[1, 5] = float("nan")
    ids, w, *_ = qmoe.route(bad, k, True, True, 16, cap)
    assert bool(((ids[1] >= 0) & (ids[1] < e)).all()) and bool(torch.isnan(w[1]).all())
    keep = torch.tensor([0, 2, 3], device=DEV)
    assert torch.equal(ids[keep], clean_ids[keep]) and torch.equal(w[keep], clean_w[keep])
    wide = torch.randn(t, 3 * e, generator=torch.Generator().manual_seed(4)).half().to(DEV)
    got = qmoe.route(wide[:, e : 2 * e], k, True, True, 16, cap)
    want = qmoe.route(wide[:, e : 2 * e].contiguous(), k, True, True, 16, cap)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_route_kernel_in_a_cuda_graph_follows_new_logits():
    """``quick::moe_route`` captured once and replayed on new logits in the same buffer: each replay's routing and
    plan are those of an eager call on the new logits."""
    from quick.nn.moe import plan_capacity

    t, e, k, bs = 8, 128, 8, 16
    cap = plan_capacity(t, k, e, bs)
    logits = torch.randn(t, e, device=DEV, dtype=torch.bfloat16)
    torch.ops.quick.moe_route(logits, k, True, True, bs, cap)  # warm-up: build and load outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = torch.ops.quick.moe_route(logits, k, True, True, bs, cap)
    for seed in range(3):
        logits.copy_(torch.randn(t, e, generator=torch.Generator().manual_seed(seed)).bfloat16().to(DEV))
        g.replay()
        torch.cuda.synchronize()
        want = torch.ops.quick.moe_route(logits, k, True, True, bs, cap)
        for a, b in zip(outs, want, strict=True):
            assert torch.equal(a, b)


def test_route_kernel_without_a_plan():
    """Capacity 0 (16-bit experts need no plan): the same ids and weights, counts and offsets, and nothing written
    past the empty plan buffers (the poisoned neighbours stay as they were)."""
    from quick.nn.moe import plan_capacity

    t, e, k = 9, 128, 8
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEV)
    full = qmoe.route(logits, k, True, True, 16, plan_capacity(t, k, e, 16))
    guard = torch.full((1 << 16,), -7, dtype=torch.int32, device=DEV)
    bare = qmoe.route(logits, k, True, True, 16, 0)
    torch.cuda.synchronize()
    for name, a, b in zip(("ids", "weights", "offsets", "counts", "num_padded"), (*bare[:2], *bare[4:]),
                          (*full[:2], *full[4:]), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert bare[2].numel() == 0 and bare[3].numel() == 0
    assert bool((guard == -7).all())


def test_route_kernel_refuses_what_it_cannot_take():
    """Beyond its limits the kernel names the limit (no launch, no crash)."""
    from quick.nn.moe import plan_capacity

    cap = plan_capacity(600, 8, 128, 64)
    with pytest.raises(qmoe.MoEKernelError, match="slots"):
        qmoe.route(torch.zeros(600, 128, dtype=torch.half, device=DEV), 8, True, True, 64, cap)
    with pytest.raises(qmoe.MoEKernelError, match="experts"):
        qmoe.route(torch.zeros(2, 513, dtype=torch.half, device=DEV), 8, True, True, 16, 16 * 20)
    with pytest.raises(qmoe.MoEKernelError, match="fp16 or bf16"):
        qmoe.route(torch.zeros(2, 128, device=DEV), 8, True, True, 16, 16 * 20)
    with pytest.raises(qmoe.MoEKernelError, match="below"):
        qmoe.route(torch.zeros(2, 128, dtype=torch.half, device=DEV), 8, True, True, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_planned_forward_from_the_route_kernel(dtype):
    """Experts on the route kernel's plan: equal to ``forward`` on its ids and weights; without the zero fill of the
    down product (every slot routed) and with the slot rows left unsummed, which summed in fp32 give the same."""
    from quick.nn.moe import MoEPlan, plan_capacity

    e, k, h, i, t = 16, 4, 256, 128, 5
    mod = _module(e, h, i, dtype, seed=21)
    mod.backend = "kernel"
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(22)).to(dtype).to(DEV)
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(23)).to(dtype).to(DEV)
    bs = mod.plan_block_size(t, k)
    ids, w, *plan = qmoe.route(logits, k, True, True, bs, plan_capacity(t, k, e, bs))
    want = mod(x, ids, w)
    got = mod.kernel_forward_planned(x, MoEPlan(*plan, t, k, bs), w, all_routed=True)
    rows = mod.kernel_forward_planned(x, MoEPlan(*plan, t, k, bs), w, all_routed=True, sum_slots=False)
    assert torch.equal(got, want)
    assert rows.shape == (t, k, h) and torch.isfinite(rows).all()
    assert torch.equal(rows.float().sum(1).to(dtype), want)
    ref = mod.reference_forward(x, ids, w)
    assert rel_error(got, ref.double()) < 2 * REL_BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_experts_forward_when_a_token_names_an_expert_twice(dtype):
    """top_k 6 over 4 experts: every token names some expert twice, so an expert gets more rows than there are
    tokens; the forward (which then leaves the decode kernel for the grouped GEMM) still equals the reference."""
    e, k, h, i, t = 8, 6, 256, 128, 3
    mod = _module(e, h, i, dtype, seed=31)
    gen = torch.Generator().manual_seed(32)
    idx = torch.randint(0, 4, (t, k), generator=gen).to(DEV)
    wts = torch.rand(t, k, generator=gen).to(DEV)
    x = torch.randn(t, h, generator=gen).to(dtype).to(DEV)
    mod.backend = "kernel"
    got = mod(x, idx, wts)
    mod.backend = "reference"
    want = mod(x, idx, wts)
    assert torch.isfinite(got).all()
    err = rel_error(got, want.double())
    assert err < 2 * REL_BOUND[dtype], f"relative error {err:.3e}"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("experts", ["quick", "bf16"])
def test_routed_block_matches_the_block(family, experts):
    """The decode step's MoE block (router linear, one-launch top-k + plan, experts, shared expert) against the
    block's own forward on the same weights: 4-bit experts on the kernels, or transformers' 16-bit experts."""
    from quick.models.families import get_family
    from quick.models.moe import RoutedBlock, quantize_experts_rtn_

    cfg = _tiny_moe_config(family)
    model = _tiny_moe_model(cfg)
    fam = get_family(cfg)
    block = model.model.layers[0].mlp
    if experts == "quick":
        quantize_experts_rtn_(model, {"model.layers.0.mlp.experts": block.experts}, 128, dtype=torch.bfloat16)
        block.experts.backend = "kernel"
    routed = RoutedBlock.of(block, fam.moe, cfg)
    assert routed is not None
    k = routed.top_k
    for t in (1, 5, 40):
        x = torch.randn(t, cfg.hidden_size, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16).to(DEV)
        got = routed(x)
        want = block(x[:, None])[:, 0]
        torch.cuda.synchronize()
        assert got.dtype == want.dtype and torch.isfinite(got).all()
        # bf16 logits tie often; a tie at the top-k boundary may pick another (equally valid) expert than torch.topk
        top = torch.nn.functional.linear(x, routed.router_weight).float().sort(dim=1, descending=True).values
        clear = top[:, k - 1] != top[:, k] if k < top.shape[1] else torch.ones(t, dtype=torch.bool, device=DEV)
        assert clear.any()
        err = rel_error(got[clear], want[clear].double())
        assert err < 2 * REL_BOUND[torch.bfloat16], f"{family}/{experts} t={t}: relative error {err:.3e}"
        slots = routed(x, sum_slots=False)  # the decode step's form: the slot rows, summed in its next kernel
        if experts == "quick" and routed.shared is None:
            assert slots.shape == (t, k, cfg.hidden_size)
            assert torch.equal(slots.float().sum(1).to(got.dtype), got)
        else:
            assert torch.equal(slots, got)


def _tiny_moe_config(family: str):
    from transformers import AutoConfig

    kw = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 64}  # fmt: skip
    if family == "mixtral":
        kw.update(num_local_experts=8, num_experts_per_tok=2)
    else:
        qwen2 = family == "qwen2_moe"
        kw.update(num_experts=60 if qwen2 else 128, num_experts_per_tok=4 if qwen2 else 8, moe_intermediate_size=128,
                  norm_topk_prob=family == "qwen3_moe")  # fmt: skip
        if qwen2:
            kw.update(shared_expert_intermediate_size=256)
    return AutoConfig.for_model(family, **kw)


def _tiny_moe_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().to(DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model
