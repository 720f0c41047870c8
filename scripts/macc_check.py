#!/usr/bin/env python3
"""Decode experiment (device window 4): independent accumulator sets (``macc``) in the Hopper kernels.

    OUT=$OUT timeout 200 python3 scripts/macc_check.py

Hypothesis (ncu, window 4: quick_sm90 at M = 1 issues 54 % of cycles and stalls on fixed-latency waits; the
W4A8 GEMM likewise): at 8-16 tokens one wgmma is a few tensor clocks, so the four wgmmas of a stage, chained on
one accumulator, run at the wgmma latency. With ``macc`` sets they are independent. For each tuned decode config
of both kernels and macc in {1, 2, 4}: float64-reference checks on fresh data (uneven split-k, bias, bf16), then
the median of L2-flushed CUDA-graph replays at K = N = 8192 and 4096. Writes ``$OUT/macc.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "macc_out"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    from benchmarks import common
    from quick.kernels import quick_sm90 as sm
    from quick.kernels import quick_w4a8_sm90 as w8
    from quick.packing.layouts import get_layout, pack_w4a8_sm90
    from quick.quant.w4a8_format import W4A8Weight, w4a8_reference
    from quick.testing import random_quantized

    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {"gpu": torch.cuda.get_device_name(), "checks": [], "times": []}
    gen = torch.Generator().manual_seed(7)

    def bench(fn) -> float:
        return common.bench_us(common.graphed(fn), warmup_ms=3, rep_ms=12)

    w16 = {}
    w48 = {}
    for kn in (4096, 8192):
        qw = random_quantized(kn, kn, 128, torch.float16, "cpu", gen)
        w16[kn] = (qw, {k: v.cuda() for k, v in get_layout("quick_sm90").pack(qw).items()})
        q = torch.randint(-8, 8, (kn, kn), generator=gen, dtype=torch.int8)
        gs = torch.randint(1, 17, (kn // 128, kn), generator=gen, dtype=torch.int16)
        for g in (-1, 128):
            w = W4A8Weight(q, torch.rand(kn, generator=gen) * 1e-3 + 1e-4, gs if g > 0 else None, g)
            w48[(kn, g)] = (w, {k: v.cuda() for k, v in pack_w4a8_sm90(w).items()})
    # small shape for checks: partial tiles, uneven split, bias
    qs = random_quantized(1408, 640, 128, torch.float16, "cpu", gen)
    ps = {k: v.cuda() for k, v in get_layout("quick_sm90").pack(qs).items()}
    wds = qs.dequantize(torch.float64).cuda()

    sm_cfgs = [(b, c, r) for b, c, r in sm.TUNED["fp16"] if b <= 64]
    w8_cfgs = [
        (b, c, r, g) for g, key in ((128, "group_widen"), (-1, "channel")) for b, c, r in w8.TUNED[key] if b <= 128
    ]
    for bound, cfg0, rounds in sm_cfgs:
        for macc in (1, 2, 4):
            cfg = replace(cfg0, macc=macc)
            try:
                for m, dt, splits, bias in (
                    (max(1, bound - 1), torch.float16, 3, True),
                    (bound + 1, torch.bfloat16, 2, False),
                ):
                    x = torch.randn(m, 1408, generator=gen).to(dt).cuda()
                    b = (torch.randn(640, generator=gen) * 0.1).to(dt).cuda() if bias else None
                    p = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in ps.items()}
                    out = torch.full((m, 640), float("nan"), dtype=dt, device="cuda")
                    sm.gemm_w4a16_sm90(x, p["qweight"], p["scales"], p["zeros"], 128, b, cfg, splits, out)
                    ref = x.double() @ wds + (b.double() if b is not None else 0)
                    e = rel(out, ref)
                    bnd = 2e-3 if dt == torch.float16 else 1.6e-2
                    ok = bool(torch.isfinite(out).all()) and e <= bnd
                    res["checks"].append(
                        {"kernel": "w4a16_sm90", "cfg": asdict(cfg), "m": m, "dtype": str(dt), "err": e, "ok": ok}
                    )
                for kn in (8192, 4096):
                    qw, p = w16[kn]
                    for m in sorted({1, bound} if bound <= 16 else {bound}):
                        x = torch.randn(m, kn, generator=gen).half().cuda()
                        sp = sm.plan(m, kn, kn, sm.num_sms(torch.device("cuda")), cfg0, None, 128, rounds).splits
                        t = bench(
                            lambda x=x, p=p, cfg=cfg, sp=sp: sm.gemm_w4a16_sm90(
                                x, p["qweight"], p["scales"], p["zeros"], 128, None, cfg, sp
                            )
                        )
                        res["times"].append(
                            {"kernel": "w4a16_sm90", "kn": kn, "m": m, "macc": macc, "cfg": asdict(cfg), "us": t}
                        )
                        print(
                            f"w4a16_sm90 {kn}^2 M={m} nt={cfg.nt} nwg={cfg.nwg} wtma={cfg.wtma} macc={macc}: {t:.1f}",
                            flush=True,
                        )
            except Exception:  # noqa: BLE001
                res["checks"].append(
                    {"kernel": "w4a16_sm90", "cfg": asdict(cfg), "error": traceback.format_exc()[-800:], "ok": False}
                )
    for bound, cfg0, _rounds, g in w8_cfgs:
        for macc in (1, 2, 4):
            cfg = replace(cfg0, macc=macc)
            widen = g > 0
            try:
                for m, dt in ((max(1, bound - 3), torch.float16), (bound + 5, torch.bfloat16)):
                    w, p = w48[(4096, g)]
                    x = torch.randn(m, 4096, generator=gen).to(dt).cuda()
                    out = torch.full((m, 4096), float("nan"), dtype=dt, device="cuda")
                    w8.gemm_w4a8_sm90(
                        x, p["qweight"], p["channel_scale"], p.get("group_scale"), g, None, cfg, 5, out, widen
                    )
                    ref = w4a8_reference(x, w)
                    e = rel(out, ref)
                    ok = bool(torch.isfinite(out).all()) and e <= (1e-3 if dt == torch.float16 else 8e-3)
                    res["checks"].append({"kernel": f"w4a8_sm90_g{g}", "cfg": asdict(cfg), "m": m, "err": e, "ok": ok})
                for kn in (8192, 4096):
                    w, p = w48[(kn, g)]
                    m = 1 if bound <= 8 else min(bound, 64)
                    x = torch.randn(m, kn, generator=gen).half().cuda()
                    from quick.kernels.quick_w4a8_sm90 import quantize_activations_sm90

                    xq, sx = quantize_activations_sm90(x)
                    t = bench(
                        lambda xq=xq, sx=sx, p=p, cfg=cfg, g=g, widen=widen: w8.gemm_w4a8_sm90_q(
                            xq,
                            sx,
                            p["qweight"],
                            p["channel_scale"],
                            p.get("group_scale"),
                            g,
                            None,
                            torch.float16,
                            cfg,
                            widen=widen,
                        )
                    )
                    res["times"].append(
                        {"kernel": f"w4a8_sm90_g{g}", "kn": kn, "m": m, "macc": macc, "cfg": asdict(cfg), "us": t}
                    )
                    print(f"w4a8_sm90 g{g} {kn}^2 M={m} nt={cfg.nt} macc={macc}: {t:.1f} us (GEMM)", flush=True)
            except Exception:  # noqa: BLE001
                res["checks"].append(
                    {
                        "kernel": f"w4a8_sm90_g{g}",
                        "cfg": asdict(cfg),
                        "error": traceback.format_exc()[-800:],
                        "ok": False,
                    }
                )
    bad = [c for c in res["checks"] if not c["ok"]]
    res["ok"] = not bad
    (OUT / "macc.json").write_text(json.dumps(res, indent=1))
    print(f"checks: {len(res['checks']) - len(bad)}/{len(res['checks'])} pass")
    for c in bad[:10]:
        print("FAIL", json.dumps(c)[:600])
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
