#!/usr/bin/env python3
"""Decode kernel (``csrc/quick_dec.cu``) on a GPU, one run: build every variant, check each against the
float64 reference (fresh random data, NaN-poisoned outputs, bounds that fail), then time the candidate configs
and split counts against the wgmma GEMM (``quick_sm90``) and the streaming floor.

    OUT=$OUT python3 scripts/dec_check.py [--parts check,time] [--budget-s 300]

Writes ``$OUT/dec_check.json`` (after each part) and prints a summary table. Timing as benchmarks/kernel.py:
median of ``triton.testing.do_bench`` (L2 flushed) over CUDA-graph replays of one call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from common import bench_us, graphed, stream_floor_us, w4_bytes  # noqa: E402

from quick.kernels import decode as qd  # noqa: E402
from quick.kernels import (
    jit,  # noqa: E402
    mma,
)
from quick.kernels import wgmma as sm  # noqa: E402
from quick.testing import REL_BOUND, pack, poisoned, random_quantized, reference_matmul, rel_error  # noqa: E402

CHECK_MS = {16: (1, 2, 3, 7, 8, 9, 15, 16), 32: (17, 24, 31, 32), 64: (33, 40, 63, 64)}  # per M bucket
SMALL = ((128, 64), (192, 128), (4160, 1088), (1024, 192 * 4))
LARGE = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (5120, 13824))
TIME_SHAPES = (
    (8192, 8192),
    (4096, 4096),
    (4096, 12288),
    (4096, 22016),
    (11008, 4096),
    (4096, 14336),
    (14336, 4096),
    (4096, 6144),
)
TIME_MS = (1, 4, 8, 16, 32, 64)


def build(res: dict) -> None:
    jobs = [(s, jit.arch_for_device(0, True), d) for s, _k, d in qd.VARIANTS]
    t0 = time.time()
    out = jit.compile_many(jobs)
    res["build"] = {"variants": len(out), "s": round(time.time() - t0, 1), "max_spills": max(r.spills for r in out)}
    print("build", res["build"], flush=True)


_W: dict = {}
_DIAG: list[dict] = []  # diagnostics of the first failing cases


def diagnose(out: torch.Tensor, ref: torch.Tensor, cfg) -> dict:
    """Where a failing output is wrong, to find an index bug without another GPU run: NaN count (unwritten
    elements), relative error per token, per channel position inside a 16-channel block, per channel block of the CTA
    tile, and per CTA tile."""
    o, r = out.double().cpu(), ref.double().cpu()
    bad = ((o - r).abs() > 1e-2 * r.abs().mean().clamp_min(1e-6) + 1e-2 * r.abs()) | ~torch.isfinite(o)
    n = o.shape[1]
    per = lambda mask_dim: bad.float().mean(mask_dim)  # noqa: E731
    ch = torch.arange(n)
    tile = ch // cfg.channels
    return {
        "nan": int(torch.isnan(o).sum()),
        "bad_frac": round(float(bad.float().mean()), 4),
        "bad_by_token": [round(float(v), 3) for v in per(1)][:64],
        "bad_by_chan_mod16": [round(float(bad[:, ch % 16 == c].float().mean()), 3) for c in range(16)],
        "bad_by_block_in_tile": [
            round(float(bad[:, (ch % cfg.channels) // 16 == b].float().mean()), 3) for b in range(cfg.channels // 16)
        ][:32],
        "bad_tiles": [int(t) for t in torch.unique(tile[bad.any(0)])][:32],
    }


def run_case(m, k, n, g, dt, cfg, splits, bias, gen) -> tuple[float, bool]:
    key = (k, n, g, dt)
    if key not in _W:  # one random weight per shape, group and dtype (the inputs x are fresh per case)
        _W.clear()
        qw = random_quantized(k, n, g, dt, "cuda", generator=gen)
        _W[key] = (qw, {lay: pack(qw, lay) for lay in qd.LAYOUTS})
    qw, packs = _W[key]
    layout = qd.LAYOUTS[cfg.wb]
    p = packs[layout]
    x = (torch.randn(m, k, generator=gen) * 0.5).to(dt).cuda()
    b = (torch.randn(n, generator=gen) * 0.1).to(dt).cuda() if bias else None
    ref = reference_matmul(x, qw, b)
    out = poisoned((m, n), dt, "cuda")
    qd.gemv(layout, x, p["qweight"], p["scales"], p["zeros"], g, b, config=cfg, splits=splits, out=out)
    err = rel_error(out, ref)
    if not err <= REL_BOUND[dt] or not torch.isfinite(out).all():
        _DIAG.append({"case": repr((m, k, n, g, dt, cfg, splits, bias)), **diagnose(out, ref, cfg)})
    det = True
    if splits and splits > 1:
        out2 = poisoned((m, n), dt, "cuda")
        qd.gemv(layout, x, p["qweight"], p["scales"], p["zeros"], g, b, config=cfg, splits=splits, out=out2)
        det = torch.equal(out, out2)
    return err, det


def part_check(res: dict, deadline: float) -> None:
    gen = torch.Generator().manual_seed(20261204)
    cases, fails, worst = 0, [], {}
    cfgs = qd.all_configs()  # (M bucket, config)
    todo = []
    for dt in (torch.float16, torch.bfloat16):
        for k, n in SMALL:
            for g in (32, 64, 128, -1):
                if (g > 0 and k % g) or (g == -1 and k % 64):
                    continue
                for top, cfg in cfgs:
                    if n % cfg.channels or not cfg.supports(g if g > 0 else k):
                        continue
                    for m in CHECK_MS[top]:
                        for splits in (None, 3) if m in (CHECK_MS[top][0], top) else (None,):
                            todo.append((m, k, n, g, dt, cfg, splits, m % 2 == 1))
        for k, n in LARGE:
            for layout in qd.LAYOUTS:
                for top, cfg0 in qd.DEFAULTS[layout]:
                    for g in (128, 32, -1):
                        for m in (top // 2 + 1, top) if top > 16 else (1, 8, 16):
                            if n % cfg0.channels == 0:
                                todo.append((m, k, n, g, dt, cfg0, None, m == 8 or m == top))
            for top, cfg in cfgs:
                if n % cfg.channels == 0:
                    todo.append((top - 3, k, n, 128, dt, cfg, None, False))
    todo.sort(key=lambda c: (c[1], c[2], c[3], str(c[4])))
    for case in todo:
        if time.time() > deadline:
            res["check_cut"] = f"budget: {cases} of {len(todo)} cases run"
            break
        m, k, n, g, dt, cfg, splits, bias = case
        try:
            err, det = run_case(*case, gen)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            fails.append({"case": repr(case), "error": f"{type(e).__name__}: {e}"[:300]})
            cases += 1
            continue
        cases += 1
        key = str(dt).split(".")[-1]
        worst[key] = max(worst.get(key, 0.0), err)
        if not err <= REL_BOUND[dt] or not det:
            fails.append({"case": repr(case), "rel_err": err, "deterministic": det})
    res["check"] = {
        "cases": cases,
        "planned": len(todo),
        "failures": len(fails),
        "worst_rel": worst,
        "fail": fails[:30],
        "diagnostics": _DIAG[:12],
    }
    print("check", {k: v for k, v in res["check"].items() if k != "fail"}, flush=True)
    for f in fails[:10]:
        print("  FAIL", f, flush=True)
    for d in _DIAG[:3]:
        print("  DIAG", d, flush=True)


def part_time(res: dict, deadline: float) -> None:
    rows = []
    gen = torch.Generator().manual_seed(7)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    floors = {}
    for k, n in TIME_SHAPES:
        if time.time() > deadline:
            res["time_cut"] = True
            break
        qw = random_quantized(k, n, 128, torch.float16, "cuda", generator=gen)
        packs = {lay: pack(qw, lay) for lay in qd.LAYOUTS}
        floors[f"{k}x{n}"] = round(stream_floor_us(int(w4_bytes(1, k, n))), 2)
        for m in TIME_MS:
            x = (torch.randn(m, k, generator=gen) * 0.5).half().cuda()
            for layout, p in packs.items():
                args = (x, p["qweight"], p["scales"], p["zeros"], 128)
                base = {
                    "quick_sm90": ("wgmma", lambda a=args: sm.gemm_w4a16_sm90(*a)),
                    "quick": ("mma_gemm", lambda a=args: mma.gemm(*a)),
                }[layout]
                try:
                    us = bench_us(graphed(base[1]))
                    rows.append({"impl": base[0], "K": k, "N": n, "M": m, "us": round(us, 2)})
                except Exception as e:  # noqa: BLE001
                    rows.append({"impl": base[0], "K": k, "N": n, "M": m, "error": str(e)[:200]})
                for cfg, s in qd.timing_candidates(layout, m, n, k, nsm):
                    if time.time() > deadline:
                        break
                    row = {
                        "impl": f"dec_{layout}",
                        "cfg": [cfg.rb, cfg.warps, cfg.stages, cfg.nw],
                        "splits": s,
                        "K": k,
                        "N": n,
                        "M": m,
                    }
                    try:
                        us = bench_us(
                            graphed(lambda a=args, c=cfg, s=s, lay=layout: qd.gemv(lay, *a, config=c, splits=s))
                        )
                        row["us"] = round(us, 2)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = str(e)[:200]
                    rows.append(row)
        del qw, packs
    res["time"] = rows
    res["floor_us"] = floors
    print(f"{'shape':>12} {'M':>3} {'floor':>7} {'wgmma':>7} {'dec90':>7}  {'mma':>7} {'dec_q':>7}", flush=True)
    best = {}
    for r in rows:
        if "us" in r:
            key = (r["impl"], r["K"], r["N"], r["M"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for k, n in TIME_SHAPES:
        for m in TIME_MS:
            cells = [
                best.get((i, k, n, m), {}).get("us", "-") for i in ("wgmma", "dec_quick_sm90", "mma_gemm", "dec_quick")
            ]
            print(
                f"{k:>5}x{n:<6} {m:>3} {floors.get(f'{k}x{n}', '-'):>7} " + " ".join(f"{c:>7}" for c in cells),
                flush=True,
            )
    res["best"] = [best[key] for key in sorted(best)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="build,check,time")
    ap.add_argument("--budget-s", type=float, default=300)
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    parts = a.parts.split(",")
    budget = {"check": 0.45, "time": 1.0}
    for part in parts:
        try:
            if part == "build":
                build(res)
            elif part == "check":
                part_check(res, t0 + budget["check"] * a.budget_s)
            elif part == "time":
                part_time(res, t0 + a.budget_s)
        except Exception:  # noqa: BLE001
            res.setdefault("errors", []).append(traceback.format_exc()[-2000:])
            print(traceback.format_exc(), flush=True)
        (out / "dec_check.json").write_text(json.dumps(res, indent=1))
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
