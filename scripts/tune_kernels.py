#!/usr/bin/env python3
"""Measure the kernel tables the automatic routes read (``quick/kernels/tuning.py``), one device call.

    OUT=$OUT python3 scripts/tune_kernels.py [--budget-s 420] [--shapes 4096x4096 ...] [--ms 1 8 64 ...]

For every (K, N) and M: each candidate of the ``quick_sm90`` layout (the decode kernel's configs and split counts for
M <= 64, the wgmma kernel's tuned choice, its tile alternatives and split counts) is first checked against an fp32
reference of dequantize-then-matmul on fresh random data (NaN-poisoned output, the float64 tests' relative bounds),
then timed as benchmarks/kernel.py times (median of do_bench, L2 flushed, CUDA-graph replay). Only checked candidates
can win. Writes ``$OUT/tune_rows.json`` (every row, after each shape) and ``$OUT/<gpu>.json`` (the table: commit it
to ``quick/kernels/tables/``). Shapes run in the order given and stop at the budget, so put the important ones first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from common import bench_us, graphed  # noqa: E402

from quick.kernels import quick_dec as qd  # noqa: E402
from quick.kernels import quick_sm90 as sm  # noqa: E402
from quick.kernels import tuning  # noqa: E402
from quick.testing import REL_BOUND, pack, poisoned, random_quantized, rel_error  # noqa: E402

# Llama-2-7B / Llama-3-8B / Mistral-7B projections, fused (q|k|v, gate|up) first, as the inference path runs them
SHAPES = (
    (4096, 12288),
    (4096, 22016),
    (11008, 4096),
    (4096, 4096),
    (4096, 6144),
    (4096, 28672),
    (14336, 4096),
    (4096, 11008),
    (4096, 14336),
    (8192, 8192),
)
MS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def candidates(m: int, n: int, k: int, nsm: int) -> list[tuple[str, dict, int | None, object]]:
    """(kernel, config fields, splits, call) for one shape; ``call(x, p)`` runs it into a given ``out``."""
    out = []
    if m <= qd.MAX_M_BY_LAYOUT["quick_sm90"]:
        top = qd.bucket("quick_sm90", m)
        for cfg in dict.fromkeys((qd.default_config("quick_sm90", m), *qd.CANDIDATES["quick_sm90"][top])):
            if not qd.fits(cfg, m, n):
                continue
            for s in sorted({qd.plan(m, n, k, 128, nsm, cfg, waves=w).splits for w in (0.5, 1, 2, 3)}):
                out.append(("dec", dataclasses.asdict(cfg), s, cfg))
    tuned, rounds = sm.tuned_config(m, torch.float16, 128)
    base = sm.plan(m, n, k, nsm, tuned, None, 128, rounds).splits
    cfgs = [tuned]
    if m >= 64:  # tile alternatives: the neighbouring token tiles of each pipeline that fits them
        tiles = {min(256, max(64, t)) for t in (m // 2, m, 2 * m)} | ({128} if m >= 256 else set())
        for nt in sorted(tiles):  # 128-token tiles at large M: twice the units, a smaller last wave
            for pipe in (0, 2):
                if pipe and nt == 256:
                    continue
                cfgs.append(sm.default_config(nt, 128, pipe))
    for cfg in dict.fromkeys(cfgs):
        splits = {base, 1, 2, 3, 4} if cfg == tuned else {1, 2, 3}
        for s in sorted(splits):
            out.append(("wgmma", dataclasses.asdict(cfg), s, cfg))
    return out


def run(kernel: str, cfg, splits: int, x, p, out) -> None:
    if kernel == "dec":
        qd.gemv("quick_sm90", x, p["qweight"], p["scales"], p["zeros"], 128, config=cfg, splits=splits, out=out)
    else:
        sm.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], 128, config=cfg, splits=splits, out=out)


def tune_shape(k: int, n: int, ms, nsm: int, gen, rows: list, deadline: float) -> None:
    qw = random_quantized(k, n, 128, torch.float16, "cuda", generator=gen)
    p = pack(qw, "quick_sm90")
    w32 = qw.dequantize(torch.float32)  # [K, N], on the weights' device
    for m in ms:
        if time.time() > deadline:
            return
        x = (torch.randn(m, k, generator=gen) * 0.5).half().cuda()
        ref = x.float() @ w32
        for kernel, fields, splits, cfg in candidates(m, n, k, nsm):
            if time.time() > deadline:
                return
            row = {"layout": "quick_sm90", "K": k, "N": n, "M": m, "kernel": kernel, "config": fields, "splits": splits}
            try:
                out = poisoned((m, n), torch.float16, "cuda")
                run(kernel, cfg, splits, x, p, out)
                err = rel_error(out, ref)
                row["rel_err"] = err
                row["ok"] = bool(torch.isfinite(out).all()) and err < REL_BOUND[torch.float16]
                if row["ok"]:
                    out2 = torch.empty_like(out)
                    call = lambda kn=kernel, c=cfg, s=splits, xx=x, o=out2: run(kn, c, s, xx, p, o)  # noqa: E731
                    row["us"] = round(bench_us(graphed(call)), 2)
            except Exception as e:  # noqa: BLE001 - a failing candidate is a row, not the end of the run
                row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        ok = [r for r in rows if r["K"] == k and r["N"] == n and r["M"] == m and r.get("us")]
        bad = sum(1 for r in rows if r["K"] == k and r["N"] == n and r["M"] == m and not r.get("ok"))
        best = min(ok, key=lambda r: r["us"]) if ok else None
        tuned = dataclasses.asdict(sm.tuned_config(m, torch.float16)[0])
        wg = [r["us"] for r in ok if r["kernel"] == "wgmma" and r["config"] == tuned]
        print(
            f"{k:>5}x{n:<6} M={m:<5} best {best['kernel'] if best else '-':>5} "
            f"{best['us'] if best else float('nan'):8.2f} us  (tuned wgmma {min(wg) if wg else float('nan'):8.2f}; "
            f"{len(ok)} timed, {bad} failed)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES])
    ap.add_argument("--ms", nargs="*", type=int, default=list(MS))
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    gpu = torch.cuda.get_device_name(0)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(20261205)
    rows: list[dict] = []
    for shape in a.shapes:
        k, n = (int(v) for v in shape.split("x"))
        try:
            tune_shape(k, n, a.ms, nsm, gen, rows, t0 + a.budget_s)
        except Exception:  # noqa: BLE001
            print(traceback.format_exc(), flush=True)
        (out / "tune_rows.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}))
    table = tuning.build_table(rows, gpu, torch.__version__, time.strftime("%Y-%m-%d"))
    (out / f"{tuning.gpu_key(gpu)}.json").write_text(json.dumps(table, indent=1))
    failed = sum(1 for r in rows if not r.get("ok"))
    print(
        f"{len(rows)} candidates, {failed} failed their check, {len(table['entries'])} table entries, "
        f"{time.time() - t0:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
