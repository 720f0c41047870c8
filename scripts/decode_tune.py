#!/usr/bin/env python3
"""Decode tuning, one device call (< 6 minutes on the H100): build every candidate variant of the two W4A16
kernels (mma.sync ``quick`` and Hopper ``quick_sm90``), check each against the float64 reference, time them at
M in {1, 8, 16, 32, 64, 128, 256} on K = N = 8192 and the Llama shapes, and measure the streaming floor.

    OUT=$OUT timeout 420 python3 scripts/decode_tune.py [--budget-s 330] [--parts ncu,floor,check,mma,sm90,clean]

Parts: ``ncu`` (if Nsight Compute is installed: DRAM bytes read/written by the probe kernel right after each
flush, ``--cache-control none``: the direct test of the write-back claim), ``floor``, ``check`` (in a child
process), ``mma`` and ``sm90`` (the sweeps, shapes outermost, stopped by the budget), ``clean``.

Timing (the official numbers, as benchmarks/kernel.py): median of ``triton.testing.do_bench`` over CUDA-graph
replays of one call, L2 flushed before every repetition by do_bench (a 256 MB ``zero_``).

The floor part answers "what does a plain read of these bytes cost under that timing": a hand-written read-only
streaming kernel (``csrc/quick_stream_probe.cu``: 16-byte ``ld.global.nc``, 4-16 loads in flight per thread, 1-16
CTAs per SM) and ``torch.sum`` over the same bytes, each timed with four flushes: ``memset`` (do_bench's:
leaves the L2 full of dirty lines), ``read`` (reading a 256 MB buffer: leaves clean lines), ``memset+read``, and
``none`` (hot L2, reference only). The ``clean`` part times the tuned kernels and cuBLAS under the ``read`` flush.

Writes ``$OUT/decode_tune.json`` (updated after every part) and ``$OUT/decode_tune.log``; the last lines printed are
a summary table. Every correctness check draws fresh random data, poisons the output with NaN and compares to the
float64 reference (``quick.testing``); failures are counted and printed, never hidden.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from common import warm_up_for_capture  # noqa: E402  (benchmarks/common.py)

from quick.kernels import jit, quick_mma  # noqa: E402
from quick.kernels import quick_sm90 as sm  # noqa: E402
from quick.packing.layouts import get_layout  # noqa: E402
from quick.quant.primitives import QuantizedWeight  # noqa: E402
from quick.testing import REL_BOUND, poisoned, random_quantized, reference_matmul, rel_error  # noqa: E402

MS = (1, 8, 16, 32, 64, 128, 256)
SHAPES = ((8192, 8192), (4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
GROUP = 128
PROBE = "quick_stream_probe.cu"

# ------------------------------------------------------------------------------------------ candidates

_G = quick_mma.GEMM_CONFIGS
R = dataclasses.replace
# New mma.sync variants: in-kernel split-k (ir), L2 prefetch of the weights D stages ahead (pfD), deeper register
# ring (r3/r4 = PF stages), more warps splitting K.
MMA_NEW = [
    R(_G["m16n2k4"], name="m16n2k4_ir", inred=1),
    R(_G["m16n2k4"], name="m16n2k4_ir_l4", inred=1, l2pf=4),
    R(_G["m16n2k4"], name="m16n2k4_ir_l8", inred=1, l2pf=8),
    R(_G["m16n2k4"], name="m16n2k4_ir_r3", inred=1, pf=3),
    R(_G["m16k8"], name="m16k8_ir", inred=1),
    R(_G["m16k8"], name="m16k8_ir_l4", inred=1, l2pf=4),
    R(_G["m16k4"], name="m16k4_ir_l8", inred=1, l2pf=8),
    quick_mma.GemmConfig("m16n1k8_ir", 16, 1, 1, 8, 1, 2, 4, 4, minb=2, inred=1),
    quick_mma.GemmConfig("m16n4k2_ir", 16, 1, 4, 2, 1, 4, 3, 2, inred=1),
    R(_G["m32k8"], name="m32k8_ir", inred=1),
    R(_G["m32k8"], name="m32k8_ir_l4", inred=1, l2pf=4),
    R(_G["m64n4"], name="m64n4_ir", inred=1),
    R(_G["m64n4"], name="m64n4_ir_l6", inred=1, l2pf=6),
    # weights through the cp.async stages (ws): STAGES - 1 tiles of weights in flight, precise waits
    quick_mma.GemmConfig("m16n2k4_ws", 16, 1, 2, 4, 1, 4, 5, 1, inred=1, wsmem=1),
    quick_mma.GemmConfig("m16n2k4_ws_l8", 16, 1, 2, 4, 1, 4, 5, 1, inred=1, wsmem=1, l2pf=8),
    quick_mma.GemmConfig("m16n2k2_ws", 16, 1, 2, 2, 1, 4, 6, 1, minb=2, inred=1, wsmem=1),
    quick_mma.GemmConfig("m16n4k2_ws", 16, 1, 4, 2, 1, 4, 6, 1, inred=1, wsmem=1),
    quick_mma.GemmConfig("m16k8_ws", 16, 1, 1, 8, 1, 4, 4, 1, inred=1, wsmem=1),
    quick_mma.GemmConfig("m32k4_ws", 32, 1, 1, 4, 1, 4, 6, 1, inred=1, wsmem=1),
    quick_mma.GemmConfig("m64n4_ws", 64, 1, 4, 1, 1, 4, 6, 1, inred=1, wsmem=1),
]
# evict_first twins (ef): the weights' L2 lines are replaced first (clean), not the lines already there
_EF_OF = ["m16n2k4_ir", "m16n2k4_ir_l8", "m16k8_ir", "m16n2k4_ws", "m16n2k4_ws_l8", "m16n2k2_ws", "m16k8_ws"]
_EF_OF += ["m32k8_ir", "m32k4_ws", "m64n4_ir", "m64n4_ws"]
MMA_NEW += [R(next(c for c in MMA_NEW if c.name == n), name=n + "_ef", ef=1) for n in _EF_OF]
MMA_ALL = {c.name: c for c in [*_G.values(), *MMA_NEW]}


def mma_candidates(m: int, full: bool = True) -> list[tuple[str, int | None]]:
    """(config name, splits) timed at batch size m; ``full`` = False (secondary shapes): without the L2-prefetch
    distances, deeper rings and odd warp shapes, and nothing at M = 8 (the M = 1 and 16 tiles are the same)."""
    ws16 = ["m16n2k4_ws", "m16n2k4_ws_l8", "m16n2k2_ws", "m16n4k2_ws", "m16k8_ws"]
    ef16 = ["m16n2k4_ir_ef", "m16n2k4_ir_l8_ef", "m16k8_ir_ef", "m16n2k4_ws_ef", "m16n2k4_ws_l8_ef"]
    ef16 += ["m16n2k2_ws_ef", "m16k8_ws_ef"]
    if m <= 16:
        names = ["m16n2k4", "m16k8", "m16n2k4_ir", "m16n2k4_ir_l4", "m16n2k4_ir_l8", "m16n2k4_ir_r3", "m16k8_ir"]
        names += ["m16k8_ir_l4", "m16k4_ir_l8", "m16n1k8_ir", "m16n4k2_ir", *ws16, *ef16]
        splits = (1, 2, 4)
    elif m <= 32:
        names = ["m32k8", "m32k8_ir", "m32k8_ir_l4", "m16n2k4_ir", "m16n2k4_ir_l4", "m64n4_ir", "m32k4_ws", *ws16]
        names += ["m32k8_ir_ef", "m32k4_ws_ef", "m16n2k4_ws_ef", "m16k8_ws_ef"]
        splits = (1, 2, 4)
    elif m <= 64:
        names = ["m64n4", "m64n4_ir", "m64n4_ir_l6", "m32k8_ir", "m32k8_ir_l4", "m64n4_ws", "m32k4_ws"]
        names += ["m64n4_ir_ef", "m64n4_ws_ef", "m32k4_ws_ef"]
        splits = (2, 4, 8)
    else:
        names = ["m64n4", "m64n4_ir", "m64n4_ir_l6", "m128n4", "m64n4_ws", "m64n4_ir_ef", "m64n4_ws_ef"]
        splits = (1, 2, 4)
    if not full:
        if m == 8:
            return []
        drop = ("_l4", "_l6", "_r3", "n1k8", "n4k2", "m16k4_")
        names = [n for n in names if not any(d in n for d in drop)]
    return [(n, s) for n in names for s in splits]


_D = sm._DEFAULTS


def sm90_candidates(m: int, full: bool = True) -> list[tuple[sm.Sm90Config, int | None]]:
    """(config, rounds policy or None = choose_splits) timed at batch size m: each pipeline's default tile, with
    and without the producer's L2 prefetch of the weights and the evict_first weight policy, 4 consumer
    warpgroups, weights through the TMA stages, half-height tiles. ``full`` = False: fewer split policies (the
    secondary shapes)."""
    nt = next(t for t in sm.TOKEN_TILES if t >= m)
    bases = [_D[pipe][nt] for pipe in ((0, 1, 2) if nt <= 128 else (0,))]
    if nt <= 16:  # 4 consumer warpgroups (112 registers each): groups of 2 steps, or a ring of 3 (0 spills)
        bases += [sm.Sm90Config(nt, 4, 8, 2, 2, 2), sm.Sm90Config(nt, 4, 8, 3, 3, 0)]
    # weights with x through the TMA stages (bulk copies): as many stages as fit next to the epilogue buffers
    wt_stages = {8: 24, 16: 24, 32: 16, 64: 12, 128: 8}
    if nt in wt_stages:
        bases.append(sm.Sm90Config(nt, 2, wt_stages[nt], 4, 4, 0, 0, 1))
        if nt <= 16:
            bases.append(sm.Sm90Config(nt, 4, 16, 2, 2, 0, 0, 1))
    policies = ((None, 1, 2, 3) if m <= 64 else (None, 1, 2)) if full else (None, 2)
    out = []
    if not full and m == 8:
        return out
    for base in bases:
        for l2 in (0, 16):
            for ef in (0, 1):
                for rounds in policies:
                    out.append((R(base, l2pf=l2, ef=ef), rounds))
    if m >= 32:  # half-height token tiles (x read twice, smaller accumulators, deeper weight groups)
        for pipe in (0, 2):
            for l2 in (0, 16):
                for rounds in (None, 1, 2) if full else (None, 2):
                    out.append((R(_D[pipe][nt // 2], l2pf=l2), rounds))
    return out


# Window-2 plan (``--parts w2``, or DECODE_PLAN=w2 in a check child): the finalists after window 1 on the cells
# that set the tables. Window 1 measured the floor (probe 18.7 us under do_bench's flush for 35.7 MB) and checked
# 51 variants (all passed); Sm90Config(nt=8, nwg=4, pipe=2) hung there (setmaxnreg.inc asked for more registers
# than the pool had: fixed in the kernel) and is checked again, last.
PLAN = os.environ.get("DECODE_PLAN", "full")
W2_CELLS = [((8192, 8192), (1, 16, 32, 64, 128, 256)), ((4096, 4096), (1, 16, 64))]


# Variants that passed every float64 check on the H100 in window 1 (decode_check.jsonl of that run, kernel sources
# unchanged since): the window-2 plan does not check them again.
W1_PASSED = {
    "m128n4",
    "m16k4",
    "m16k4_ir_l8",
    "m16k8",
    "m16k8_ir",
    "m16k8_ir_ef",
    "m16k8_ir_l4",
    "m16k8_ws",
    "m16k8_ws_ef",
    "m16n1k8_ir",
    "m16n2k2_ws",
    "m16n2k2_ws_ef",
    "m16n2k4",
    "m16n2k4_ir",
    "m16n2k4_ir_ef",
    "m16n2k4_ir_l4",
    "m16n2k4_ir_l8",
    "m16n2k4_ir_l8_ef",
    "m16n2k4_ir_r3",
    "m16n2k4_ws",
    "m16n2k4_ws_ef",
    "m16n2k4_ws_l8",
    "m16n2k4_ws_l8_ef",
    "m16n4k2_ir",
    "m16n4k2_ws",
    "m32k4_ws",
    "m32k4_ws_ef",
    "m32k8",
    "m32k8_ir",
    "m32k8_ir_ef",
    "m32k8_ir_l4",
    "m64n4",
    "m64n4_ir",
    "m64n4_ir_ef",
    "m64n4_ir_l6",
    "m64n4_ws",
    "m64n4_ws_ef",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=1, l2pf=0, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=1, l2pf=0, wtma=0, ef=1)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=1, l2pf=16, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=1, l2pf=16, wtma=0, ef=1)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=2, l2pf=0, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=2, l2pf=0, wtma=0, ef=1)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=2, l2pf=16, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=6, pipe=2, l2pf=16, wtma=0, ef=1)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=8, pipe=0, l2pf=0, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=8, pipe=0, l2pf=0, wtma=0, ef=1)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=8, pipe=0, l2pf=16, wtma=0, ef=0)",
    "Sm90Config(nt=8, nwg=2, stages=8, grp=8, grp32=8, pipe=0, l2pf=16, wtma=0, ef=1)",
}


def mma_candidates_w2(m: int) -> list[tuple[str, int | None]]:
    if m <= 16:
        names = ["m16n2k4", "m16k8", "m16n2k4_ir", "m16k8_ir", "m16n2k4_ws", "m16k8_ws_ef", "m16n2k2_ws", "m16n1k8_ir"]
        return [(n, s) for n in names for s in (1, 2, 4)]
    if m <= 32:
        return [(n, s) for n in ("m32k8", "m32k8_ir", "m32k4_ws", "m16n2k4_ir", "m16k8_ws") for s in (1, 2, 4)]
    if m <= 64:
        return [(n, s) for n in ("m64n4", "m64n4_ir", "m64n4_ws", "m32k8_ir", "m32k4_ws") for s in (2, 4, 8)]
    return [(n, s) for n in ("m64n4", "m64n4_ir", "m64n4_ws") for s in (1, 2, 4)]


def sm90_candidates_w2(m: int) -> list[tuple[sm.Sm90Config, int | None]]:
    nt = next(t for t in sm.TOKEN_TILES if t >= m)
    wt_stages = {8: 24, 16: 24, 32: 16, 64: 12, 128: 8}
    out: list[tuple[sm.Sm90Config, int | None]] = []
    pipes = (0, 1, 2) if nt <= 128 else (0,)
    for pipe in pipes:
        for rounds in (None, 1, 2):
            out.append((_D[pipe][nt], rounds))
    if nt <= 128:
        for rounds in (1, 2):
            out.append((R(_D[2][nt], l2pf=16), rounds))
    if nt in wt_stages:
        for l2 in (0, 16):
            for rounds in (None, 1, 2):
                out.append((sm.Sm90Config(nt, 2, wt_stages[nt], 4, 4, 0, l2, 1), rounds))
    if m >= 32:
        for rounds in (None, 1, 2):
            out.append((_D[2 if nt // 2 <= 128 else 0][nt // 2], rounds))
    if nt <= 16:  # 4 consumer warpgroups (fixed register budget since window 1's hang), checked last
        for cfg in (sm.Sm90Config(nt, 4, 8, 3, 3, 0), sm.Sm90Config(nt, 4, 8, 2, 2, 2)):
            for rounds in (None, 1, 2):
                out.append((cfg, rounds))
    return out


def plan_cells() -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    return W2_CELLS if PLAN == "w2" else [(shape, MS) for shape in SHAPES]


def cell_candidates(which: str, m: int, k: int, n: int) -> list:
    full = (k, n) in SHAPES[:2]
    if which == "mma":
        return mma_candidates_w2(m) if PLAN == "w2" else mma_candidates(m, full=full)
    return sm90_candidates_w2(m) if PLAN == "w2" else sm90_candidates(m, full=full)


def planned_mma() -> dict:
    if PLAN != "w2":
        return MMA_ALL
    names = {name for _shape, ms in plan_cells() for m in ms for name, _ in mma_candidates_w2(m)}
    return {n: MMA_ALL[n] for n in MMA_ALL if n in names or n in ("m16n2k4", "m64n4")}


def planned_sm90() -> list:
    """Every sm90 config the plan times; 4-warpgroup configs last (a hang then costs only the check's tail)."""
    cfgs: dict = {}
    for _shape, ms in plan_cells():
        for m in ms:
            for cfg, _ in cell_candidates("sm90", m, *_shape):
                cfgs[cfg] = None
    return sorted(cfgs, key=lambda c: c.nwg == 4)


# ---------------------------------------------------------------------------------------------- timing


_SIDE: list = []


def graphed(fn):
    """fn captured into a CUDA graph after two warm-up calls (one on a side stream, as capture needs). Uses
    capture_begin/capture_end directly: torch.cuda.graph() also runs gc.collect() and empty_cache() on every
    capture, which made each of window 1's timings cost a good part of a second."""
    if not _SIDE:
        _SIDE.append(torch.cuda.Stream())
    side = _SIDE[0]
    warm_up_for_capture(fn, side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        g.capture_begin()
        try:
            fn()
        finally:
            g.capture_end()
    torch.cuda.synchronize()
    return lambda: g.replay()


def do_bench_us(fn, warmup=5, rep=20) -> float:
    """The official method: triton do_bench median (L2 flushed by a 256 MB zero_ before each repetition)."""
    import triton.testing as tt

    return 1e3 * tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


class Flushes:
    """The four L2 states a timed call can start from (see the module docstring)."""

    def __init__(self) -> None:
        self.buf = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
        self.sink = torch.zeros(4, dtype=torch.int32, device="cuda")
        self.reader = probe_launcher(self.buf, 8, 132 * 4, 512, self.sink, "flush")

    def get(self, name: str):
        return {
            "memset": lambda: self.buf.zero_(),
            "read": self.reader,
            "memset+read": lambda: (self.buf.zero_(), self.reader()),
            "none": lambda: None,
        }[name]


def bench_flush_us(fn, flush, reps: int = 60) -> float:
    """Median of CUDA-event timings of fn() with flush() before each repetition (do_bench's loop, any flush)."""
    for _ in range(3):
        flush()
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def probe_launcher(
    buf: torch.Tensor, unroll: int, blocks: int, threads: int, sink: torch.Tensor, name: str = "probe", ef: int = 0
):
    kern = jit.load_kernel(PROBE, f"quick_stream_{name}", {"QP_U": unroll, "QP_EF": ef})
    n16 = buf.numel() * buf.element_size() // 16
    return lambda: kern((blocks,), (threads,), [buf, ctypes.c_longlong(n16), sink])


# ------------------------------------------------------------------------------------------------ parts


class Ctx:
    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.t0, self.budget = out, time.time(), budget
        self.fh = open(out / "decode_tune.log", "w")
        self.res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.ok: set[str] | None = None  # variants that passed the checks (None: not checked, time everything)

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.fh.write(msg + "\n")
        self.fh.flush()

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "decode_tune.json").write_text(json.dumps(self.res, indent=1, default=str))


def _dtypes(cfg) -> tuple[torch.dtype, ...]:
    """bf16 is built and checked where its code differs: the L2-prefetch and evict_first twins change only how the
    weights are fetched (dtype-independent code), so they are checked in fp16 only."""
    return (torch.float16,) if cfg.l2pf or cfg.ef else (torch.float16, torch.bfloat16)


def build_all(ctx: Ctx) -> None:
    arch = jit.arch_for_device()
    jobs = [(PROBE, arch, {"QP_U": u, "QP_EF": ef}) for u in (4, 8, 16) for ef in (0, 1)]
    for c in planned_mma().values():
        for dt in _dtypes(c):
            jobs.append((quick_mma.GEMM_SOURCE, arch, c.defines(dt)))
    seen = set()
    for cfg in planned_sm90():
        for dt in _dtypes(cfg):
            d = cfg.defines(GROUP, dt)
            key = tuple(sorted(d.items()))
            if key not in seen:
                seen.add(key)
                jobs.append((sm.SOURCE, "sm_90a", d))
    t = time.time()

    def build(job):
        try:
            return jit.compile_cubin(*job)
        except jit.KernelUnavailable as e:  # recorded; the check then fails that variant
            return e

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        res = list(ex.map(build, jobs))
    errors = [(d, str(r)[-600:]) for (_s, _a, d), r in zip(jobs, res, strict=True) if isinstance(r, Exception)]
    ok = [(s, d, r) for (s, _a, d), r in zip(jobs, res, strict=True) if not isinstance(r, Exception)]
    spills = [(s, d, r.spills) for s, d, r in ok if r.spills]
    ctx.res["build"] = {"variants": len(jobs), "seconds": round(time.time() - t, 1), "spills": spills}
    ctx.res["build"]["errors"] = errors
    ctx.log(
        f"[build] {len(jobs)} variants in {time.time() - t:.0f} s; spills: {spills or 'none'}; errors: {len(errors)}"
    )
    for d, e in errors:
        ctx.log(f"[build] ERROR {d}: {e}")


def part_floor(ctx: Ctx, fl: Flushes) -> None:
    """Streaming probe + torch.sum over the weight bytes of 8192^2 and 4096^2, under each flush."""
    rows = []
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    for k, n in ((8192, 8192), (4096, 4096)):
        nbytes = k * n // 2 + 2 * 2 * (k // GROUP) * n
        buf = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
        half = buf.view(torch.float16)
        shapes = ((8, 4, 512, 0), (4, 8, 256, 0), (16, 2, 512, 0), (8, 1, 1024, 0), (4, 16, 256, 0))
        shapes += ((8, 4, 512, 1), (4, 8, 256, 1), (16, 2, 512, 1))  # evict_first loads
        for u, b, threads, ef in shapes:
            blocks = b * ctx.sms
            fn = graphed(probe_launcher(buf, u, blocks, threads, sink, ef=ef))
            row = {"kernel": "probe_ef" if ef else "probe", "U": u, "blocks": blocks, "threads": threads}
            row.update({"K": k, "N": n, "bytes": nbytes})
            row["do_bench_us"] = round(do_bench_us(fn), 2)
            for f in ("memset", "read", "memset+read", "none"):
                row[f] = round(bench_flush_us(fn, fl.get(f)), 2)
            rows.append(row)
            ctx.log(f"[floor] {row}")
        fn = graphed(lambda half=half: half.sum(dtype=torch.float32))
        row = {"kernel": "torch.sum", "K": k, "N": n, "bytes": nbytes, "do_bench_us": round(do_bench_us(fn), 2)}
        for f in ("memset", "read", "memset+read", "none"):
            row[f] = round(bench_flush_us(fn, fl.get(f)), 2)
        rows.append(row)
        ctx.log(f"[floor] {row}")
        del buf, half
    ctx.res["floor"] = rows
    ctx.save()


def part_pattern(ctx: Ctx, fl: Flushes) -> None:
    """Is the GEMMs' weight access order (many CTAs each reading 1-4 KB of every row, rows 64-256 KB apart) slower
    to stream than a sequential read of the same bytes? ``quick_stream_tiled`` reads the 8192^2 weights (32 MB) in
    the order of each kernel's CTAs, with no arithmetic."""
    k = n = 8192
    buf = torch.randint(-(2**31), 2**31 - 1, (k * n // 8,), dtype=torch.int32, device="cuda")
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    kern = jit.load_kernel(PROBE, "quick_stream_tiled", {"QP_U": 8, "QP_EF": 0})
    rows_q, row16_q = k // 16, n // 2  # quick layout: k16 rows of N/2 words
    rows_s, row16_s = k // 64, 2 * n  # quick_sm90 layout: k64 rows of 2N words
    cases = [  # name, row16, chunk16 (words per CTA and row), ncols, rows per CTA, threads
        ("quick m16n2k4 s=2 (1 KB chunks, 128 CTAs x 8 warps)", row16_q, 64, 64, rows_q // 2, 256),
        ("quick 1 KB chunks, 128 CTAs x 32 warps", row16_q, 64, 64, rows_q // 2, 1024),
        ("quick 1 KB chunks, 512 CTAs (s=8) x 8 warps", row16_q, 64, 64, rows_q // 8, 256),
        ("4 KB chunks, 128 CTAs x 8 warps", row16_q, 256, 16, rows_q // 8, 256),
        ("sm90 (4 KB of 256 KB rows, 256 units) x 8 warps", row16_s, 256, 64, rows_s // 4, 256),
    ]
    rows = []
    for name, row16, chunk16, ncols, rpc, threads in cases:
        assert chunk16 * ncols == row16
        blocks = ncols * (buf.numel() // 4 // row16 // rpc)
        args = [buf, row16, chunk16, ncols, rpc, sink]
        fn = graphed(lambda args=args, blocks=blocks, threads=threads: kern((blocks,), (threads,), args))
        row = {"pattern": name, "blocks": blocks, "threads": threads, "bytes": buf.numel() * 4}
        row["do_bench_us"] = round(do_bench_us(fn), 2)
        row["read"] = round(bench_flush_us(fn, fl.get("read")), 2)
        rows.append(row)
        ctx.log(f"[pattern] {row}")
    fn = graphed(probe_launcher(buf, 8, 4 * ctx.sms, 512, sink))
    row = {"pattern": "sequential probe, same 32 MB", "blocks": 4 * ctx.sms, "threads": 512, "bytes": buf.numel() * 4}
    row["do_bench_us"] = round(do_bench_us(fn), 2)
    row["read"] = round(bench_flush_us(fn, fl.get("read")), 2)
    rows.append(row)
    ctx.log(f"[pattern] {row}")
    ctx.res["pattern"] = rows
    ctx.save()


def check_child(progress: Path, skip: set[str]) -> int:
    """Every candidate variant against the float64 reference: a few shapes each, forced and uneven splits, bias,
    bf16, N not a multiple of the CTA width; plus bitwise repeatability (split-k is deterministic). Weights are
    drawn once per shape per run (fresh seed), activations per case. Runs in a child process (a kernel that
    faults or hangs must not take the timing down with it) and appends one JSON line per event to ``progress``:
    {"begin": variant} before a variant's cases, then one row per case, then {"end": variant}."""
    gen = torch.Generator().manual_seed(int(time.time()))
    fh = open(progress, "a")
    rows, fails = [], 0
    weights: dict = {}

    def emit(obj: dict) -> None:
        fh.write(json.dumps(obj, default=str) + "\n")
        fh.flush()

    def get_w(k, n, g, dt):
        key = (k, n, g, dt)
        if key not in weights:
            qw = random_quantized(k, n, g, dt, "cpu", gen)
            qw = type(qw)(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.group_size)
            weights[key] = (qw, {})
        return weights[key]

    def run(impl, cfg, m, k, n, g, dt, splits, bias):
        qw, packs = get_w(k, n, g, dt)
        layout = "quick" if impl == "quick" else "quick_sm90"
        if layout not in packs:
            packs[layout] = get_layout(layout).pack(qw)
        p = packs[layout]
        x = torch.randn(m, k, generator=gen).to(dt).cuda()
        b = torch.randn(n, generator=gen).to(dt).cuda() if bias else None
        outs = []
        for _ in range(2):
            out = poisoned((m, n), dt, "cuda")
            if impl == "quick":
                quick_mma.gemm(x, p["qweight"], p["scales"], p["zeros"], g, b, config=cfg, splits=splits, out=out)
            else:
                sm.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], g, b, cfg, splits, out)
            outs.append(out)
        torch.cuda.synchronize()
        err = rel_error(outs[0], reference_matmul(x, qw, b))
        return err, bool(torch.isfinite(outs[0]).all()), torch.equal(outs[0], outs[1])

    def record(impl, name, case, dt, fn):
        nonlocal fails
        exc = None
        try:
            err, finite, same = fn()
        except Exception as e:  # noqa: BLE001
            err, finite, same, exc = float("nan"), False, False, repr(e)
        ok = finite and err < REL_BOUND[dt] and same
        fails += not ok
        row = {"impl": impl, "variant": name, "case": case, "rel": err, "finite": finite, "repeat": same, "ok": ok}
        if exc:
            row["exception"] = exc
        rows.append(row)
        emit(row)

    for name, cfg in planned_mma().items():
        if name in skip or (PLAN == "w2" and name in W1_PASSED):
            continue
        emit({"begin": name})
        bm = cfg.bm
        cases = [
            (1, 4096, 4096, 128, torch.float16, 3, False),
            (bm + 3, 1536, 1088, 64, torch.float16, 2, True),
            (min(bm, 33), 8192, 8192, 128, torch.float16, None, False),
            (5, 4096, 1024, 128, torch.bfloat16, 4, True),
            (2 * bm + 1, 11008, 4096, 128, torch.float16, None, False),
            (5, 3 * math.lcm(cfg.bks, 128), 192, 32, torch.float16, 3, True),  # group 32, partial CTA width
            (bm - 1, 2 * math.lcm(cfg.bks, 128), 320, -1, torch.float16, 2, False),  # per-channel
        ]
        for m, k, n, g, dt, splits, bias in cases:
            if k % cfg.bks or dt not in _dtypes(cfg):
                continue
            case = f"M={m} K={k} N={n} g={g} {str(dt)[6:]} splits={splits} bias={bias}"
            record("quick", name, case, dt, lambda a=(cfg, m, k, n, g, dt, splits, bias): run("quick", *a))
        emit({"end": name})
    # the in-kernel split-k sum must give the same bits as the reduce launch (same order, same rounding)
    for base, ir in (("m16n2k4", "m16n2k4_ir"), ("m64n4", "m64n4_ir")):
        tag = f"bitwise:{ir}"
        if tag in skip or PLAN == "w2":  # passed in window 1
            continue
        emit({"begin": tag})
        for m, splits, bias in ((1, 2, False), (7, 3, True), (33, 4, True)):
            qw, packs = get_w(4096, 4096, 128, torch.float16)
            if "quick" not in packs:
                packs["quick"] = get_layout("quick").pack(qw)
            p = packs["quick"]
            x = torch.randn(m, 4096, generator=gen).half().cuda()
            b = torch.randn(4096, generator=gen).half().cuda() if bias else None
            outs = [
                quick_mma.gemm(x, p["qweight"], p["scales"], p["zeros"], 128, b, config=MMA_ALL[c], splits=splits)
                for c in (base, ir)
            ]
            same = torch.equal(outs[0], outs[1])
            fails += not same
            emit(
                {
                    "impl": "quick",
                    "variant": ir,
                    "case": f"bitwise == {base} + reduce launch, M={m} s={splits}",
                    "ok": same,
                }
            )
        emit({"end": tag})
    for cfg in planned_sm90():
        if str(cfg) in skip or (PLAN == "w2" and str(cfg) in W1_PASSED):
            continue
        emit({"begin": str(cfg)})
        nt = cfg.nt
        cases = [
            (max(1, nt // 2 + 1), 4096, 4096, 128, torch.float16, 3, False),
            (nt, 4160, 1088, 64, torch.float16, 7, True),
            (max(1, nt - 3), 8192, 8192, 128, torch.float16, None, False),
            (min(nt, 5), 2048, 512, 128, torch.bfloat16, 2, True),
            (3, 640, 320, -1, torch.float16, 3, False),  # per-channel (one group over K)
        ]
        for m, k, n, g, dt, splits, bias in cases:
            if dt not in _dtypes(cfg):
                continue
            case = f"M={m} K={k} N={n} g={g} {str(dt)[6:]} splits={splits} bias={bias}"
            record("quick_sm90", str(cfg), case, dt, lambda a=(cfg, m, k, n, g, dt, splits, bias): run("sm90", *a))
        emit({"end": str(cfg)})
    emit({"done": True, "failures": fails})
    return 1 if fails else 0


def _events(progress: Path) -> list[dict]:
    out = []
    for line in progress.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            pass
    return out


def part_check(ctx: Ctx) -> int:
    """check_child in a subprocess; a variant that crashes or hangs it is recorded as failed and skipped in the
    next attempt. Sets ``ctx.ok``: the variants whose every case passed (the sweep times only those)."""
    progress = ctx.out / "decode_check.jsonl"
    progress.write_text("")
    skip: set[str] = set()
    crashed: list[str] = []
    for _attempt in range(4):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--check-child",
            str(progress),
            "--skip",
            json.dumps(sorted(skip)),
        ]
        try:
            limit = max(45.0, min(90.0, ctx.left() - 70)) if PLAN == "w2" else max(60.0, min(180.0, ctx.left() - 100))
            rc = subprocess.run(cmd, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        events = _events(progress)
        if any("done" in e for e in events) and rc in (0, 1):
            break
        begun = [e["begin"] for e in events if "begin" in e]
        ended = {e["end"] for e in events if "end" in e}
        open_v = [v for v in begun if v not in ended and v not in skip]
        if not open_v:
            ctx.log(f"[check] child exited rc={rc} outside a variant; not retrying")
            break
        ctx.log(f"[check] child rc={rc} inside variant {open_v[-1]}: marked failed, retrying without it")
        crashed.append(open_v[-1])
        skip |= ended | {open_v[-1]}  # the retry checks only what was not reached
    events = _events(progress)
    rows = [e for e in events if "case" in e]
    ended = {e["end"] for e in events if "end" in e}
    bad = {r["variant"] for r in rows if not r.get("ok")} | set(crashed)
    ctx.ok = ended - bad
    if PLAN == "w2":  # checked on the device in window 1 (same kernel sources)
        ctx.ok |= {v for v in W1_PASSED if v in planned_mma() or v in {str(c) for c in planned_sm90()}}
    fails = len([r for r in rows if not r.get("ok")]) + len(crashed)
    for r in rows:
        if not r.get("ok"):
            ctx.log(f"[check] FAIL {r}")
    ctx.res["check"] = {"failures": fails, "cases": len(rows), "crashed": crashed, "passed": sorted(ctx.ok)}
    ctx.res["check_rows"] = rows
    ctx.log(f"[check] {len(rows)} cases, {fails} failures, crashed: {crashed or 'none'}; {len(ctx.ok)} variants pass")
    ctx.save()
    return fails


def _problem(k: int, n: int, seed: int) -> dict:
    """Random weights of one (K, N) in both layouts (drawn on the GPU: timing data only) and a dense fp16 copy."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda", dtype=torch.uint8)
    scales = ((torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.75 + 0.25) * 0.0025).half()
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device="cuda", dtype=torch.uint8)
    qw = QuantizedWeight(q, scales, zeros, GROUP)
    return {
        "quick": get_layout("quick").pack(qw),
        "sm90": get_layout("quick_sm90").pack(qw),
        "w16": (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half(),
    }


def part_sweep(ctx: Ctx, kernels: tuple[str, ...]) -> None:
    """Time every candidate of each kernel (plus its tuned automatic choice, and cuBLAS) per shape and M; shapes
    outermost (K = N = 8192 first) so that a run cut short by the budget still has whole shapes."""
    for (k, n), ms in plan_cells():
        p = _problem(k, n, k + n)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for which in kernels:
                if ctx.left() < 25:
                    ctx.log(f"[{which}] budget exhausted before K={k} N={n} M={m}")
                    ctx.save()
                    return
                _sweep_cell(ctx, which, p, x, m, k, n)
        del p
        torch.cuda.empty_cache()
        ctx.save()


def _sweep_cell(ctx: Ctx, which: str, p: dict, x: torch.Tensor, m: int, k: int, n: int) -> None:
    rows = ctx.res.setdefault(which, [])
    if which == "mma":
        w = p["quick"]
        args = (x, w["qweight"], w["scales"], w["zeros"], GROUP)
        cands = [("auto", None, lambda: quick_mma.quick_matmul(*args))]
        for name, s in cell_candidates("mma", m, k, n):
            cfg = MMA_ALL[name]
            if k % cfg.bks or (s is not None and s > k // cfg.bks) or (ctx.ok is not None and name not in ctx.ok):
                continue
            cands.append((name, s, lambda cfg=cfg, s=s: quick_mma.gemm(*args, config=cfg, splits=s)))
        cands.append(("cublas_fp16", None, lambda: torch.nn.functional.linear(x, p["w16"])))
    else:
        w = p["sm90"]
        args = (x, w["qweight"], w["scales"], w["zeros"], GROUP)
        cands = [("auto", None, lambda: sm.gemm_w4a16_sm90(*args))]
        for cfg, rounds in cell_candidates("sm90", m, k, n):
            if ctx.ok is not None and str(cfg) not in ctx.ok:
                continue
            s = sm.plan(m, n, k, ctx.sms, cfg, None, GROUP, rounds).splits
            cands.append((str(cfg), s, lambda cfg=cfg, s=s: sm.gemm_w4a16_sm90(*args, None, cfg, s)))
    seen = set()
    best = (math.inf, "")
    for name, s, fn in cands:
        if (name, s) in seen:
            continue
        seen.add((name, s))
        try:
            us = do_bench_us(graphed(fn))
        except Exception as e:  # noqa: BLE001
            ctx.log(f"[{which}] {name} s={s} M={m} K={k} N={n}: {type(e).__name__}: {e}")
            continue
        rows.append({"M": m, "K": k, "N": n, "variant": name, "splits": s, "us": round(us, 2)})
        if name not in ("auto", "cublas_fp16"):
            best = min(best, (us, f"{name} s={s}"))
    auto = next((r["us"] for r in rows if (r["M"], r["K"], r["N"], r["variant"]) == (m, k, n, "auto")), None)
    ctx.log(f"[{which}] K={k} N={n} M={m}: auto {auto} us, best {best[0]:.2f} us ({best[1]})")


def part_clean(ctx: Ctx, fl: Flushes) -> None:
    """The tuned kernels, their best measured variants and cuBLAS under the memset flush and the clean (read)
    flush: how much of each time is the write-back of the flush's dirty lines."""
    rows = ctx.res.setdefault("clean", [])
    for k, n in SHAPES[:1] if PLAN == "w2" else SHAPES[:2]:
        p = _problem(k, n, 7)
        for m in (1, 16, 64) if PLAN == "w2" else (1, 16, 64, 256):
            if ctx.left() < 10:
                break
            _clean_cell(ctx, fl, p, torch.randn(m, k, device="cuda", dtype=torch.float16), rows)
        del p
        torch.cuda.empty_cache()
    ctx.save()


def _clean_cell(ctx: Ctx, fl: Flushes, p: dict, x: torch.Tensor, rows: list) -> None:
    m, k = x.shape
    wq, ws = p["quick"], p["sm90"]
    n = wq["scales"].shape[1]
    fns = {
        "quick auto": lambda: quick_mma.quick_matmul(x, wq["qweight"], wq["scales"], wq["zeros"], GROUP),
        "sm90 auto": lambda: sm.gemm_w4a16_sm90(x, ws["qweight"], ws["scales"], ws["zeros"], GROUP),
        "cublas_fp16": lambda: torch.nn.functional.linear(x, p["w16"]),
    }
    for which in ("mma", "sm90"):
        cand = [
            r
            for r in ctx.res.get(which, [])
            if (r["M"], r["K"], r["N"]) == (m, k, n) and r["variant"] not in ("auto", "cublas_fp16")
        ]
        if not cand:
            continue
        b = min(cand, key=lambda r: r["us"])
        label = f"{which} best {b['variant']} s={b['splits']}"
        if which == "mma":
            cfg = MMA_ALL[b["variant"]]
            fns[label] = lambda cfg=cfg, s=b["splits"]: quick_mma.gemm(
                x, wq["qweight"], wq["scales"], wq["zeros"], GROUP, config=cfg, splits=s
            )
        else:
            cfg = next(c for c in planned_sm90() if str(c) == b["variant"])
            fns[label] = lambda cfg=cfg, s=b["splits"]: sm.gemm_w4a16_sm90(
                x, ws["qweight"], ws["scales"], ws["zeros"], GROUP, None, cfg, s
            )
    for name, fn in fns.items():
        try:
            g = graphed(fn)
            row = {"impl": name, "M": m, "K": k, "N": n, "do_bench_us": round(do_bench_us(g), 2)}
            for f in ("memset", "read"):
                row[f] = round(bench_flush_us(g, fl.get(f)), 2)
        except Exception as e:  # noqa: BLE001
            ctx.log(f"[clean] {name} M={m}: {e!r}")
            continue
        rows.append(row)
        ctx.log(f"[clean] {row}")


def part_final(ctx: Ctx, fl: Flushes) -> None:
    """The shipped automatic choices (quick_matmul, gemm_w4a16_sm90 with TUNED), cuBLAS fp16 and torch's int4
    tinygemm (bf16) at every M and shape, official timing; the first two shapes also under the clean flush."""
    rows = ctx.res.setdefault("final", [])
    for k, n in SHAPES:
        p = _problem(k, n, 11)
        try:
            wu8 = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            p["int4"] = torch._convert_weight_to_int4pack(wu8, 8)
            p["int4_sz"] = (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - the other rows still matter
            ctx.log(f"[final] torch int4 unavailable: {e!r}")
        for m in MS:
            if ctx.left() < 10:
                ctx.log(f"[final] budget exhausted before K={k} N={n} M={m}")
                ctx.save()
                return
            _final_cell(ctx, fl, p, m, rows)
        del p
        torch.cuda.empty_cache()
        ctx.save()


def _final_cell(ctx: Ctx, fl: Flushes, p: dict, m: int, rows: list) -> None:
    wq, ws = p["quick"], p["sm90"]
    k, n = p["w16"].shape[1], p["w16"].shape[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    xb = x.to(torch.bfloat16)
    fns = {
        "quick": lambda: quick_mma.quick_matmul(x, wq["qweight"], wq["scales"], wq["zeros"], GROUP),
        "quick_sm90": lambda: sm.gemm_w4a16_sm90(x, ws["qweight"], ws["scales"], ws["zeros"], GROUP),
        "cublas_fp16": lambda: torch.nn.functional.linear(x, p["w16"]),
    }
    if "int4" in p:
        fns["torch_int4"] = lambda: torch._weight_int4pack_mm(xb, p["int4"], GROUP, p["int4_sz"])
    row = {"M": m, "K": k, "N": n}
    for name, fn in fns.items():
        try:
            g = graphed(fn)
            row[name] = round(do_bench_us(g, warmup=10, rep=40), 2)
            if (k, n) in SHAPES[:2] and m in (1, 16, 64):
                row[name + "@clean"] = round(bench_flush_us(g, fl.get("read")), 2)
        except Exception as e:  # noqa: BLE001
            ctx.log(f"[final] {name} M={m} K={k} N={n}: {e!r}")
    rows.append(row)
    ctx.log(f"[final] {row}")


def summary(ctx: Ctx) -> None:
    ctx.log("\nsummary (us, do_bench median, memset flush): auto / best variant per kernel; cuBLAS fp16")
    for k, n in SHAPES:
        for m in MS:
            cells = []
            for which in ("mma", "sm90"):
                rs = [r for r in ctx.res.get(which, []) if (r["M"], r["K"], r["N"]) == (m, k, n)]
                auto = next((r["us"] for r in rs if r["variant"] == "auto"), None)
                cand = [r for r in rs if r["variant"] not in ("auto", "cublas_fp16")]
                b = min(cand, key=lambda r: r["us"]) if cand else None
                desc = f"{b['us']} ({b['variant']} s={b['splits']})" if b else "-"
                cells.append(f"{which} {auto} / {desc}")
            key = (m, k, n, "cublas_fp16")
            cub = next((r["us"] for r in ctx.res.get("mma", []) if (r["M"], r["K"], r["N"], r["variant"]) == key), None)
            ctx.log(f"{k}x{n} M={m}: " + " | ".join(cells) + f" | cublas {cub}")
    for r in ctx.res.get("final", []):
        cells = " ".join(f"{key}={val}" for key, val in r.items() if key not in ("M", "K", "N"))
        ctx.log(f"final {r['K']}x{r['N']} M={r['M']}: {cells}")
    fl = ctx.res.get("floor", [])
    for r in fl:
        ctx.log(
            f"floor {r['kernel']} {r.get('U', '')}/{r.get('blocks', '')}/{r.get('threads', '')} {r['K']}x{r['N']} "
            f"{r['bytes'] / 1e6:.1f} MB: do_bench {r['do_bench_us']} memset {r['memset']} read {r['read']} "
            f"memset+read {r['memset+read']} none {r['none']} us"
        )


def ncu_target() -> int:
    """Launches for a profiler (ncu -k quick_stream_probe, --cache-control none): the probe over the 35.7 MB of
    K = N = 8192 right after each kind of flush, three times each, in the order memset, read, memset+read, none.
    Its DRAM write bytes show whether the kernel pays for the flush's dirty lines."""
    fl = Flushes()
    nbytes = 8192 * 8192 // 2 + 2 * 2 * (8192 // GROUP) * 8192
    buf = torch.ones(nbytes // 4, dtype=torch.int32, device="cuda")
    probe = probe_launcher(buf, 8, 132 * 4, 512, fl.sink)
    probe_ef = probe_launcher(buf, 8, 132 * 4, 512, fl.sink, ef=1)
    for name, fn in (("memset", probe), ("read", probe), ("memset+read", probe), ("none", probe), ("memset", probe_ef)):
        for _ in range(3):
            fl.get(name)()
            fn()
    torch.cuda.synchronize()
    print("ncu target: probe order memset x3, read x3, memset+read x3, none x3, memset x3 with evict_first loads")
    return 0


def part_ncu(ctx: Ctx) -> None:
    """If Nsight Compute is here: DRAM bytes read/written by the probe right after each flush (ncu_target), the
    direct test of the write-back claim. Output kept verbatim in ncu_probe.txt; parsed rows in the JSON."""
    import shutil

    ncu = shutil.which("ncu") or next(
        (c for c in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu") if os.path.exists(c)), None
    )
    if ncu is None:
        ctx.log("[ncu] not found; skipped")
        ctx.res["ncu"] = "not found"
        return
    metrics = "dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum"
    cmd = [ncu, "--cache-control", "none", "--replay-mode", "application", "-k", "quick_stream_probe"]
    cmd += ["--metrics", metrics, "--csv", sys.executable, str(Path(__file__).resolve()), "--ncu-target"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        text = f"timeout: {e}"
    (ctx.out / "ncu_probe.txt").write_text(text)
    rows = [ln for ln in text.splitlines() if "quick_stream_probe" in ln and ("dram__" in ln or "gpu__" in ln)]
    ctx.res["ncu"] = rows[:50] if rows else text[-2000:]
    order = "memset x3, read x3, memset+read x3, none x3, memset x3 with evict_first"
    ctx.log(f"[ncu] {len(rows)} metric rows (order: {order}); see ncu_probe.txt")
    for line in rows[:45]:
        ctx.log(f"[ncu] {line}")
    ctx.save()


def pick(path: Path) -> int:
    """Offline (no GPU): from a decode_tune.json, per kernel and M, the variant with the lowest mean ratio to the
    per-shape best over the shapes measured (each variant at its best split on each shape), and the split it
    won with on each shape: the data behind the TUNED tables."""
    res = json.loads(path.read_text())
    for which in ("mma", "sm90"):
        rows = [r for r in res.get(which, []) if r["variant"] not in ("auto", "cublas_fp16")]
        for m in MS:
            cells: dict = {}
            for r in rows:
                if r["M"] == m:
                    key = (r["K"], r["N"])
                    v = cells.setdefault(r["variant"], {})
                    if key not in v or r["us"] < v[key][0]:
                        v[key] = (r["us"], r["splits"])
            if not cells:
                continue
            shapes = sorted({key for v in cells.values() for key in v})
            best = {key: min(v[key][0] for v in cells.values() if key in v) for key in shapes}
            scored = sorted(
                (sum(v[key][0] / best[key] for key in shapes) / len(shapes), name)
                for name, v in cells.items()
                if all(key in v for key in shapes)
            )
            auto = {(r["K"], r["N"]): r["us"] for r in res.get(which, []) if r["M"] == m and r["variant"] == "auto"}
            for score, name in scored[:3]:
                per = ", ".join(f"{k}x{n} {cells[name][(k, n)][0]} s={cells[name][(k, n)][1]}" for k, n in shapes)
                print(f"{which} M={m}: {score:.3f} {name}: {per}")
            print(f"{which} M={m}: auto " + ", ".join(f"{k}x{n} {auto.get((k, n))}" for k, n in shapes))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop timing new cells after this many seconds")
    ap.add_argument("--parts", default="ncu,floor,check,mma,sm90,clean", help="also: final")
    ap.add_argument("--ncu-target", action="store_true", help="only the launches for the ncu DRAM-bytes check")
    ap.add_argument("--pick", type=Path, default=None, help="offline: best variants per M from a decode_tune.json")
    ap.add_argument("--check-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ncu_target:
        return ncu_target()
    if args.pick is not None:
        return pick(args.pick)
    if args.check_child is not None:
        return check_child(args.check_child, set(json.loads(args.skip)))
    out = Path(os.environ.get("OUT") or "decode_out")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, args.budget_s)
    props = torch.cuda.get_device_properties(0)
    ctx.res["device"] = {"name": props.name, "sms": props.multi_processor_count, "torch": torch.__version__}
    ctx.log(f"[decode_tune] {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    parts = args.parts.split(",")
    if "w2" in parts:  # window 2: finalists only (check in a child, sweep, clean), no ncu or floor
        global PLAN
        PLAN = os.environ["DECODE_PLAN"] = "w2"
        parts = ["check", "pattern", "mma", "sm90", "clean"]
    ctx.res["plan"] = PLAN
    fails = 0
    try:
        build_all(ctx)
        if "ncu" in parts:
            part_ncu(ctx)
        fl = Flushes()
        if "floor" in parts:
            part_floor(ctx, fl)
        if "pattern" in parts:
            part_pattern(ctx, fl)
        if "check" in parts:
            fails = part_check(ctx)
        kernels = tuple(w for w in ("mma", "sm90") if w in parts)
        if kernels:
            part_sweep(ctx, kernels)
        if "clean" in parts and ctx.left() > 15:
            part_clean(ctx, fl)
        if "final" in parts:
            part_final(ctx, fl)
    except Exception:  # noqa: BLE001 - keep what was measured, say what failed
        ctx.log(traceback.format_exc())
        fails += 1
    ctx.save()
    summary(ctx)
    ctx.log(f"[decode_tune] done in {time.time() - ctx.t0:.0f} s; correctness failures: {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
