"""Device correctness of the sm_90 QUICK kernel (wgmma, register-A weights) against a float64 reference, and of the
layout's automatic entry (``select.matmul("quick_sm90", ...)``: the decode kernel or the wgmma GEMM, as chosen).

Skipped without an sm_90 GPU. Fresh random inputs per case, NaN-poisoned outputs, relative Frobenius bounds
from quick.testing (which fail on any indexing error), NaN/inf checks, bitwise determinism of split-k.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, M_ALL, require_sm90
from helpers import check_output as _check

from quick.formats.layouts import get_layout
from quick.kernels import ops, select  # noqa: F401  (ops registers torch.ops.quick.*)
from quick.testing import poisoned, random_quantized, reference_matmul

pytestmark = pytest.mark.gpu

require_sm90("quick.kernels.wgmma", "sm_90 kernel")

from quick.kernels import wgmma as sm  # noqa: E402

_CACHE: dict = {}


def _weights(k: int, n: int, g: int, dtype: torch.dtype):
    key = (k, n, g, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        qw = random_quantized(k, n, g, dtype, "cpu", torch.Generator().manual_seed(hash(key) % 2**31))
        qw = type(qw)(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.group_size)
        _CACHE[key] = (qw, get_layout("quick_sm90").pack(qw))
    return _CACHE[key]


PATHS = ["wgmma", "auto"]  # the GEMM itself; the layout's automatic entry (the decode kernel at small M)


def _run(m, k, n, g, dtype, bias=False, config=None, splits=None, path="wgmma"):
    qw, p = _weights(k, n, g, dtype)
    x = torch.randn(m, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    out = poisoned((m, n), dtype, "cuda")
    if path == "auto":
        assert config is None and splits is None, "the automatic entry makes its own choice"
        select.matmul("quick_sm90", x, p["qweight"], p["scales"], p["zeros"], g, b, out=out)
    else:
        sm.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], g, b, config, splits, out)
    torch.cuda.synchronize()
    return out, reference_matmul(x, qw, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", M_ALL)
def test_all_batch_sizes(m, dtype, path):
    out, ref = _run(m, 4096, 4096, 128, dtype, path=path)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096), (8192, 8192), (5120, 13824)])
@pytest.mark.parametrize("m", [1, 17, 128, 1000])
@pytest.mark.parametrize("path", PATHS)
def test_model_shapes(path, m, k, n, dtype):
    out, ref = _run(m, k, n, 128, dtype, path=path)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(192, 320), (320, 192), (64, 64), (448, 576), (576, 64)])
@pytest.mark.parametrize("g", [32, 64])
@pytest.mark.parametrize("m", [1, 7, 100, 255])
@pytest.mark.parametrize("path", PATHS)
def test_small_odd_shapes(path, m, k, n, g, dtype):
    out, ref = _run(m, k, n, g, dtype, path=path)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("m", [1, 64, 256])
@pytest.mark.parametrize("path", PATHS)
def test_group_sizes(path, m, g, dtype):
    out, ref = _run(m, 4096, 4096, g, dtype, path=path)
    _check(out, ref, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias(dtype, path):
    out, ref = _run(5, 1024, 512, 128, dtype, bias=True, path=path)
    _check(out, ref, dtype)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_forced_split_k(splits):
    out, ref = _run(33, 4160, 1088, 64, torch.float16, splits=splits)
    _check(out, ref, torch.float16)


@pytest.mark.parametrize(
    "cfg",
    [sm.Sm90Config(8, 1, 8, 8, 6), sm.Sm90Config(32, 2, 8, 4, 4), sm.Sm90Config(128, 2, 6, 2, 2)],
)
def test_alternative_configs(cfg):
    out, ref = _run(200, 2048, 1536, 128, torch.bfloat16, config=cfg)
    _check(out, ref, torch.bfloat16)


def test_split_k_is_deterministic():
    qw, p = _weights(4096, 4096, 128, torch.float16)
    x = torch.randn(16, 4096, device="cuda").half()
    outs = [sm.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], 128, splits=5) for _ in range(4)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_custom_op_and_cuda_graph():
    qw, p = _weights(1024, 512, 128, torch.float16)
    x = torch.randn(4, 1024, device="cuda").half()
    eager = torch.ops.quick.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], None, 128)
    _check(eager, reference_matmul(x, qw), torch.float16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.quick.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], None, 128)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(out, reference_matmul(x, qw), torch.float16)
