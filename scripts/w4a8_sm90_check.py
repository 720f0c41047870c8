#!/usr/bin/env python3
"""One GPU run for the Hopper W4A8 kernel (wgmma s8): build + ptxas/SASS check, correctness, timing.

Usage on an sm_90 GPU:  ``PYTHONUNBUFFERED=1 timeout 580 python3 scripts/w4a8_sm90_check.py``
Each part runs in its own subprocess with a time limit (a hung kernel costs that part, not the run) and writes
``$OUT/w4a8_sm90_<part>.json`` (``./w4a8_sm90_out`` without ``$OUT``); the summary is printed last.

Parts: ``build`` (every variant: registers, spills, ptxas C75xx warnings, SASS counts of IGMMA (= wgmma s8),
HGMMA, LDG.128, LDL/STL), ``quant`` (activation quantization bit-exact against the Python contract),
``small`` / ``large`` (GEMM vs the float64 ``w4a8_reference``: fresh random data, NaN-poisoned outputs,
relative Frobenius error bounds that fail), ``configs`` (every token tile and split-k on one shape), ``time``
(M = 1 .. 4096 at K = N = 8192: cuBLAS fp16 ``F.linear``, the W4A16 ``quick_sm90`` kernel and this kernel,
per-channel and g128, activation quantization included and not: median of L2-flushed CUDA-graph replays,
``benchmarks/common.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(os.environ.get("OUT", "w4a8_sm90_out"))
PARTS = {"build": 120, "quant": 40, "small": 90, "large": 120, "configs": 60, "time": 150}  # time limits (s)
# Relative Frobenius error bounds vs float64: the integer part is exact, so what is left is the fp32 epilogue
# and the rounding of the 16-bit output (fp16 2^-11, bf16 2^-8 relative per element).
BOUND = {"float16": 1e-3, "bfloat16": 8e-3}


def _torch():
    import torch

    return torch


def make_weight(n: int, k: int, g: int, gen, scale_max: int = 127):
    """Random W4A8 weights in the format's full ranges (q in [-8, 7], s_g in [1, scale_max]; the quantizers
    write scale_max 16, which the widened kernels take)."""
    torch = _torch()
    from quick.formats.w4a8 import W4A8Weight

    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s_ch = (torch.rand(n, generator=gen) * 0.75 + 0.25) * 2e-3
    gs = torch.randint(1, scale_max + 1, (k // g, n), generator=gen, dtype=torch.int16) if g > 0 else None
    if gs is not None:
        s_ch = s_ch / (scale_max / 2)
    return W4A8Weight(q, s_ch, gs, g)


_WEIGHTS: dict = {}


def cached_weight(n: int, k: int, g: int, gen):
    """Packing 8192 x 8192 on the host takes seconds: one weight per (N, K, G) per part."""
    from quick.formats.layouts import pack_w4a8_sm90

    if (n, k, g) not in _WEIGHTS:
        w = make_weight(n, k, g, gen)
        wd = w.dequantize(_torch().float64).cuda()
        _WEIGHTS[(n, k, g)] = (w, {kk: v.cuda() for kk, v in pack_w4a8_sm90(w).items()}, wd)
    return _WEIGHTS[(n, k, g)]


def reference(x, wd, bias=None):
    """``w4a8_reference`` with the float64 weight dequantized once: quantize_activations (the contract's
    fp32 rule), exact float64 product, then s_x (and bias)."""
    torch = _torch()
    from quick.formats.w4a8 import quantize_activations

    xq, sx = quantize_activations(x)
    y = (xq.to(torch.float64) @ wd.t()) * sx.to(torch.float64)[:, None]
    return y + bias.to(torch.float64) if bias is not None else y


def run_case(m, n, k, g, dtype, gen, bias=False, config=None, splits=None, x_scale=1.0):
    """One GEMM vs the float64 reference; returns a result dict (error, finite, bound, ok)."""
    torch = _torch()
    from quick.kernels import w4a8_wgmma as w8

    w, packed, wd = cached_weight(n, k, g, gen)
    x = (torch.randn(m, k, generator=gen) * x_scale).to(dtype).cuda()
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    w8.gemm_w4a8_sm90(
        x, packed["qweight"], packed["channel_scale"], packed.get("group_scale"), g, b, config, splits, out
    )
    torch.cuda.synchronize()
    ref = reference(x, wd, b).cpu()
    o = out.cpu().double()
    finite = bool(torch.isfinite(o).all())
    err = float((o - ref).norm() / ref.norm().clamp_min(1e-30)) if finite else float("inf")
    bound = BOUND[str(dtype).split(".")[-1]]
    return {
        "m": m,
        "n": n,
        "k": k,
        "g": g,
        "dtype": str(dtype).split(".")[-1],
        "bias": bias,
        "config": None if config is None else config.__dict__,
        "splits": splits,
        "err": err,
        "finite": finite,
        "bound": bound,
        "ok": finite and err <= bound,
    }


def sass_tool() -> list[str] | None:
    """cuobjdump --dump-sass, else nvdisasm (both print one SASS instruction per line)."""
    from quick.kernels import jit

    dirs = [Path(jit.find_nvcc()).resolve().parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"]
    for name, args in (("cuobjdump", ["--dump-sass"]), ("nvdisasm", [])):
        path = shutil.which(name) or next((str(d / name) for d in dirs if (d / name).exists()), None)
        if path:
            return [path, *args]
    return None


def part_build(res: dict) -> None:
    from quick.kernels import compile_check, jit
    from quick.kernels import w4a8_wgmma as w8

    jobs = [(src, "sm_90a", d) for src, _name, d in w8.VARIANTS]
    t0 = time.time()
    results = jit.compile_many(jobs, workers=os.cpu_count())
    res["compile_s"] = time.time() - t0
    tool = sass_tool()
    res["sass_tool"] = tool
    rows = []
    for (_src, _arch, d), r in zip(jobs, results, strict=True):
        warn = sorted(set(re.findall(r"\(C75\d\d\)", r.log)))
        reps = {p.name: (p.registers, p.spill_bytes, p.stack) for p in compile_check.parse_ptxas(r.log)}
        sass = subprocess.run([*tool, str(r.cubin)], capture_output=True, text=True).stdout if tool else ""
        counts: dict[str, dict[str, int]] = {}
        cur = None
        for line in sass.splitlines():
            mm = re.search(r"Function : (\S+)", line) or re.match(r"\s*\.text\.(\w+):", line)
            if mm:
                cur = counts.setdefault(mm.group(1), {"IGMMA": 0, "HGMMA": 0, "LDG128": 0, "LDL": 0, "STL": 0})
                continue
            mm = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
            if mm and cur is not None:
                op = mm.group(1)
                base = op.split(".")[0]
                if base in cur:
                    cur[base] += 1
                elif base == "LDG" and ".128" in op:
                    cur["LDG128"] += 1
        rows.append({"defines": d, "ptxas": reps, "warnings": warn, "sass": counts})
    res["variants"] = rows
    for r in rows:  # setmaxnreg 40/232 with two consumer warpgroups is balanced only at 168 registers
        regs = r["ptxas"].get("quick_w4a8_sm90_gemm", (0, 0, 0))[0]
        r["pool_ok"] = r["defines"]["QW_NWG"] != 2 or regs == 168
    bad = [
        r
        for r in rows
        if not r["pool_ok"]
        or r["warnings"]
        or any(v[1] for v in r["ptxas"].values())
        or any(c["LDL"] or c["STL"] for c in r["sass"].values())
        or not r["sass"].get("quick_w4a8_sm90_gemm", {}).get("IGMMA")
    ]
    res["bad"] = len(bad)
    res["ok"] = not bad and bool(rows)


def part_quant(res: dict) -> None:
    torch = _torch()
    from quick.formats.w4a8 import quantize_activations
    from quick.kernels.w4a8_wgmma import quantize_activations_sm90

    gen = torch.Generator().manual_seed(1)
    cases = []
    for m, k in ((1, 128), (7, 4096), (33, 11008), (300, 8192)):
        for dt in (torch.float16, torch.bfloat16):
            x = (torch.randn(m, k, generator=gen) * 3).to(dt)
            x[0, : k // 2] *= 100  # an outlier half-row
            if m > 2:
                x[2] = 0  # an all-zero row: s_x = 0, x_q = 0
            xq, sx = quantize_activations_sm90(x.cuda())
            rq, rs = quantize_activations(x.cuda())  # the contract on the same device (CPU s_x may differ by 1 ulp)
            cases.append(
                {
                    "m": m,
                    "k": k,
                    "dtype": str(dt),
                    "xq_equal": bool(torch.equal(xq, rq)),
                    "sx_equal": bool(torch.equal(sx, rs)),
                    "xq_mismatches": int((xq != rq).sum()),
                }
            )
    res["cases"] = cases
    res["ok"] = all(c["xq_equal"] and c["sx_equal"] for c in cases)


def part_small(res: dict) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(2)
    cases = []
    for (k, n), ms in (((128, 64), (1, 2, 3, 8, 17)), ((384, 640), (1, 7, 16, 31, 64, 100, 255, 256, 1000))):
        for m in ms:
            for g in (-1, 128):
                for dt in (torch.float16, torch.bfloat16):
                    cases.append(run_case(m, n, k, g, dt, gen, bias=(m % 2 == 1)))
    res["cases"] = cases
    res["ok"] = all(c["ok"] for c in cases)


def part_large(res: dict) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(3)
    cases = []
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)):
        for m in (1, 16, 33, 128, 1000, 4096):
            for g in (-1, 128):
                dt = torch.float16 if m != 33 else torch.bfloat16
                cases.append(run_case(m, n, k, g, dt, gen))
    res["cases"] = cases
    res["ok"] = all(c["ok"] for c in cases)


def part_configs(res: dict) -> None:
    torch = _torch()
    from quick.kernels import w4a8_wgmma as w8

    gen = torch.Generator().manual_seed(4)
    cases = []
    for g in (-1, 128):
        for cfg in w8.CONFIGS[g]:
            for splits in (1, 3):
                cases.append(run_case(300, 640, 1408, g, torch.float16, gen, config=cfg, splits=splits))
    # determinism: split-k run twice gives identical bits (int32 partials are exact anyway)
    from quick.formats.layouts import pack_w4a8_sm90

    w = make_weight(512, 4096, 128, gen)
    p = {kk: v.cuda() for kk, v in pack_w4a8_sm90(w).items()}
    x = torch.randn(64, 4096, generator=gen).half().cuda()
    o1 = w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, splits=8)
    o2 = w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, splits=8)
    o3 = w8.gemm_w4a8_sm90(x, p["qweight"], p["channel_scale"], p["group_scale"], 128, splits=1)
    res["deterministic"] = bool(torch.equal(o1, o2))
    res["split_invariant"] = bool(torch.equal(o1, o3))
    res["cases"] = cases
    res["ok"] = all(c["ok"] for c in cases) and res["deterministic"] and res["split_invariant"]


def part_time(res: dict) -> None:
    torch = _torch()

    from benchmarks import common
    from quick.formats.layouts import get_layout, pack_w4a8_sm90
    from quick.kernels import select
    from quick.kernels import w4a8_wgmma as w8
    from quick.testing import random_quantized

    def bench(fn) -> float:
        """Median us of CUDA-graph replays of fn, L2 flushed (benchmarks/common: the README's method)."""
        replay = common.graphed(fn)
        return common.bench_us(replay, warmup_ms=3, rep_ms=12)

    gen = torch.Generator().manual_seed(5)
    k = n = 8192
    w16 = (torch.randn(n, k, generator=gen) * 0.02).half().cuda()
    qw = random_quantized(k, n, 128, torch.float16, "cpu", gen)
    qw = type(qw)(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), qw.group_size)
    p16 = get_layout("quick_sm90").pack(qw)
    # g128 with scales <= 16, as the quantizers write them: "group" runs widened, "group_fold" the per-group fold
    # on the same weights (its speed does not depend on the scale values).
    packs = {g: {kk: v.cuda() for kk, v in pack_w4a8_sm90(make_weight(n, k, g, gen, 16)).items()} for g in (-1, 128)}
    rows = []
    for m in (4096, 1024, 1, 16, 256, 64):  # the targets' sizes first: partial results survive a time-out
        x = torch.randn(m, k, generator=gen).half().cuda()
        row = {"m": m, "cublas_fp16": bench(lambda x=x: torch.nn.functional.linear(x, w16))}
        try:
            row["w4a16_sm90"] = bench(  # the layout's automatic entry: the decode kernel or the wgmma GEMM
                lambda x=x: select.matmul("quick_sm90", x, p16["qweight"], p16["scales"], p16["zeros"], 128)
            )
        except Exception as e:  # noqa: BLE001
            row["w4a16_sm90_error"] = repr(e)
        xq, sx = w8.quantize_activations_sm90(x)
        row["quant_only"] = bench(lambda x=x: w8.quantize_activations_sm90(x))
        for g, name, widen in ((-1, "channel", False), (128, "group", True), (128, "group_fold", False)):
            p = packs[g]
            gs = p.get("group_scale")
            row[f"w4a8_{name}"] = bench(
                lambda x=x, p=p, gs=gs, g=g, widen=widen: w8.gemm_w4a8_sm90(
                    x, p["qweight"], p["channel_scale"], gs, g, widen=widen
                )
            )
            # GEMM only, over candidate configs and split rounds (the tuning sweep)
            best = None
            sweep = []
            cands = w8.candidates(m, g, widen)
            if m >= 256:  # measured: the ring loses at large M, and split rounds do not matter there
                cands = [c for c in cands if c.pipe != 0]
            for cfg in cands:
                for rounds in (None,) if m >= 256 else (None, 2):
                    try:
                        t = bench(
                            lambda xq=xq, sx=sx, p=p, gs=gs, g=g, cfg=cfg, rounds=rounds, widen=widen: (
                                w8.gemm_w4a8_sm90_q(
                                    xq,
                                    sx,
                                    p["qweight"],
                                    p["channel_scale"],
                                    gs,
                                    g,
                                    None,
                                    torch.float16,
                                    cfg,
                                    rounds=rounds,
                                    widen=widen,
                                )
                            )
                        )
                    except Exception as e:  # noqa: BLE001
                        sweep.append({**cfg.__dict__, "rounds": rounds, "error": repr(e)})
                        continue
                    sweep.append({**cfg.__dict__, "rounds": rounds, "us": t})
                    if best is None or t < best["us"]:
                        best = {**cfg.__dict__, "rounds": rounds, "us": t}
            row[f"w4a8_{name}_gemm_best"] = best
            row[f"w4a8_{name}_sweep"] = sweep
        rows.append(row)
        print(json.dumps({kk: v for kk, v in row.items() if not kk.endswith("sweep")}), flush=True)
        res["rows"] = rows  # partial results survive a time-out
        (OUT / "w4a8_sm90_time.json").write_text(json.dumps({**res, "ok": False, "partial": True}, default=str))
    res["ok"] = True


