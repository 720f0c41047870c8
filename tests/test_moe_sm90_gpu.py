"""Device correctness of the experts in the ``quick_sm90`` layout on a Hopper GPU: the grouped wgmma GEMM
(``csrc/quick_sm90.cu`` with ``QS_GROUPED``) against the float64 reference of dequantize-then-matmul per routed slot;
many (experts, top_k, tokens, K, N, group size), experts that receive no token, dropped slots, every plan block size,
fp16 and bf16; outputs poisoned first (rows no slot names must keep the poison) and per-row error bounds that fail on
any indexing error; the three input / output orders of the grouped GEMM; ``QuickMoEExperts`` in this layout against
its reference path, in a CUDA graph, and the same block in the ``quick`` layout. The decode kernel over these stacks
is tested beside the other layout's in ``test_moe_gpu.py``. Skipped without an sm_90 GPU and nvcc."""

from __future__ import annotations

import pytest
import torch
from helpers import check_moe_graph_replays, check_moe_kernel_path, moe_routing, moe_stack, require_sm90

from quick.testing import REL_BOUND, random_quantized, rel_error

pytestmark = pytest.mark.gpu

require_sm90("quick.kernels.wgmma", "the sm_90 kernels")

import quick.kernels.ops  # noqa: E402, F401  (registers the ops)
from quick.kernels import jit, moe_sm90, select  # noqa: E402
from quick.kernels import moe as qmoe  # noqa: E402
from quick.nn.moe import QuickExpertStack, QuickMoEExperts, build_plan  # noqa: E402

