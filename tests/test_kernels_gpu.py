"""Device correctness of the QUICK mma.sync GEMM and the decode GEMV against a float64 reference.

Every case draws fresh random codes, scales, zero points, activations (and bias), poisons the output with NaN,
and checks the relative Frobenius error against ``quick.testing.REL_BOUND`` (a few times the expected rounding
error; any indexing mistake gives errors of order 1) plus finiteness. Every M of the issue's list and every
shape of it is covered, without crossing all of them (runtime). Bad inputs must raise clear Python errors.
Set ``QUICK_ERR_REPORT=path.json`` to get the max error per dtype / kernel written at the end.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, M_ALL, require_sm80_and_nvcc, write_error_report

from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizedWeight
from quick.kernels import select
from quick.testing import REL_BOUND, poisoned, reference_matmul, rel_error

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

from quick.kernels import dispatch, jit, mma, ops  # noqa: E402

BIG_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (5120, 13824)]
SMALL_SHAPES = [(64, 64), (192, 320), (320, 192), (1088, 704), (4160, 576)]  # odd multiples of 64
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _precompile_and_report():
    """Build every variant for this GPU in parallel up front (not one by one inside the cases)."""
    arch = jit.arch_for_device()
    jit.compile_many([(src, arch, d) for src, d, _ in mma.VARIANTS])
    yield
    write_error_report("QUICK_ERR_REPORT", ERRORS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def make_weights(k: int, n: int, g: int, dtype: torch.dtype, seed: int):
    """Random codes, positive scales and random zero points, generated and packed on the GPU."""
    gs = k if g == -1 else g
    gen = _gen(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda", dtype=torch.uint8)
    scales = ((torch.rand(k // gs, n, generator=gen, device="cuda") * 0.75 + 0.25) * (0.02 / 8)).to(dtype)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, device="cuda", dtype=torch.uint8)
    qw = QuantizedWeight(q, scales, zeros, g)
    return qw, get_layout("quick").pack(qw)


def _record(key: str, err: float) -> None:
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


def run_case(m, k, n, g, dtype, seed, *, kernel="auto", bias=False, config=None, splits=None, weights=None):
    qw, p = weights or make_weights(k, n, g, dtype, seed)
    gen = _gen(seed + 1)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype) if bias else None
    out = poisoned((m, n), dtype, "cuda")
    args = (x, p["qweight"], p["scales"], p["zeros"], g, b)
    if kernel == "gemv":
        mma.gemv(*args, config=config, splits=splits, out=out)
    elif kernel == "gemm":
        mma.gemm(*args, config=config, splits=splits, out=out)
    else:
        select.matmul("quick", *args, out=out)
    torch.cuda.synchronize()
    ref = reference_matmul(x, qw, b)
    err = rel_error(out, ref)
    if kernel == "auto":  # the kernel select.matmul chose, for the error report
        path = select.choose(select.Problem("quick", m, n, k, k if g == -1 else g, dtype, x.device)).kernel
    else:
        path = kernel
    _record(f"{str(dtype).split('.')[-1]}/{path}", err)
    assert torch.isfinite(out).all(), f"NaN/inf in output (unwritten elements?) m={m} k={k} n={n} g={g}"
    assert err < REL_BOUND[dtype], f"rel error {err:.3e} >= {REL_BOUND[dtype]} (m={m} k={k} n={n} g={g} {dtype})"
    return out, x, b


# ---------------------------------------------------------------------------------------- every M, every shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_m_4096(dtype):
    """All M of the issue on 4096 x 4096 g128, both dtypes, through the automatic kernel choice."""
    w = make_weights(4096, 4096, 128, dtype, 11)
    for i, m in enumerate(M_ALL):
        run_case(m, 4096, 4096, 128, dtype, 100 + i, weights=w, bias=(i % 3 == 0))


@pytest.mark.parametrize(
    "k,n,g,dtype",
    [
        (4096, 11008, 32, torch.float16),
        (4096, 11008, 128, torch.bfloat16),
        (11008, 4096, 64, torch.float16),
        (11008, 4096, 128, torch.bfloat16),
        (8192, 8192, 128, torch.float16),
        (8192, 8192, 64, torch.bfloat16),
        (5120, 13824, 128, torch.float16),
        (5120, 13824, -1, torch.bfloat16),
    ],
)
def test_big_shapes(k, n, g, dtype):
    w = make_weights(k, n, g, dtype, k + n + g)
    for i, m in enumerate((1, 8, 16, 33, 100, 256, 1000)):
        run_case(m, k, n, g, dtype, 7 * i + 1, weights=w, bias=(i == 2))


@pytest.mark.parametrize("k,n", SMALL_SHAPES)
@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_small_odd_shapes(k, n, g):
    if g > 0 and k % g:
        pytest.skip("K not a multiple of the group (the error is tested separately)")
    for i, m in enumerate((1, 3, 8, 17, 100)):
        dtype = DTYPES[i % 2]
        run_case(m, k, n, g, dtype, 31 * i + k + n, bias=(i % 2 == 1))


# ---------------------------------------------------------------------------------- every variant and split-k


@pytest.mark.parametrize("name", sorted(mma.GEMM_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_gemm_config_and_split(name, dtype):
    """Each compiled GEMM tile with forced split-k 1/2/3 (ragged), M tails and an n-block tail."""
    cfg = mma.GEMM_CONFIGS[name]
    k = max(6 * cfg.bks, 512)  # >= 3 stages for 3 splits
    n = cfg.bn * 2 + 64  # last CTA column block partly outside N
    w = make_weights(k, n, 64, dtype, 5)
    for splits, m in ((1, cfg.bm + 5), (2, 3), (3, 2 * cfg.bm + 1)):
        run_case(
            m, k, n, 64, dtype, 17 * splits, kernel="gemm", config=cfg, splits=splits, weights=w, bias=(splits == 3)
        )


@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_groups_and_splits(g, dtype):
    """Every GEMV scale-ring variant; per-channel groups cross the warps' k runs; splits 1/2/3."""
    k, n = 2048 + 64 * 3 if g in (32, 64) else 2048, 640
    w = make_weights(k, n, g, dtype, 3)
    for m, splits in ((1, 1), (4, 2), (8, 3), (5, None)):
        run_case(m, k, n, g, dtype, m * 13 + (splits or 0), kernel="gemv", splits=splits, weights=w, bias=(m == 4))


