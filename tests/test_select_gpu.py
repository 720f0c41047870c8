"""Device checks of the kernel selection layer (``quick.kernels.select``).

Every candidate ``select.candidates`` can pick for a grid of problems (both W4A16 layouts, decode to prefill batch
sizes, model layer shapes, fp16 and bf16) runs through ``select.matmul(..., choice=c)`` into a NaN-poisoned output
and is checked against the float64 reference of dequantize-then-matmul (quick.testing bounds, NaN/inf checks), as is
the automatic choice. The autotune path: the first eager call of a new shape times its candidates and writes the
per-GPU cache, later calls (and later processes) read it without timing, and nothing is timed inside CUDA-graph
capture. Skipped without an sm_80+ GPU and nvcc (the ``quick_sm90`` layout also needs an sm_90 GPU).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import DTYPES, require_sm80_and_nvcc
from helpers import check_output as _check

from quick.formats.layouts import get_layout
from quick.kernels import select
from quick.testing import poisoned, random_quantized, reference_matmul

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

from quick.kernels import attention as at  # noqa: E402
from quick.kernels import autotune, jit, tuning  # noqa: E402
from quick.kernels import wgmma as sm  # noqa: E402
from quick.testing import kernel_cases as vc  # noqa: E402

LAYOUTS = ["quick_sm90", "quick"]  # the W4A16 layouts
GRID_M = [1, 3, 8, 16, 24, 64, 100, 256, 1024]
GRID_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (2048, 1536), (5120, 13824)]  # (K, N)
G = 128
_CACHE: dict = {}


def _sm90() -> bool:
    return torch.cuda.get_device_capability() == (9, 0) and sm.is_available()


def _need(layout: str) -> None:
    if layout == "quick_sm90" and not _sm90():
        pytest.skip("the quick_sm90 layout's kernels need an sm_90 GPU")


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Build every variant the grid can launch in parallel up front (the wgmma candidates include tiles outside
    the precompiled list), not one by one inside the cases."""
    fused = {"QD_ACT", "QD_NORM", "QD_PDL"}  # decode-path variants and the attention kernel: not launched here
    jobs = [j for j in vc.compile_jobs(jit.arch_for_device()) if j[0] != at.SOURCE and not fused & j[2].keys()]
    if _sm90():
        cfgs = set()
        for (k, n), m, dt in ((s, m, dt) for s in GRID_SHAPES for m in GRID_M for dt in DTYPES):
            p = select.Problem("quick_sm90", m, n, k, G, dt, torch.device("cuda", torch.cuda.current_device()))
            try:
                cands = select.candidates(p)
            except Exception:  # noqa: BLE001 - test_every_candidate_is_correct reports it for its problem
                continue
            cfgs |= {(c.config, dt) for c in cands if c.kernel == "wgmma" and c.config is not None}
        jobs += [(sm.SOURCE, "sm_90a", cfg.defines(G, dt)) for cfg, dt in cfgs]
    jit.compile_many(jobs, workers=os.cpu_count())