DEV = torch.device("cuda")
LAYOUT = "quick_sm90"


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Build the variants the tests launch in parallel first."""
    jobs = [(src, "sm_90a", d) for src, _k, d in moe_sm90.VARIANTS]
    jobs += [(src, "sm_90a", d) for src, d, _a in qmoe.DEC_VARIANTS if d["QD_WB"] == 0]
    jit.compile_many(jobs)


def _stack(e: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int):
    return moe_stack(e, k, n, g, dtype, seed, LAYOUT)


def _routing(t: int, k: int, e: int, seed: int, used: int | None = None, drop: float = 0.0) -> torch.Tensor:
    return moe_routing(t, k, e, seed, used, drop)


def _reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gdiv: int, tw) -> torch.Tensor:
    """float64 ``out[s] = x[s // gdiv] @ W[idx[s]]`` (weighted), zero rows for dropped slots."""
    flat = idx.reshape(-1)
    out = torch.zeros(flat.numel(), w.shape[2], dtype=torch.float64, device=DEV)
    for s in range(flat.numel()):
        ex = int(flat[s])
        if ex < w.shape[0]:
            out[s] = (x[s // gdiv].double() @ w[ex]) * (float(tw[s]) if tw is not None else 1.0)
    return out


def _check_rows(out: torch.Tensor, ref: torch.Tensor, routed: torch.Tensor, dtype: torch.dtype) -> None:
    got = out[routed]
    assert torch.isfinite(got).all(), "NaN/inf in a routed row"
    err = rel_error(got, ref[routed])
    assert err < REL_BOUND[dtype], f"relative error {err:.3e} over bound {REL_BOUND[dtype]}"
    rows = (got.double() - ref[routed]).norm(dim=1) / ref[routed].norm(dim=1).clamp_min(1e-30)
    assert rows.max() < 4 * REL_BOUND[dtype], f"worst row error {rows.max():.3e}"


# (experts, top_k, tokens, K, N, group, used experts, dropped fraction)
CASES = [
    (8, 2, 1, 256, 128, 128, None, 0.0),  # one token
    (16, 4, 5, 512, 256, 64, 6, 0.0),  # ten experts idle, ragged counts
    (16, 8, 3, 192, 192, 32, None, 0.25),  # K of three k64 steps, N of three channel blocks, dropped slots
    (4, 2, 64, 256, 320, -1, None, 0.0),  # per-channel, N not a multiple of the 128-channel tile
    (32, 8, 40, 256, 128, 128, 20, 0.1),  # many blocks, twelve experts idle, dropped slots
    (8, 2, 200, 1024, 384, 128, None, 0.0),  # prefill-like: 50 rows an expert, 16 k64 steps
]
IDS = [f"E{c[0]}k{c[1]}T{c[2]}K{c[3]}N{c[4]}g{c[5]}" for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("block", qmoe.SM90_BLOCK_SIZES)
def test_grouped_wgmma_against_float64(case, dtype, block):
    """Rows gathered per token into slot rows; slot rows weighted; plan order out, then plan order in."""
    e, k, t, kk, n, g, used, drop = case
    if g == 32 and block > qmoe.SM90_G32_MAX_BLOCK:
        pytest.skip("group size 32 takes plan blocks of up to 128 rows")
    stack, w = _stack(e, kk, n, g, dtype, seed=hash(case) % 1000)
    idx = _routing(t, k, e, seed=t * 7 + e, used=used, drop=drop)
    x = (torch.randn(t, kk, generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype).to(DEV)
    plan = build_plan(idx, e, block, static=True)
    p = stack.packed()
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    wts = (p["qweight"], p["scales"], p["zeros"], g)
    dropped = idx.reshape(-1) >= e
    routed = ~dropped
    # gate|up-like, with the zero fill: rows no slot names are exactly zero
    out = torch.ops.quick.moe_gemm_w4a16_sm90(x, *wts, *ids, k)
    assert (out[dropped] == 0).all(), "a row no slot names was written"
    _check_rows(out, _reference(x, w, idx, k, None), routed, dtype)
    # plan order out: row r of the plan holds x[sorted_ids[r] // k] @ W (the rows the plan names)
    hp = torch.ops.quick.moe_gemm_w4a16_sm90(x, *wts, *ids, k, None, -1, False, True)
    assert hp.shape == (plan.sorted_ids.shape[0], n)
    rows = plan.sorted_ids.long()
    real = rows < t * k
    assert torch.equal(hp[real], out[rows[real]]), "plan-order rows differ from the slot rows"
    # plan order in (one row per plan row, as the down product reads the gate|up product), weighted slot rows; the
    # output poisoned without the fill: rows no slot names keep the poison
    xs = (torch.randn(plan.sorted_ids.shape[0], kk, generator=torch.Generator().manual_seed(2)) * 0.5).to(dtype)
    xs = xs.to(DEV)
    tw = torch.rand(t * k, generator=torch.Generator().manual_seed(3)).to(DEV)
    y = torch.ops.quick.moe_gemm_w4a16_sm90(xs, *wts, *ids, 1, tw, t * k, True, False, False)
    slot_x = torch.zeros(t * k, kk, dtype=dtype, device=DEV)
    slot_x[rows[real]] = xs[real]
    flat = idx.reshape(-1, 1)
    _check_rows(y, _reference(slot_x, w, flat, 1, tw), routed, dtype)


def test_grouped_wgmma_leaves_unnamed_rows_and_skips_empty_blocks():
    """Without the fill, rows no slot names keep their poison; capacity far beyond the routed rows; a hand-made plan
    with out-of-range ids is treated as padding (no illegal access)."""
    e, k, t, kk, n = 8, 2, 3, 256, 128
    stack, w = _stack(e, kk, n, 128, torch.float16, seed=6)
    p = stack.packed()
    wts = (p["qweight"], p["scales"], p["zeros"], 128)
    x = torch.randn(t, kk).half().to(DEV)
    idx = torch.tensor([[1, 4], [4, 8], [1, 8]], device=DEV)  # two dropped slots
    plan = build_plan(idx, e, 16, static=True)
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    assert plan.block_experts.numel() * 16 > int(plan.num_padded)
    out = moe_sm90.grouped_gemm_sm90(x, *wts, *ids, k, fill=False)
    torch.cuda.synchronize()
    routed = idx.reshape(-1) < e
    _check_rows(out, _reference(x, w, idx, k, None), routed, torch.float16)
    bad_ids = plan.sorted_ids.clone()
    bad_ids[0] = 10_000
    bad_exp = plan.block_experts.clone()
    bad_exp[0] = 99
    moe_sm90.grouped_gemm_sm90(x, *wts, bad_ids, bad_exp, plan.num_padded, k)
    torch.cuda.synchronize()  # an illegal access would surface here


def test_grouped_wgmma_refuses_what_it_cannot_take():
    e, kk, n = 4, 256, 128
    stack, _ = _stack(e, kk, n, 128, torch.float16, seed=21)
    p = stack.packed()
    wts = (p["qweight"], p["scales"], p["zeros"], 128)
    idx = _routing(3, 2, e, seed=22)
    x = torch.randn(3, kk).half().to(DEV)
    plan = build_plan(idx, e, 16, static=True)
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    with pytest.raises(qmoe.MoEKernelError, match="capacity"):
        torch.ops.quick.moe_gemm_w4a16_sm90(x, *wts, *ids, 1, None, 6, True)
    with pytest.raises(qmoe.MoEKernelError, match="slot weights apply"):
        torch.ops.quick.moe_gemm_w4a16_sm90(x, *wts, *ids, 2, torch.ones(6, device=DEV), -1, False, True)
    with pytest.raises(qmoe.MoEKernelError, match="k64 rows"):
        torch.ops.quick.moe_gemm_w4a16_sm90(x[:, :128], *wts, *ids, 2)
    quick_stack = QuickExpertStack.from_quantized([random_quantized(kk, n, 128, torch.float16) for _ in range(e)])
    q = quick_stack.to(DEV).packed()
    with pytest.raises(qmoe.MoEKernelError, match="quick_sm90"):
        torch.ops.quick.moe_gemm_w4a16_sm90(x, q["qweight"], q["scales"], q["zeros"], 128, *ids, 2)


def _module(e: int, h: int, i: int, dtype: torch.dtype, seed: int, layout: str = LAYOUT) -> QuickMoEExperts:
    gen = torch.Generator().manual_seed(seed)
    gu = torch.randn(e, 2 * i, h, generator=gen) * 0.05
    dn = torch.randn(e, h, i, generator=gen) * 0.05
    return QuickMoEExperts.from_weights(gu, dn, group_size=128, layout=layout, dtype=dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 64, 300, 2100])
@pytest.mark.parametrize("i", [128, 192])  # 192: the down product's K zero-padded to whole groups (no decode kernel)
def test_sm90_experts_forward_matches_reference_path_and_the_quick_layout(dtype, t, i):
    e, k, h = 16, 4, 256
    mod = _module(e, h, i, dtype, seed=8)
    idx = _routing(t, k, e, seed=t, used=11, drop=0.05)
    wts = torch.rand(t, k, generator=torch.Generator().manual_seed(9)).to(DEV)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(10)).to(dtype).to(DEV)
    p_gu, p_dn = mod._problems(x, k)
    assert p_gu.block_size == qmoe.block_size_for(t, k, e, LAYOUT)
    assert select.moe_mlp_kernel(p_gu, p_dn) == ("dec" if t <= 16 and i == 128 else "wgmma")
    got = check_moe_kernel_path(mod, x, idx, wts)
    other = _module(e, h, i, dtype, seed=8, layout="quick")  # the same quantized weights, the other layout
    other.backend = "kernel"
    err = rel_error(got, other(x, idx, wts).double())
    assert err < 2 * REL_BOUND[dtype], f"quick_sm90 vs quick layout: relative error {err:.3e}"


@pytest.mark.parametrize("t", [6, 200, 2100])
def test_sm90_experts_forward_in_a_cuda_graph(t):
    """The whole block captured once (the decode kernel at 6 tokens, the grouped wgmma GEMM beyond; the plan kernel
    up to 4096 slots, the PyTorch plan past it), replayed on other routings."""
    mod = _module(16, 256, 128, torch.float16, seed=11)
    mod.backend = "kernel"
    check_moe_graph_replays(mod, t, 4, (13, 14))