def test_gemm_handles_small_m_too():
    """The GEMM must also be right for M <= 8 (the benchmark times it there)."""
    for m in (1, 2, 7, 8):
        run_case(m, 4096, 4096, 128, torch.float16, 900 + m, kernel="gemm")


# ------------------------------------------------------------------------------ determinism and integration


def test_split_k_is_deterministic():
    qw, p = make_weights(8192, 1024, 128, torch.float16, 77)
    x = torch.randn(16, 8192, device="cuda", dtype=torch.float16)
    for kern, kw in (("gemm", {"splits": 5}), ("gemv", {"splits": 4})):
        xx = x if kern == "gemm" else x[:8].contiguous()
        fn = mma.gemm if kern == "gemm" else mma.gemv
        a = fn(xx, p["qweight"], p["scales"], p["zeros"], 128, **kw)
        b = fn(xx, p["qweight"], p["scales"], p["zeros"], 128, **kw)
        assert torch.equal(a, b), f"{kern} split-k is not bitwise reproducible"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_quicklinear_reference_backend(dtype):
    from quick.nn.linear import QuickLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, bias=True)
    mod = QuickLinear.from_linear(lin, 64, dtype=dtype).cuda()
    x = torch.randn(3, 5, 1024, device="cuda", dtype=dtype)
    assert dispatch.kernel_for("quick", x) is not None
    mod.backend = "kernel"
    out_k = mod(x)
    mod.backend = "reference"
    out_r = mod(x)
    assert out_k.shape == out_r.shape == (3, 5, 768)
    assert rel_error(out_k, out_r) < REL_BOUND[dtype]
    mod.backend = "auto"
    assert rel_error(mod(x[:, :1]), out_r[:, :1]) < REL_BOUND[dtype]  # decode shape, a strided view


def test_opcheck():
    qw, p = make_weights(256, 192, 64, torch.float16, 1)
    for m in (4, 40):
        x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
        b = torch.randn(192, device="cuda", dtype=torch.float16)
        torch.library.opcheck(torch.ops.quick.gemm_w4a16.default, (x, p["qweight"], p["scales"], p["zeros"], 64, b))


def test_torch_compile():
    qw, p = make_weights(512, 256, 128, torch.bfloat16, 2)

    def f(x):
        return torch.relu(torch.ops.quick.gemm_w4a16(x, p["qweight"], p["scales"], p["zeros"], 128)) * 2

    cf = torch.compile(f, fullgraph=True)
    for m in (3, 24):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        ref = torch.relu(reference_matmul(x, qw)) * 2
        assert rel_error(cf(x), ref) < REL_BOUND[torch.bfloat16]


