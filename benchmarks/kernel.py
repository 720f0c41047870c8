#!/usr/bin/env python3
"""W4A16 kernel benchmark: cuBLAS fp16/bf16 (F.linear), torch._weight_int4pack_mm (bf16), the QUICK mma.sync
kernel and the decode GEMV (M <= 8), plus any registered extra implementation (``quick_sm90`` when its module
exists and runs here), in one process and one run.

    python benchmarks/kernel.py [--outdir DIR] [--m 1 16 ...] [--shapes 8192x8192 ...] [--sweep] [--quick]

Writes ``kernel-<gpu>-<date>.json`` ({"gpu", "torch", "date", "ceilings": {"copy_TBps", "fp16_TFLOPS"},
"rows": [{"impl", "M", "K", "N", "dtype", "us", "tflops"}]}), the same table as markdown and a PNG plot of
TFLOP/s against M with the roofline, under ``--outdir`` (default benchmarks/results). ``--sweep`` also times
every GEMM/GEMV config and split-k on a few shapes (the data behind mma.TUNED_GEMM) into
``sweep-<gpu>-<date>.json``. Random data everywhere (never zeros).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quick.formats.layouts import get_layout  # noqa: E402
from quick.formats.weights import QuantizedWeight  # noqa: E402
from quick.kernels import (
    mma,
    select,  # noqa: E402
)

M_LIST = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]
SHAPES = {  # (K, N) = (in_features, out_features)
    "square": (8192, 8192),
    "llama2-7b q/k/v/o": (4096, 4096),
    "llama2-7b gate/up": (4096, 11008),
    "llama2-7b down": (11008, 4096),
    "llama3-8b k/v": (4096, 1024),
    "llama3-8b gate/up": (4096, 14336),
    "llama3-8b down": (14336, 4096),
}
GROUP = 128
ANCHORS_QUICK_ORIG = {
    1: 44.1,
    16: 46.8,
    32: 50.7,
    64: 61.2,
    128: 96.8,
    256: 165.5,
    512: 288.5,
    1024: 572.9,
    4096: 2206.0,
}  # the original QUICK kernel measured on the H100, K = N = 8192 (µs)


# ----------------------------------------------------------------------------------------------- problems


def make_problem(k: int, n: int, seed: int = 0) -> dict:
    """Random weights for every implementation of one (K, N): fp16/bf16 dense, QUICK-packed int4 (g128),
    tinygemm-packed int4."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    p: dict = {"k": k, "n": n, "group": GROUP}
    p["w16"] = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).half()
    p["wbf"] = p["w16"].to(torch.bfloat16)
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda", dtype=torch.uint8)
    for dt, key in ((torch.float16, "quick16"), (torch.bfloat16, "quickbf")):
        scales = ((torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.75 + 0.25) * 0.0025).to(dt)
        zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device="cuda", dtype=torch.uint8)
        qw = QuantizedWeight(q, scales, zeros, GROUP)
        p[key] = get_layout("quick").pack(qw)
        p[key + "_qw"] = qw
    try:
        wu8 = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
        p["int4"] = torch._convert_weight_to_int4pack(wu8, 8)
        p["int4_sz"] = (torch.rand(k // GROUP, n, 2, generator=gen, device="cuda") * 0.01).to(torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - record and go on: the other rows still matter
        p["int4_error"] = f"{type(e).__name__}: {e}"
    return p


def _x(p: dict, m: int, dtype: torch.dtype) -> torch.Tensor:
    key = ("x", m, dtype)
    if key not in p:
        p[key] = torch.randn(m, p["k"], device="cuda", dtype=dtype)
    return p[key]


def _quick(p: dict, m: int, fn):
    x = _x(p, m, torch.float16)
    w = p["quick16"]
    return lambda: fn(x, w["qweight"], w["scales"], w["zeros"], p["group"])


def _int4(p: dict, m: int):
    if "int4" not in p:
        raise RuntimeError(p.get("int4_error", "int4 packing unavailable"))
    x = _x(p, m, torch.bfloat16)
    return lambda: torch._weight_int4pack_mm(x, p["int4"], p["group"], p["int4_sz"])


def _dense(p: dict, dtype: torch.dtype):
    x, w = _x(p, p["m"], dtype), p["w16" if dtype == torch.float16 else "wbf"]
    return lambda: F.linear(x, w)


def _timed(fn, *args, **kw) -> float:
    """Median us of ``fn(*args, **kw)`` replayed from a CUDA graph (short repetitions: the sweep times
    hundreds of variants)."""
    replay = common.graphed(lambda: fn(*args, **kw))
    us = common.bench_us(replay, warmup_ms=5, rep_ms=15)
    del replay
    return us


def register_builtin_impls() -> None:
    common.register_impl(common.Impl("cublas_fp16", "fp16", lambda p: _dense(p, torch.float16)))
    common.register_impl(common.Impl("cublas_bf16", "bf16", lambda p: _dense(p, torch.bfloat16)))
    common.register_impl(common.Impl("torch_int4", "bf16", lambda p: _int4(p, p["m"])))
    common.register_impl(common.Impl("quick", "fp16", lambda p: _quick(p, p["m"], mma.gemm)))
    common.register_impl(
        common.Impl(
            "quick_gemv",
            "fp16",
            lambda p: _quick(p, p["m"], mma.gemv),
            applies=lambda m, k, n: m <= mma.GEMV_MAX_M,
        )
    )
    # The decode kernel (csrc/quick_dec.cu) on the same `quick` packing (M <= 16; quick_sm90 packing: M <= 64).
    from quick.kernels import decode

    common.register_impl(
        common.Impl(
            "quick_dec",
            "fp16",
            lambda p: _quick(p, p["m"], decode.gemv_quick),
            applies=lambda m, k, n: decode.takes("quick", m, n),
        )
    )


def register_optional_impls() -> list[str]:
    """Extra rows from kernel modules that exist and can run here (the Hopper wgmma kernel)."""
    added = []
    try:
        from quick.kernels import wgmma as sm

        if sm.is_available():
            from quick.kernels import decode

            def make(p):
                if "sm90" not in p:
                    p["sm90"] = get_layout("quick_sm90").pack(p["quick16_qw"])
                w, x = p["sm90"], _x(p, p["m"], torch.float16)
                return lambda: sm.gemm_w4a16_sm90(x, w["qweight"], w["scales"], w["zeros"], p["group"])

            common.register_impl(common.Impl("quick_sm90", "fp16", make))
            added.append("quick_sm90")

            def make_dec(p):
                make(p)  # packs the sm90 layout once
                w, x = p["sm90"], _x(p, p["m"], torch.float16)
                return lambda: decode.gemv_sm90(x, w["qweight"], w["scales"], w["zeros"], p["group"])

            common.register_impl(
                common.Impl(
                    "quick_sm90_dec", "fp16", make_dec, applies=lambda m, k, n: decode.takes("quick_sm90", m, n)
                )
            )
            added.append("quick_sm90_dec")
    except Exception as e:  # noqa: BLE001
        print(f"[bench] quick_sm90 not benchmarked: {type(e).__name__}: {e}")
    return added


# --------------------------------------------------------------------------------------------------- W4A8

W4A8_IMPLS = ("quick_w4a8_channel", "quick_w4a8_group")


def _w4a8_packed(p: dict, group: int) -> dict:
    """Random W4A8 weights (full int4 range, group scales 1..16 as the quantizers write them) packed in layout
    ``w4a8`` on the GPU."""
    key = ("w4a8", group)
    if key not in p:
        from quick.formats.layouts import pack_w4a8
        from quick.formats.w4a8 import W4A8Weight

        k, n = p["k"], p["n"]
        gen = torch.Generator(device="cuda").manual_seed(k + n + group)
        q = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        cs = torch.rand(n, generator=gen, device="cuda") * 1e-4 + 1e-5
        gs = None if group < 0 else torch.randint(1, 17, (k // group, n), generator=gen, device="cuda")
        p[key] = pack_w4a8(W4A8Weight(q, cs, None if gs is None else gs.to(torch.int16), group))
    return p[key]


def register_w4a8_impls() -> list[str]:
    """Rows ``quick_w4a8_channel`` / ``quick_w4a8_group``: the whole W4A8 op (activation quantization + int8
    mma.sync GEMM, + split-k reduce where used) on fp16 activations."""
    try:
        from quick.kernels import w4a8_mma as w8
    except Exception as e:  # noqa: BLE001
        print(f"[bench] W4A8 not benchmarked: {type(e).__name__}: {e}")
        return []

    def make(group: int):
        def f(p):
            w, x = _w4a8_packed(p, group), _x(p, p["m"], torch.float16)
            return lambda: w8.gemm_w4a8_cuda(x, w["qweight"], w["channel_scale"], w.get("group_scale"), group)

        return f

    common.register_impl(common.Impl("quick_w4a8_channel", "fp16", make(-1)))
    common.register_impl(common.Impl("quick_w4a8_group", "fp16", make(128)))
    return list(W4A8_IMPLS)


W4A8_SM90_IMPLS = ("quick_w4a8_sm90_channel", "quick_w4a8_sm90_group", "quick_w4a8_sm90_group_fold")


def register_w4a8_sm90_impls() -> list[str]:
    """Rows ``quick_w4a8_sm90_channel`` / ``_group``: the whole W4A8 op on the Hopper wgmma s8 kernel
    (activation quantization + GEMM, layout ``w4a8_sm90``) on fp16 activations; sm_90 only. ``_group`` runs the
    widened kernel (the quantizers' scales <= 16), ``_group_fold`` the per-group fold that older checkpoints with
    larger scales take, on the same weights."""
    try:
        from quick.kernels import w4a8_wgmma as w8s

        if not w8s.is_available():
            return []
    except Exception as e:  # noqa: BLE001
        print(f"[bench] W4A8 sm90 not benchmarked: {type(e).__name__}: {e}")
        return []

    def make(group: int, widen: bool = False):
        def f(p):
            key = ("w4a8_sm90", group)
            if key not in p:
                from quick.formats.layouts import pack_w4a8_sm90, unpack_w4a8

                p[key] = pack_w4a8_sm90(unpack_w4a8(_w4a8_packed(p, group), group))  # the same weights
            w, x = p[key], _x(p, p["m"], torch.float16)
            gs = w.get("group_scale")
            return lambda: w8s.gemm_w4a8_sm90(x, w["qweight"], w["channel_scale"], gs, group, widen=widen)

        return f

    common.register_impl(common.Impl("quick_w4a8_sm90_channel", "fp16", make(-1)))
    common.register_impl(common.Impl("quick_w4a8_sm90_group", "fp16", make(128, widen=True)))
    common.register_impl(common.Impl("quick_w4a8_sm90_group_fold", "fp16", make(128)))
    return list(W4A8_SM90_IMPLS)


def _extra_w4a8() -> list:
    """Candidate W4A8 configs timed by --sweep-w4a8 besides w4a8_mma.CONFIGS (compiled on the spot)."""
    from quick.kernels.w4a8_mma import W4A8Config as C

    return [
        C("x_m16k8", 16, 1, 1, 8, 2, 1, 4, 4),
        C("x_m16n4k2", 16, 1, 4, 2, 2, 2, 3, 2),
        C("x_m32k4nb1", 32, 1, 2, 4, 1, 4, 3, 2),
        C("x_m128n2", 128, 2, 2, 1, 2, 4, 4, 1),
        C("x_m128n4s3", 128, 2, 4, 1, 2, 4, 3, 1),
        C("x_m128n4gs2", 128, 2, 4, 1, 1, 2, 4, 2),
        C("x_m128n2g", 128, 2, 2, 1, 1, 4, 4, 1),
    ]


def _w4a8_fits(cfg, group: int) -> bool:
    """Skip (config, mode) pairs that would spill (see W4A8Config.fits)."""
    return cfg.fits(group)


def sweep_w4a8(log, large_only: bool = False, budget_s: float | None = None, sink: Path | None = None) -> list[dict]:
    """Every W4A8 config x split-k x mode on the shapes that set w4a8_mma.TUNED (activation quant included).
    ``large_only``: only M >= 256 and the configs of w4a8_mma.CONFIGS. ``budget_s``: stop timing after that many
    seconds (the rows so far are kept); ``sink``: append every row to this JSON-lines file as it is measured."""
    t_end = time.time() + budget_s if budget_s else float("inf")
    from quick.kernels import jit
    from quick.kernels import w4a8_mma as w8

    cfgs = [*w8.CONFIGS.values()] if large_only else [*w8.CONFIGS.values(), *_extra_w4a8()]
    if large_only:
        cfgs = [c for c in cfgs if c.bm >= 64]
    arch = jit.arch_for_device()
    jit.compile_many(
        [(w8.GEMM_SOURCE, arch, c.defines(torch.float16, g)) for c in cfgs for g in w8.GROUPS if _w4a8_fits(c, g)]
        + [(w8.ACTQ_SOURCE, arch, {})]
    )
    out = []
    plan = [((8192, 8192), M_LIST), ((4096, 4096), [1, 16, 64, 256, 1024]), ((11008, 4096), [1, 16, 256])]
    if large_only:
        plan = [((8192, 8192), [1024, 4096, 256]), ((4096, 4096), [256])]

    def keep(row: dict) -> None:
        out.append(row)
        if sink is not None:
            with open(sink, "a") as f:
                f.write(json.dumps(row) + "\n")

    for (k, n), ms in plan:
        p = {"k": k, "n": n} if large_only else make_problem(k, n, seed=1)
        for group in w8.GROUPS:
            w = _w4a8_packed(p, group)
            args = (w["qweight"], w["channel_scale"], w.get("group_scale"), group)
            for m in ms:
                x = _x(p, m, torch.float16)
                best = (float("inf"), "", 0)
                for cfg in cfgs:
                    if k % cfg.bks or (cfg.bm >= 64 and m <= 16) or (cfg.bm <= 32 and m >= 1024):
                        continue
                    if not _w4a8_fits(cfg, group) or (cfg.bm >= 128 and m <= 64):
                        continue
                    for s in (1, 2, 4, 8) if cfg.bm <= 32 else (1, 2) if m < 1024 and cfg.bm == 64 else (1,):
                        if s > k // cfg.bks:
                            continue
                        if time.time() > t_end:
                            log(f"[sweep-w4a8] budget of {budget_s} s spent: stopping with {len(out)} rows")
                            return out
                        try:
                            us = _timed(w8.gemm_w4a8_cuda, x, *args, config=cfg, splits=s)
                        except Exception as e:  # noqa: BLE001
                            log(f"[sweep-w4a8] {cfg.name} s={s} M={m}: {type(e).__name__}: {e}")
                            continue
                        keep(
                            {
                                "group": group,
                                "config": cfg.name,
                                "splits": s,
                                "M": m,
                                "K": k,
                                "N": n,
                                "us": round(us, 2),
                            }
                        )
                        best = min(best, (us, cfg.name, s))
                auto = _timed(w8.gemm_w4a8_cuda, x, *args)
                xq = _timed(w8.quantize_activations_cuda, x)
                keep({"group": group, "config": "auto", "splits": 0, "M": m, "K": k, "N": n, "us": round(auto, 2)})
                keep({"group": group, "config": "actquant", "splits": 0, "M": m, "K": k, "N": n, "us": round(xq, 2)})
                log(
                    f"[sweep-w4a8] g={group} K={k} N={n} M={m}: best {best[1]} s={best[2]} {best[0]:.1f} us; "
                    f"auto {auto:.1f} us; actquant {xq:.1f} us"
                )
        del p
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------- run


def run_grid(
    shapes: list[tuple[int, int]],
    ms: list[int],
    impls: list[str],
    ceilings: dict,
    log,
    eager: list,
    floors: dict,
) -> list[dict]:
    """Every implementation x M x shape, timed as CUDA-graph replays; at K = N = 8192 also eagerly (Python
    launch cost included) into ``eager``."""
    rows = []
    for k, n in shapes:
        p = make_problem(k, n, seed=k * 7 + n)
        floors[(k, n)] = round(common.stream_floor_us(int(common.w4_bytes(0, k, n, GROUP))), 2)
        for m in ms:
            p["m"] = m
            for name in impls:
                impl = common.IMPLS[name]
                if not impl.applies(m, k, n):
                    continue
                try:
                    fn = impl.make(p)
                    fn()
                    torch.cuda.synchronize()
                    if (k, n) == (8192, 8192):
                        eager.append({"impl": name, "M": m, "K": k, "N": n, "us": round(common.bench_us(fn), 2)})
                    try:
                        replay = common.graphed(fn)
                    except Exception as e:  # noqa: BLE001
                        log(f"[bench] {name} M={m}: graph capture failed ({type(e).__name__}: {e}); eager timing")
                        replay = fn
                    us = common.bench_us(replay)
                    del replay
                except Exception as e:  # noqa: BLE001
                    log(f"[bench] {name} M={m} K={k} N={n}: FAILED {type(e).__name__}: {e}")
                    continue
                rows.append(
                    {
                        "impl": name,
                        "M": m,
                        "K": k,
                        "N": n,
                        "dtype": impl.dtype,
                        "us": round(us, 2),
                        "tflops": round(common.flops(m, k, n) / (us * 1e-6) / 1e12, 2),
                    }
                )
        for key in [kk for kk in p if isinstance(kk, tuple)]:
            del p[key]
        del p
        torch.cuda.empty_cache()
        log(f"[bench] K={k} N={n} done")
    return rows


# Candidates timed by --sweep besides the shipped configs (compiled on the spot, not part of VARIANTS).
EXTRA_GEMM = [
    mma.GemmConfig("m64k4", 64, 1, 1, 4, 1, 4, 3, 1),
    mma.GemmConfig("m128n2k2", 128, 2, 2, 2, 1, 2, 4, 1),
    mma.GemmConfig("x_m16k16", 16, 1, 1, 16, 1, 2, 3, 2),
    mma.GemmConfig("x_m32k4", 32, 1, 1, 4, 1, 4, 4, 2),
    mma.GemmConfig("x_m64n2k2", 64, 1, 2, 2, 1, 2, 4, 1),
    mma.GemmConfig("x_m128n2", 128, 2, 2, 1, 1, 4, 4, 1),
    mma.GemmConfig("x_m128n4s3", 128, 2, 4, 1, 1, 4, 3, 1),
]
EXTRA_GEMV = [mma.GemvConfig("x_v8nb2", 8, 2, 8), mma.GemvConfig("x_v8r16", 8, 1, 16)]


def sweep(log) -> list[dict]:
    """Every GEMM config x split-k (and GEMV config x split) on the shapes that set the tuning table."""
    out = []
    gemm_cfgs = [*mma.GEMM_CONFIGS.values(), *EXTRA_GEMM]
    gemv_cfgs = [*mma.GEMV_CONFIGS.values(), *EXTRA_GEMV]
    from quick.kernels import jit

    arch = jit.arch_for_device()
    jit.compile_many(
        [(mma.GEMM_SOURCE, arch, c.defines(torch.float16)) for c in EXTRA_GEMM]
        + [(mma.GEMV_SOURCE, arch, c.defines(torch.float16, GROUP)) for c in EXTRA_GEMV]
    )
    plan = [((8192, 8192), [*M_LIST, 8]), ((4096, 4096), [1, 16, 64, 256]), ((11008, 4096), [1, 16, 64, 256])]
    for (k, n), ms in plan:
        p = make_problem(k, n, seed=1)
        w = p["quick16"]
        args = (w["qweight"], w["scales"], w["zeros"], GROUP)
        for m in ms:
            x = _x(p, m, torch.float16)
            cands = [
                ("gemm", c, s)
                for c in gemm_cfgs
                for s in (1, 2, 4, 8)
                if k % c.bks == 0 and s <= k // c.bks and not (c.bm >= 64 and m <= 8)
            ]
            if m <= mma.GEMV_MAX_M:
                cands += [("gemv", c, s) for c in gemv_cfgs for s in (1, 2, 4)]
            best = (float("inf"), "", 0)
            for kind, cfg, s in cands:
                fn = mma.gemm if kind == "gemm" else mma.gemv
                try:
                    us = _timed(fn, x, *args, config=cfg, splits=s)
                except Exception as e:  # noqa: BLE001
                    log(f"[sweep] {kind} {cfg.name} s={s} M={m}: {type(e).__name__}: {e}")
                    continue
                out.append(
                    {"kernel": kind, "config": cfg.name, "splits": s, "M": m, "K": k, "N": n, "us": round(us, 2)}
                )
                best = min(best, (us, f"{kind}:{cfg.name}", s))
            auto = _timed(functools.partial(select.matmul, "quick"), x, *args)
            out.append({"kernel": "auto", "config": "auto", "splits": 0, "M": m, "K": k, "N": n, "us": round(auto, 2)})
            log(f"[sweep] K={k} N={n} M={m}: best {best[1]} s={best[2]} {best[0]:.1f} us; auto {auto:.1f} us")
        del p
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outdir", type=Path, default=HERE / "results")
    ap.add_argument("--m", type=int, nargs="*", default=M_LIST)
    ap.add_argument("--shapes", nargs="*", default=None, help="KxN, e.g. 8192x8192 (default: all)")
    ap.add_argument("--impls", nargs="*", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time every config x split-k (tuning data)")
    ap.add_argument("--no-grid", action="store_true", help="only the sweep")
    ap.add_argument("--sweep-w4a8", action="store_true", help="also time every W4A8 config x split-k")
    ap.add_argument("--sweep-w4a8-large", action="store_true", help="the W4A8 sweep for M >= 256 only (~1 min)")
    ap.add_argument("--budget-s", type=float, default=None, help="time budget of the W4A8 sweep's timings")
    args = ap.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    logf = open(args.outdir / "bench-log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    env = common.env_info()
    tag = f"{common.gpu_slug(env['gpu'])}-{env['date']}"
    t0 = time.time()
    register_builtin_impls()
    extra = register_optional_impls()
    extra += register_w4a8_impls()
    extra += register_w4a8_sm90_impls()
    impls = args.impls or ["cublas_fp16", "cublas_bf16", "torch_int4", "quick", "quick_gemv", *extra]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else list(SHAPES.values())
    ceilings = common.measure_ceilings()
    log(f"[bench] {env} ceilings {ceilings}")

    if args.sweep:
        try:
            sw = sweep(log)
            (args.outdir / f"sweep-{tag}.json").write_text(
                json.dumps({**env, "ceilings": ceilings, "rows": sw}, indent=1)
            )
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
    if args.sweep_w4a8 or args.sweep_w4a8_large:
        try:
            sink = args.outdir / f"sweep-w4a8-{tag}.jsonl"
            sw = sweep_w4a8(log, large_only=not args.sweep_w4a8, budget_s=args.budget_s, sink=sink)
            (args.outdir / f"sweep-w4a8-{tag}.json").write_text(
                json.dumps({**env, "ceilings": ceilings, "rows": sw}, indent=1)
            )
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
    if args.no_grid:
        return 0

    eager: list[dict] = []
    floors: dict = {}
    rows = run_grid(shapes, args.m, impls, ceilings, log, eager, floors)
    common.write_json(
        args.outdir / f"kernel-{tag}.json",
        env,
        ceilings,
        rows,
        {
            "timing": "median of triton do_bench (L2 flushed) over CUDA-graph replays of one call",
            "group_size": GROUP,
            "shapes": {name: list(s) for name, s in SHAPES.items()},
            "eager_8192": eager,
            "stream_floor_us": [{"K": k, "N": n, "us": us} for (k, n), us in floors.items()],
        },
    )
    common.write_markdown(args.outdir / f"kernel-{tag}.md", env, ceilings, rows, shapes, impls, GROUP, floors=floors)
    try:
        common.plot_png(args.outdir / f"kernel-{tag}.png", env, ceilings, rows, shapes, impls, GROUP)
    except Exception as e:  # noqa: BLE001
        log(f"[bench] plot failed: {e}")

    # short summary last (the device reply carries the end of the output)
    k = n = 8192
    if (k, n) in shapes:
        log(
            "\nK=N=8192 g128 fp16, us (TFLOP/s); roofline from measured ceilings; anchor = original QUICK; "
            f"streaming floor {floors.get((k, n), float('nan')):.1f} us"
        )
        log(f"{'M':>5} {'roof':>7} {'anchor':>7} " + " ".join(f"{i:>16}" for i in impls))
        for m in args.m:
            cells = []
            for name in impls:
                r = next((r for r in rows if (r["impl"], r["M"], r["K"], r["N"]) == (name, m, k, n)), None)
                cells.append(f"{r['us']:8.1f} ({r['tflops']:5.0f})" if r else " " * 16)
            log(
                f"{m:>5} {common.roofline_us(m, k, n, ceilings):7.1f} {ANCHORS_QUICK_ORIG.get(m, 0):7.1f} "
                + " ".join(cells)
            )
    if eager:
        log(
            "\nK=N=8192 eager (Python launch included), us: "
            + "; ".join(
                f"{e['impl']}@{e['M']}={e['us']:.1f}"
                for e in eager
                if e["impl"] in ("quick", "quick_gemv", "cublas_fp16")
            )
        )
    log(f"[bench] total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