def _weights(k: int, n: int, dtype: torch.dtype, layout: str):
    """Random codes for (k, n, dtype) on the GPU, packed per layout on demand; one shape kept at a time."""
    key = (k, n, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        qw = random_quantized(k, n, G, dtype, "cpu", torch.Generator().manual_seed(k * 31 + n + (dtype == DTYPES[1])))
        _CACHE[key] = (type(qw)(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.group_size), {})
    qw, packs = _CACHE[key]
    if layout not in packs:
        packs[layout] = get_layout(layout).pack(qw)
    return qw, packs[layout]


def _args(p: dict) -> tuple:
    return p["qweight"], p["scales"], p["zeros"], G


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", GRID_SHAPES)
def test_every_candidate_is_correct(k, n, dtype, layout):
    """Each candidate of each batch size, and the automatic choice, against the float64 reference."""
    _need(layout)
    qw, packed = _weights(k, n, dtype, layout)
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    checked = 0
    for m in GRID_M:
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        ref = reference_matmul(x, qw)
        prob = select.prepare(layout, x, *_args(packed), None)[0]
        cands = select.candidates(prob)
        assert cands and len(cands) <= select.MAX_CANDIDATES, (m, cands)
        for c in [*cands, None]:  # None: select.matmul's own choice
            out = poisoned((m, n), dtype, "cuda")
            got = select.matmul(layout, x, *_args(packed), choice=c, out=out)
            torch.cuda.synchronize()
            assert got.data_ptr() == out.data_ptr(), f"{c} did not write into out"
            try:
                _check(out, ref, dtype)
            except AssertionError as err:
                what = select.choose(prob).describe() if c is None else c.describe()
                raise AssertionError(f"{layout} M={m} K={k} N={n} {dtype}: {what}: {err}") from None
            checked += 1
    assert checked >= 2 * len(GRID_M)


# ------------------------------------------------------------------------------------------------ autotune


def _tune_layout() -> str:
    return "quick_sm90" if _sm90() else "quick"


def _cache_file(tmp_path: Path) -> Path:
    return tmp_path / f"{tuning.gpu_key(torch.cuda.get_device_name(torch.cuda.current_device()))}.autotune.json"


@pytest.fixture
def _autotune_on(tmp_path, monkeypatch):
    """Autotune on, its cache in ``tmp_path``, no table or override in the way; choices forgotten before and after."""
    monkeypatch.setenv("QUICK_AUTOTUNE", "1")
    monkeypatch.setenv("QUICK_TUNING_DIR", str(tmp_path))
    monkeypatch.setenv("QUICK_TUNING", "0")  # a measured table would be read before the autotune cache
    monkeypatch.delenv("QUICK_KERNEL", raising=False)
    select.clear()
    yield tmp_path
    select.clear()


def test_autotune_first_call_times_and_writes_the_cache_then_reads_it(_autotune_on, monkeypatch):
    tmp_path = _autotune_on
    layout, k, n, m, dtype = _tune_layout(), 3072, 2560, 24, torch.float16  # a shape no other test uses
    qw, packed = _weights(k, n, dtype, layout)
    x = torch.randn(m, k, device="cuda").to(dtype)
    prob = select.prepare(layout, x, *_args(packed), None)[0]
    assert len(select.candidates(prob)) > 1  # one candidate alone is taken without timing
    real, timed = autotune.time_candidates, []
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **kw: timed.append(1) or real(*a, **kw))
    out = poisoned((m, n), dtype, "cuda")
    select.matmul(layout, x, *_args(packed), out=out)
    torch.cuda.synchronize()
    assert timed == [1]
    _check(out, reference_matmul(x, qw), dtype)
    path = _cache_file(tmp_path)
    assert path.is_file(), sorted(p.name for p in tmp_path.iterdir())
    entries = json.loads(path.read_text())["entries"]
    assert [(e["layout"], e["K"], e["N"], e["M"], e["dtype"]) for e in entries] == [(layout, k, n, 32, "float16")]
    c = select.choose(prob)
    assert c.source == "autotune" and c.kernel == entries[0]["kernel"] and c.splits == entries[0]["splits"]
    out = poisoned((m, n), dtype, "cuda")
    select.matmul(layout, x, *_args(packed), choice=c, out=out)
    _check(out, reference_matmul(x, qw), dtype)

    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **kw: pytest.fail("timed a second time"))
    for rows in (m, 30):  # the same call again, and another M of the same batch bucket
        xr = torch.randn(rows, k, device="cuda").to(dtype)
        out = poisoned((rows, n), dtype, "cuda")
        select.matmul(layout, xr, *_args(packed), out=out)
        _check(out, reference_matmul(xr, qw), dtype)
    select.clear()  # a new process: nothing in memory, the file stays
    again = select.choose(prob, (x, *_args(packed)[:3]))
    assert (again.kernel, again.config, again.splits, again.source) == (c.kernel, c.config, c.splits, "autotune")


def test_autotune_nothing_is_timed_during_graph_capture(_autotune_on, monkeypatch):
    tmp_path = _autotune_on
    layout, k, n, m, dtype = _tune_layout(), 3072, 2560, 48, torch.bfloat16
    qw, packed = _weights(k, n, dtype, layout)
    x = torch.randn(m, k, device="cuda").to(dtype)
    prob = select.prepare(layout, x, *_args(packed), None)[0]
    assert len(select.candidates(prob)) > 1
    select.matmul(layout, x, *_args(packed), choice=select.candidates(prob)[0])  # loads the model's kernel, untimed
    torch.cuda.synchronize()
    real = autotune.time_candidates
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **kw: pytest.fail("timed under graph capture"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select.matmul(layout, x, *_args(packed))
    x.copy_(torch.randn(m, k, device="cuda").to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, reference_matmul(x, qw), dtype)
    assert autotune.lookup(prob.device, layout, k, n, m, G, dtype) is None
    assert not _cache_file(tmp_path).exists()
    # the model's pick made under capture is not kept: the next eager call times
    timed = []
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **kw: timed.append(1) or real(*a, **kw))
    select.matmul(layout, x, *_args(packed))
    assert timed == [1] and select.choose(prob).source == "autotune"


def test_autotune_times_every_candidate_as_a_graph_replay():
    """Each candidate is captured into a CUDA graph for timing (an eager fallback warns): launch cost is left out."""
    layout, k, n, m, dtype = _tune_layout(), 4096, 4096, 64, torch.float16
    qw, packed = _weights(k, n, dtype, layout)
    x = torch.randn(m, k, device="cuda").to(dtype)
    prob, (xp, weights, _bias) = select.prepare(layout, x, *_args(packed)[:3], G, None)
    cands = select.candidates(prob)
    assert len(cands) > 1

    def run(c, out):
        return select.KERNELS[c.kernel].run(prob, c, xp, tuple(weights), None, out)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "could not be captured" or a failing candidate
        times = autotune.time_candidates(run, cands, (m, n), dtype, prob.device)
    assert all(t is not None and 0 < t < 1e4 for t in times), times
