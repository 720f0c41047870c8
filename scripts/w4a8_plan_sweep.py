#!/usr/bin/env python3
"""Tile x split-k sweep of the Hopper W4A8 GEMM on the Llama layer shapes where the automatic plan lost to cuBLAS
(device window 4, H200: 4096x11008 at M = 32/128/256, 4096x14336 at M = 512/1024, 4096^2 at M >= 1024).

    OUT=$OUT timeout 200 python3 scripts/w4a8_plan_sweep.py [--budget 170]

Per (K, N, M) cell and weight format (per-channel; g128 with scales <= 16, widened): cuBLAS fp16, the automatic
choice, and every pipeline-3 token tile near M x split counts {1, 2, 3, 4, 6}, GEMM only (activations quantized
once), median of L2-flushed CUDA-graph replays (benchmarks/common). Every config and split count is one the GPU
tests check against the float64 reference. Writes ``$OUT/w4a8_plan_sweep.json`` after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "w4a8_plan_out"))
CELLS = [
    (4096, 11008, (32, 128, 256, 512)),
    (4096, 14336, (128, 512, 1024)),
    (4096, 4096, (256, 1024, 4096)),
    (8192, 8192, (32, 128, 256)),
    (11008, 4096, (256, 1024)),
]
SPLITS = (1, 2, 3, 4, 6)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=170.0)
    args = ap.parse_args()
    from benchmarks import common
    from quick.kernels import quick_w4a8_sm90 as w8
    from quick.packing.layouts import pack_w4a8_sm90
    from quick.quant.w4a8_format import W4A8Weight

    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {"gpu": torch.cuda.get_device_name(), "cells": []}
    gen = torch.Generator().manual_seed(11)

    def bench(fn) -> float:
        return common.bench_us(common.graphed(fn), warmup_ms=2, rep_ms=8)

    for k, n, ms in CELLS:
        q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        gs = torch.randint(1, 17, (k // 128, n), generator=gen, dtype=torch.int16)
        cs = torch.rand(n, generator=gen) * 1e-3 + 1e-4
        packs = {
            g: {kk: v.cuda() for kk, v in pack_w4a8_sm90(W4A8Weight(q, cs, gs if g > 0 else None, g)).items()}
            for g in (-1, 128)
        }
        w16 = (torch.randn(n, k, generator=gen) * 0.02).half().cuda()
        for m in ms:
            if time.time() - t0 > args.budget:
                res["cut"] = True
                break
            x = torch.randn(m, k, generator=gen).half().cuda()
            xq, sx = w8.quantize_activations_sm90(x)
            cell = {
                "k": k,
                "n": n,
                "m": m,
                "cublas_fp16": bench(lambda x=x, w16=w16: torch.nn.functional.linear(x, w16)),
            }
            for g in (-1, 128):
                p, widen = packs[g], g > 0
                gsc = p.get("group_scale")

                def gemm(cfg=None, splits=None, p=p, g=g, gsc=gsc, widen=widen, xq=xq, sx=sx):
                    return w8.gemm_w4a8_sm90_q(
                        xq, sx, p["qweight"], p["channel_scale"], gsc, g, None, torch.float16, cfg, splits, widen=widen
                    )

                sms = w8.num_sms(x.device)
                auto_cfg, auto_splits, rounds = w8.auto_config(m, n, k, sms, g, widen)
                auto_plan = w8.plan(m, n, k, sms, auto_cfg, auto_splits, g, rounds)
                runs = [{"auto": True, **asdict(auto_cfg), "splits": auto_plan.splits, "us": bench(gemm)}]
                smemw = w8.WIDEN_SMEMW if widen else w8.SMEMW
                for nt, cfg in smemw.items():
                    if nt > max(8, 2 * m) or nt < m // 16:
                        continue
                    for s in SPLITS:
                        try:
                            t = bench(lambda cfg=cfg, s=s, gemm=gemm: gemm(cfg, s))
                        except Exception as e:  # noqa: BLE001
                            runs.append({**asdict(cfg), "splits": s, "error": repr(e)[:200]})
                            continue
                        runs.append({**asdict(cfg), "splits": s, "us": t})
                ok = [r for r in runs if "us" in r]
                best = min(ok, key=lambda r: r["us"])
                cell[f"g{g}"] = {"runs": runs, "best": best}
                print(
                    f"{k}x{n} M={m} g={g}: cuBLAS {cell['cublas_fp16']:.1f} auto {runs[0]['us']:.1f} "
                    f"(nt {auto_cfg.nt} s {auto_plan.splits}) best {best['us']:.1f} (nt {best['nt']} "
                    f"s {best['splits']})",
                    flush=True,
                )
            res["cells"].append(cell)
            (OUT / "w4a8_plan_sweep.json").write_text(json.dumps(res, indent=1))
    (OUT / "w4a8_plan_sweep.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
