#!/usr/bin/env python3
"""One GPU run for the sm_90 QUICK kernel: build, SASS check, correctness matrix, timing table.

Usage on an sm_90 GPU:  ``PYTHONUNBUFFERED=1 timeout 420 python3 scripts/sm90_check.py``
Writes details under ``$OUT`` (or ``./sm90_out``) and prints a short table last. Every check draws fresh
random inputs, poisons the output with NaN, compares against a float64 reference and fails loudly.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from quick.formats.layouts import get_layout  # noqa: E402
from quick.kernels import jit  # noqa: E402
from quick.kernels import wgmma as sm  # noqa: E402
from quick.testing import REL_BOUND, poisoned, random_quantized, reference_matmul, rel_error  # noqa: E402

M_ALL = (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 128, 255, 256, 1000, 4096)
TIME_M = (1, 16, 64, 128, 256, 1024, 4096)


def log(msg: str, fh) -> None:
    print(msg, flush=True)
    fh.write(msg + "\n")
    fh.flush()


def candidates(m: int) -> list[sm.Sm90Config]:
    """Configs timed per M: the default tile under each weight pipeline (ring, groups, groups-relaxed)."""
    return list(dict.fromkeys(sm.default_config(m, 128, pipe) for pipe in sorted(sm.PIPES)))


def make_case(k: int, n: int, g: int, dtype: torch.dtype, dev: str, gen: torch.Generator):
    qw = random_quantized(k, n, g, dtype, "cpu", gen)
    qw_dev = type(qw)(qw.q.to(dev), qw.scales.to(dev), qw.zeros.to(dev), qw.group_size)
    packed = get_layout("quick_sm90").pack(qw_dev)
    return qw_dev, packed


def check_one(x, qw, packed, g, bias=None, config=None, splits=None) -> tuple[float, bool, torch.Tensor]:
    m, n = x.shape[0], qw.q.shape[1]
    out = poisoned((m, n), x.dtype, x.device)
    sm.gemm_w4a16_sm90(x, packed["qweight"], packed["scales"], packed["zeros"], g, bias, config, splits, out)
    torch.cuda.synchronize()
    ref = reference_matmul(x, qw, bias)
    err = rel_error(out, ref)
    return err, bool(torch.isfinite(out).all()), out


def smoke(fh) -> int:
    """A few tiny cases first, under a short timeout: a hang or a gross error stops the call early."""
    gen = torch.Generator().manual_seed(int(time.time()))
    fails = 0
    cases = ((1, 256, 128, 128, None), (33, 512, 192, 64, 3), (130, 256, 256, 32, None), (5, 2048, 256, 128, 1))
    for pipe in sorted(sm.PIPES):
        for dt in (torch.float16, torch.bfloat16):
            for m, k, n, g, splits in cases:
                qw, packed = make_case(k, n, g, dt, "cuda", gen)
                x = torch.randn(m, k, generator=gen).to(dt).to("cuda")
                cfg = sm.default_config(m, g, pipe)
                err, finite, _ = check_one(x, qw, packed, g, None, cfg, splits)
                ok = finite and err < REL_BOUND[dt]
                fails += not ok
                tag = "ok  " if ok else "FAIL"
                log(f"{tag} smoke pipe={pipe} M={m} K={k} N={n} g={g} {dt} splits={splits} rel={err:.2e}", fh)
    return fails


def correctness(fh, results: dict, quick: bool, pipe: int) -> int:
    """The matrix with default configs of one pipeline (``sm.DEFAULT_PIPE`` set for the duration)."""
    sm.DEFAULT_PIPE = pipe
    dev = "cuda"
    gen = torch.Generator().manual_seed(int(time.time()))
    fails = 0
    cases = []
    for dt in (torch.float16, torch.bfloat16):
        for m in M_ALL:
            cases.append((m, 4096, 4096, 128, dt, None, None))
        for k, n in ((4096, 11008), (11008, 4096), (8192, 8192), (5120, 13824)):
            for m in (1, 17, 128, 1000) if not quick else (1, 100):
                cases.append((m, k, n, 128, dt, None, None))
        for k, n in ((192, 320), (320, 192), (64, 64), (448, 576), (576, 64)):
            for g in (32, 64):
                for m in (1, 7, 17, 100, 255):
                    cases.append((m, k, n, g, dt, None, None))
        for g in (32, 64, -1):
            for m in (1, 64, 256):
                cases.append((m, 4096, 4096, g, dt, None, None))
        for splits in (1, 3, 7):  # forced split-k factors, including uneven splits
            cases.append((33, 4160, 1088, 64, dt, None, splits))
    cache: dict = {}
    for m, k, n, g, dt, cfg, splits in cases:
        key = (k, n, g, dt)
        if key not in cache:
            cache.clear()
            cache[key] = make_case(k, n, g, dt, dev, gen)
        qw, packed = cache[key]
        x = torch.randn(m, k, generator=gen).to(dt).to(dev)
        try:
            err, finite, _ = check_one(x, qw, packed, g, None, cfg, splits)
            ok = finite and err < REL_BOUND[dt]
        except Exception as e:  # noqa: BLE001 - report and keep going: one table of all failures
            err, finite, ok = float("nan"), False, False
            log(f"EXC {m=} {k=} {n=} {g=} {dt}: {e!r}", fh)
            traceback.print_exc(file=fh)
        fails += not ok
        tag = "ok  " if ok else "FAIL"
        name = f"pipe={pipe} M={m} K={k} N={n} g={g} {str(dt)[6:]} splits={splits}"
        log(f"{tag} {name} rel={err:.2e}", fh)
        results["correctness"].append({"case": name, "rel": err, "finite": finite, "ok": ok})
    # bias, determinism of split-k (bitwise, repeated), every timed candidate config at 4096 x 4096
    for dt in (torch.float16, torch.bfloat16):
        qw, packed = make_case(1024, 512, 128, dt, dev, gen)
        x = torch.randn(5, 1024, generator=gen).to(dt).to(dev)
        bias = torch.randn(512, generator=gen).to(dt).to(dev)
        err, finite, _ = check_one(x, qw, packed, 128, bias)
        ok = finite and err < REL_BOUND[dt]
        fails += not ok
        log(f"{'ok  ' if ok else 'FAIL'} pipe={pipe} bias {dt} rel={err:.2e}", fh)
        qw, packed = make_case(4096, 4096, 128, dt, dev, gen)
        x = torch.randn(16, 4096, generator=gen).to(dt).to(dev)
        outs = [check_one(x, qw, packed, 128, None, None, 5)[2] for _ in range(3)]
        same = all(torch.equal(outs[0], o) for o in outs[1:])
        fails += not same
        log(f"{'ok  ' if same else 'FAIL'} pipe={pipe} split-k determinism {dt} (3 runs, splits=5, bitwise)", fh)
        for m in TIME_M if pipe == 0 else ():  # every timed candidate (all pipelines), once
            for cfg in candidates(m):
                xm = torch.randn(m, 4096, generator=gen).to(dt).to(dev)
                err, finite, _ = check_one(xm, qw, packed, 128, None, cfg)
                ok = finite and err < REL_BOUND[dt]
                fails += not ok
                log(f"{'ok  ' if ok else 'FAIL'} cfg {cfg} M={m} {dt} rel={err:.2e}", fh)
    return fails


def sass(fh, results: dict) -> None:
    tool = shutil.which("cuobjdump")
    if tool is None:
        log("cuobjdump not found", fh)
        return
    out_dir = Path(results["out_dir"])
    combos = [(nt, dt, 0) for nt in (8, 64, 256) for dt in (torch.float16, torch.bfloat16)]
    combos += [(nt, torch.float16, pipe) for nt in (8, 128, 256) for pipe in (1, 2)]
    for nt, dt, pipe in combos:
        cfg = sm.default_config(nt, 128, pipe)
        res = jit.compile_cubin(sm.SOURCE, "sm_90a", cfg.defines(128, dt))
        text = subprocess.run([tool, "-sass", str(res.cubin)], capture_output=True, text=True).stdout
        counts = {op: len(re.findall(rf"\b{op}\b", text)) for op in ("HGMMA", "LDL", "STL", "HMMA")}
        counts["LDG.128"] = len(re.findall(r"LDG\.E\.128", text))
        counts["regs/spills"] = re.findall(r"Used \d+ registers|\d+ bytes spill stores", res.log)
        log(f"SASS nt={nt} pipe={pipe} {str(dt)[6:]}: {counts}", fh)
        results["sass"].append({"nt": nt, "dtype": str(dt), **counts})
        if nt == 8 and pipe == 2:
            (out_dir / "sass_nt8_pipe2_fp16.txt").write_text(text)


def timing(fh, results: dict) -> list[str]:
    import triton.testing as tt

    dev = "cuda"
    k = n = 8192
    gen = torch.Generator().manual_seed(1)
    qw, packed = make_case(k, n, 128, torch.float16, dev, gen)
    w16 = qw.dequantize(torch.float16).t().contiguous()  # [N, K] for F.linear
    rows = []
    for m in TIME_M:
        x = torch.randn(m, k, generator=gen).to(torch.float16).to(dev)
        t_cublas = tt.do_bench(lambda x=x: torch.nn.functional.linear(x, w16), warmup=25, rep=100, return_mode="median")
        nbytes = k * n // 2 + 2 * 2 * (k // 128) * n + 2 * m * k + 2 * m * n
        roof = max(nbytes / 3.02e12, 2 * m * k * n / 664e12) * 1e6
        best = None
        default_t = None
        for cfg in candidates(m):
            p0 = sm.plan(m, n, k, sm.num_sms(torch.device(dev)), cfg)
            splits_opts = [None] + sorted({1, 2, 4} - {p0.splits})
            for s in splits_opts:
                fn = lambda x=x, cfg=cfg, s=s: sm.gemm_w4a16_sm90(  # noqa: E731
                    x, packed["qweight"], packed["scales"], packed["zeros"], 128, None, cfg, s
                )
                t = tt.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                p = sm.plan(m, n, k, sm.num_sms(torch.device(dev)), cfg, s)
                log(f"time M={m} {cfg} splits={p.splits} grid={p.grid}: {t:.1f} us (cuBLAS {t_cublas * 1e3:.1f})", fh)
                results["timing"].append(
                    {
                        "m": m,
                        "config": cfg.__dict__,
                        "splits": p.splits,
                        "us": t,
                        "cublas_us": t_cublas * 1e3,
                        "roofline_us": roof,
                    }
                )
                if default_t is None:
                    default_t = t  # pipeline 0, split heuristic
                if best is None or t < best[0]:
                    best = (t, cfg, p.splits)
        results.setdefault("best", []).append({"m": m, "config": best[1].__dict__, "splits": best[2], "us": best[0]})
        rows.append(
            f"{m:5d} | {roof:7.1f} | {t_cublas * 1e3:8.1f} | {default_t:8.1f} | {best[0]:8.1f} "
            f"| {t_cublas * 1e3 / best[0]:5.2f}x | {roof / best[0] * 100:5.1f}% | nt={best[1].nt} wg={best[1].nwg} "
            f"st={best[1].stages} grp={best[1].grp} pipe={best[1].pipe} s={best[2]}"
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller correctness matrix")
    ap.add_argument("--smoke", action="store_true", help="only a few tiny cases (run first, short timeout)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or "sm90_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ("sm90_smoke.log" if args.smoke else "sm90_check.log"), "w")
    results: dict = {"out_dir": str(out_dir), "correctness": [], "sass": [], "timing": []}
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name} torch {torch.__version__} sms {props.multi_processor_count}", fh)
    if args.smoke:
        fails = smoke(fh)
        log(f"SMOKE FAILURES: {fails}", fh)
        return 1 if fails else 0
    t0 = time.time()
    jobs = {
        (sm.SOURCE, "sm_90a", tuple(sorted(c.defines(128, dt).items())))
        for m in TIME_M
        for c in candidates(m)
        for dt in (torch.float16, torch.bfloat16)
    }
    jobs |= {(s, "sm_90a", tuple(sorted(d.items()))) for s, _, d in sm.VARIANTS}
    built = jit.compile_many([(s, a, dict(d)) for s, a, d in sorted(jobs)], workers=16)
    for (_s, _a, d), r in zip(sorted(jobs), built, strict=True):
        regs = re.findall(r"Used (\d+) registers", r.log)
        results.setdefault("ptxas", []).append({"defines": dict(d), "regs": regs, "spill_bytes": r.spills})
        if r.spills:
            log(f"SPILLS {dict(d)}: {r.spills} bytes", fh)
    log(f"built {len(built)} variants in {time.time() - t0:.0f} s", fh)
    sass(fh, results)
    fails = 0
    if not args.skip_correctness:
        t1 = time.time()
        for pipe in sorted(sm.PIPES):
            f = correctness(fh, results, args.quick, pipe)
            results.setdefault("failures_by_pipe", {})[pipe] = f
            fails += f
        sm.DEFAULT_PIPE = 0
        log(f"correctness: {results['failures_by_pipe']} failures by pipeline, {time.time() - t1:.0f} s", fh)
    rows = [] if args.skip_timing else timing(fh, results)
    (out_dir / "sm90_check.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n    M | roofline |  cuBLAS  | sm90 dft | sm90 best | vs cuBLAS | of roof | best config", fh)
    for r in rows:
        log(r, fh)
    log(f"FAILURES: {fails} {results.get('failures_by_pipe', {})}", fh)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