def test_cuda_graph_capture():
    qw, p = make_weights(4096, 512, 128, torch.float16, 4)
    for m in (2, 16):  # the GEMM with split-k (workspace allocated inside the graph)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        ops.gemm_w4a16(x, p["qweight"], p["scales"], p["zeros"], 128)  # warm-up: compile and load
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = torch.ops.quick.gemm_w4a16(x, p["qweight"], p["scales"], p["zeros"], 128)
        x.copy_(torch.randn(m, 4096, device="cuda", dtype=torch.float16))
        g.replay()
        torch.cuda.synchronize()
        assert rel_error(y, reference_matmul(x, qw)) < REL_BOUND[torch.float16]
    x = torch.randn(3, 4096, device="cuda", dtype=torch.float16)
    mma.gemv(x, p["qweight"], p["scales"], p["zeros"], 128, splits=2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mma.gemv(x, p["qweight"], p["scales"], p["zeros"], 128, splits=2)
    x.copy_(torch.randn(3, 4096, device="cuda", dtype=torch.float16))
    g.replay()
    torch.cuda.synchronize()
    assert rel_error(y, reference_matmul(x, qw)) < REL_BOUND[torch.float16]


def test_m_zero_and_batched_op():
    qw, p = make_weights(128, 64, 32, torch.float16, 6)
    x = torch.empty(0, 128, device="cuda", dtype=torch.float16)
    assert select.matmul("quick", x, p["qweight"], p["scales"], p["zeros"], 32).shape == (0, 64)
    x3 = torch.randn(2, 3, 128, device="cuda", dtype=torch.float16)
    y = torch.ops.quick.gemm_w4a16(x3, p["qweight"], p["scales"], p["zeros"], 32)
    assert y.shape == (2, 3, 64)
    assert rel_error(y.reshape(6, 64), reference_matmul(x3.reshape(6, 128), qw)) < REL_BOUND[torch.float16]


# ----------------------------------------------------------------------------------------------- bad inputs


def _good(k=256, n=128, g=64, dtype=torch.float16):
    qw, p = make_weights(k, n, g, dtype, 9)
    x = torch.randn(4, k, device="cuda", dtype=dtype)
    return x, p


def test_bad_dtypes():
    x, p = _good()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        select.matmul("quick", x.float(), p["qweight"], p["scales"], p["zeros"], 64)
    with pytest.raises(TypeError, match="int32"):
        select.matmul("quick", x, p["qweight"].to(torch.int64), p["scales"], p["zeros"], 64)
    with pytest.raises(TypeError, match="scales"):
        select.matmul("quick", x, p["qweight"], p["scales"].to(torch.bfloat16), p["zeros"], 64)
    with pytest.raises(TypeError, match="bias"):
        select.matmul("quick", x, p["qweight"], p["scales"], p["zeros"], 64, torch.zeros(128, device="cuda"))


def test_bad_layout_and_alignment():
    x, p = _good()
    with pytest.raises(ValueError, match="contiguous"):
        mma.gemm(torch.randn(256, 4, device="cuda", dtype=torch.float16).t(), p["qweight"], p["scales"], p["zeros"], 64)
    with pytest.raises(ValueError, match="on cpu"):
        select.matmul("quick", x.cpu(), p["qweight"], p["scales"], p["zeros"], 64)
    with pytest.raises(ValueError, match="cuda"):
        select.matmul("quick", x, p["qweight"].cpu(), p["scales"], p["zeros"], 64)
    # contiguous, 2 bytes off a 16-byte boundary, 32 rows: the GEMM refuses it; the automatic entry copies such an x
    # to dense rows (as the decode kernel always did) and gives the right product
    buf = torch.randn(32 * 256 + 1, device="cuda", dtype=torch.float16)
    misaligned = buf[1:].view(32, 256)
    with pytest.raises(ValueError, match="16-byte aligned"):
        mma.gemm(misaligned, p["qweight"], p["scales"], p["zeros"], 64)
    qw, _p = make_weights(256, 128, 64, torch.float16, 9)  # _good()'s weights
    got = select.matmul("quick", misaligned, p["qweight"], p["scales"], p["zeros"], 64)
    assert rel_error(got, reference_matmul(misaligned, qw)) < REL_BOUND[torch.float16]


def test_bad_shapes_and_groups():
    x, p = _good()
    with pytest.raises(ValueError, match="multiples of 64"):
        select.matmul("quick", x[:, :240].contiguous(), p["qweight"][:15], p["scales"], p["zeros"], 64)
    with pytest.raises(ValueError, match="k16 rows"):
        select.matmul("quick", x[:, :192].contiguous(), p["qweight"], p["scales"], p["zeros"], 64)
    with pytest.raises(ValueError, match="unsupported group_size"):
        select.matmul("quick", x, p["qweight"], p["scales"], p["zeros"], 48)
    with pytest.raises(ValueError, match="scales has shape"):
        select.matmul("quick", x, p["qweight"], p["scales"], p["zeros"], 32)
    # K = 4160 = 64 * 65 is not a multiple of 128: group 128 must be refused with a clear message
    qw, p2 = make_weights(4160, 64, 64, torch.float16, 10)
    x2 = torch.randn(2, 4160, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        select.matmul("quick", x2, p2["qweight"], p2["scales"], p2["zeros"], 128)
    with pytest.raises(ValueError, match="GEMV handles M <= 8"):
        mma.gemv(torch.randn(9, 256, device="cuda", dtype=torch.float16), p["qweight"], p["scales"], p["zeros"], 64)