def run_part(name: str) -> int:
    res: dict = {"part": name}
    t0 = time.time()
    try:
        globals()[f"part_{name}"](res)
    except Exception:  # noqa: BLE001
        res["ok"] = False
        res["error"] = traceback.format_exc()
    res["seconds"] = time.time() - t0
    (OUT / f"w4a8_sm90_{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if res.get("ok") else 1


def summary(name: str) -> str:
    p = OUT / f"w4a8_sm90_{name}.json"
    if not p.exists():
        return f"{name}: no result (timed out or crashed)"
    r = json.loads(p.read_text())
    s = f"{name}: {'OK' if r.get('ok') else 'FAIL'} ({r.get('seconds', 0):.0f} s)"
    if "error" in r:
        s += "\n  " + r["error"].strip().splitlines()[-1]
    if "cases" in r:
        bad = [c for c in r["cases"] if not c.get("ok", c.get("xq_equal", True))]
        s += f"  {len(r['cases']) - len(bad)}/{len(r['cases'])} pass"
        for c in bad[:8]:
            s += "\n  FAIL " + json.dumps(c)
        errs = [c["err"] for c in r["cases"] if "err" in c and c["finite"]]
        if errs:
            s += f"  max err {max(errs):.2e}"
    if name == "build" and "variants" in r:
        for v in r["variants"]:
            d = v["defines"]
            g = v["sass"].get("quick_w4a8_sm90_gemm", {})
            s += (
                f"\n  NT={d['QW_NT']} G={d['QW_GROUP']} BF16={d['QW_BF16']}"
                f" NWG={d['QW_NWG']} PIPE={d['QW_PIPE']} ORDER={d['QW_ORDER']}"
                f" ptxas={v['ptxas'].get('quick_w4a8_sm90_gemm')} warn={v['warnings']} IGMMA={g.get('IGMMA')}"
                f" LDG128={g.get('LDG128')} LDL/STL={g.get('LDL')}/{g.get('STL')}"
            )
    if name == "time" and "rows" in r:
        s += "\n  M  cuBLAS  w4a16_sm90  quant | per format: op (vs cuBLAS) gemm_best config  (us)"
        for row in r["rows"]:
            cb = row["cublas_fp16"]
            s += f"\n  {row['m']:>4} {cb:7.1f} {row.get('w4a16_sm90', float('nan')):7.1f} {row['quant_only']:6.1f}"
            for name in ("channel", "group", "group_fold"):
                if f"w4a8_{name}" not in row:
                    continue
                b, t = row.get(f"w4a8_{name}_gemm_best") or {}, row[f"w4a8_{name}"]
                s += (
                    f" | {name} {t:7.1f} ({cb / t:.2f}x) {b.get('us', float('nan')):7.1f}"
                    f" nt={b.get('nt')}x{b.get('nwg')} p{b.get('pipe')}o{b.get('order')}q{b.get('q1')}"
                    f"w{b.get('widen')} r={b.get('rounds')}"
                )
    return s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=sorted(PARTS))
    ap.add_argument("--only", nargs="*", default=list(PARTS))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args.part)
    rc = 0
    t_start = time.time()
    for name in args.only:
        t0 = time.time()
        limit = max(5.0, min(PARTS[name], args.budget - (t0 - t_start)))
        try:
            p = subprocess.run(
                [sys.executable, __file__, "--part", name], timeout=limit, capture_output=True, text=True
            )
            (OUT / f"w4a8_sm90_{name}.log").write_text(p.stdout + p.stderr)
            rc |= p.returncode
        except subprocess.TimeoutExpired as e:
            tail = "".join(
                v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for v in (e.stdout, e.stderr)
            )
            (OUT / f"w4a8_sm90_{name}.log").write_text(f"TIMEOUT after {limit:.0f} s\n{tail}")
            rc |= 1
        print(summary(name) + f"  [{time.time() - t0:.0f} s wall]", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
