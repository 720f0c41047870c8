"""``quick tune``: measure the kernel table (:mod:`quick.kernels.tuning`) that :func:`quick.kernels.select.choose`
reads on this GPU (after a ``QUICK_KERNEL`` override, before the autotune cache and the model).

    quick tune [--out DIR] [--budget-s SECONDS] [--shapes 4096x4096 ...] [--ms 1 8 64 ...] [--layouts quick_sm90 quick]

For every (K, N) and M: each candidate of the layout (``quick_sm90``, on sm_90: the decode kernel's configs and split
counts for M <= 64, the wgmma kernel's tuned choice, its tile alternatives and split counts; ``quick``, the mma.sync
layout on any sm_80+ GPU: the decode kernel for M <= 16, the GEMV for M <= 8, every GEMM config and split count)
is first checked against an fp32 reference of dequantize-then-matmul on fresh random data (NaN-poisoned output, the
float64 tests' relative bounds), then timed as benchmarks/kernel.py times (median of do_bench, L2 flushed, CUDA-graph
replay), each launched through ``select.matmul`` with its :class:`~quick.kernels.select.Choice` (the launch the
table's entry later gets). Only checked candidates can win. The model's own choice is checked and timed too, as the
time without a table (a row marked ``model``, not a table candidate). Writes ``<out>/<gpu>.json`` (the table; default
out: the user table folder, read before the package's) and ``<out>/tune_rows.json`` (every row, rewritten after each
shape). Shapes run in the order given and stop at the budget, so the important ones go first. Measured tables for
the project's GPUs are committed in ``quick/kernels/tables/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import traceback

import torch

from quick.bench.cli_args import MS, SHAPES, add_tune_arguments  # noqa: F401  (re-exported)
from quick.bench.timing import bench_us, graphed
from quick.kernels import decode as qd
from quick.kernels import mma as qm
from quick.kernels import select, tuning
from quick.kernels import wgmma as sm
from quick.testing import REL_BOUND, pack, poisoned, random_quantized, rel_error


def candidates(layout: str, m: int, n: int, k: int, nsm: int) -> list[tuple[str, dict, int | None, object]]:
    """``(kernel, config fields, splits, config)`` to try for one shape and batch size of ``layout``."""
    out = [("dec", dataclasses.asdict(c), s, c) for c, s in qd.timing_candidates(layout, m, n, k, nsm)]
    if layout == "quick":  # the mma.sync GEMM's configs (by name) and, for M <= 8, the GEMV; None = its own choice
        if m <= qm.GEMV_MAX_M:
            for name in qm.GEMV_CONFIGS:
                out += [("gemv", {"name": name}, s, name) for s in (None, 1, 2, 4)]
        names = [c.name for c in qm.GEMM_CONFIGS.values() if k % c.bks == 0 and (m <= 64 or c.bm >= 64)]
        out += [("gemm", {}, None, None)]
        out += [("gemm", {"name": name}, s, name) for name in names for s in (None, 1, 2, 4, 8)]
        return out
    tuned, rounds = sm.tuned_config(m, torch.float16, 128)
    base = sm.plan(m, n, k, nsm, tuned, None, 128, rounds).splits
    cfgs = [tuned]
    if m >= 64:  # tile alternatives: the neighbouring token tiles of each pipeline that fits them
        for nt in sm.neighbour_tiles(m):
            for pipe in (0, 2):
                if pipe and nt == 256:
                    continue
                cfgs.append(sm.default_config(nt, 128, pipe))
            cfgs.append(sm.wtma_config(nt))  # weights with x through the TMA stages: no per-step load latency
    for cfg in dict.fromkeys(cfgs):
        splits = {base, 1, 2, 3, 4} if cfg == tuned else {1, 2, 3}
        for s in sorted(splits):
            out.append(("wgmma", dataclasses.asdict(cfg), s, cfg))
    return out


def run(layout: str, kernel: str, cfg, splits: int | None, x, p, out, rounds: int | None = None) -> None:
    choice = select.Choice(kernel, cfg, splits, rounds, source="tune")
    select.matmul(layout, x, p["qweight"], p["scales"], p["zeros"], 128, choice=choice, out=out)


def tune_shape(layout: str, k: int, n: int, ms, nsm: int, gen, rows: list, deadline: float) -> None:
    qw = random_quantized(k, n, 128, torch.float16, "cuda", generator=gen)
    p = pack(qw, layout)
    w32 = qw.dequantize(torch.float32)  # [K, N], on the weights' device
    for m in ms:
        if time.time() > deadline:
            return
        x = (torch.randn(m, k, generator=gen) * 0.5).half().cuda()
        ref = x.float() @ w32
        model = select.candidates(select.prepare(layout, x, p["qweight"], p["scales"], p["zeros"], 128, None)[0])[0]
        todo = [(model.kernel, select.config_fields(model.config), model.splits, model.config, model.rounds, True)]
        todo += [(kernel, fields, splits, cfg, None, False) for kernel, fields, splits, cfg in
                 candidates(layout, m, n, k, nsm)]  # fmt: skip
        for kernel, fields, splits, cfg, rounds, is_model in todo:
            if time.time() > deadline:
                return
            row = {"layout": layout, "K": k, "N": n, "M": m, "kernel": kernel, "config": fields, "splits": splits}
            if is_model:
                row.update(model=True, rounds=rounds)
            try:
                out = poisoned((m, n), torch.float16, "cuda")
                run(layout, kernel, cfg, splits, x, p, out, rounds)
                err = rel_error(out, ref)
                row["rel_err"] = err
                row["ok"] = bool(torch.isfinite(out).all()) and err < REL_BOUND[torch.float16]
                if row["ok"]:
                    out2 = torch.empty_like(out)
                    call = functools.partial(run, layout, kernel, cfg, splits, x, p, out2, rounds)
                    row["us"] = round(bench_us(graphed(call)), 2)
            except Exception as e:  # noqa: BLE001 - a failing candidate is a row, not the end of the run
                row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        mine = [r for r in rows if (r["layout"], r["K"], r["N"], r["M"]) == (layout, k, n, m)]
        ok = [r for r in mine if r.get("us") and not r.get("model")]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        base = next((r.get("us", float("nan")) for r in mine if r.get("model")), float("nan"))
        print(
            f"{layout:>10} {k:>5}x{n:<6} M={m:<5} best {best['kernel'] if best else '-':>5} "
            f"{best['us'] if best else float('nan'):8.2f} us  (model's {model.kernel} {base:8.2f}; "
            f"{len(ok)} timed, {len(mine) - sum(1 for r in mine if r.get('ok'))} failed)",
            flush=True,
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_tune_arguments(p)


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] < 8:
        raise SystemExit("quick tune measures the GPU kernels: it needs a CUDA GPU of compute capability 8.0 or newer")
    major = torch.cuda.get_device_capability(0)[0]
    layouts = args.layouts or (["quick_sm90"] if major == 9 else ["quick"])
    for layout in layouts:
        if layout not in tuning.KERNELS:
            raise SystemExit(f"--layouts takes {sorted(tuning.KERNELS)}, got {layout!r}")
        if layout == "quick_sm90" and major != 9:
            raise SystemExit("the quick_sm90 layout's kernels need an sm_90 GPU (H100/H200)")
    shapes = []
    for shape in args.shapes:
        try:
            k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes takes KxN (e.g. 4096x11008), got {shape!r}") from None
        if k % 128 or n % 64 or k <= 0 or n <= 0:
            raise SystemExit(f"shape {shape}: K must be a multiple of 128 and N of 64")
        shapes.append((k, n))
    if not args.ms or min(args.ms) < 1:
        raise SystemExit("--ms takes batch sizes >= 1")
    out = args.out or tuning.user_folder()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    gpu = torch.cuda.get_device_name(0)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(20261205)
    rows: list[dict] = []
    for layout, (k, n) in ((lay, shape) for lay in layouts for shape in shapes):
        try:
            deadline = t0 + args.budget_s if args.budget_s else float("inf")
            tune_shape(layout, k, n, sorted(args.ms), nsm, gen, rows, deadline)
        except Exception:  # noqa: BLE001 - one broken shape must not lose the others
            print(traceback.format_exc(), flush=True)
        (out / "tune_rows.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}))
    table = tuning.build_table(
        [r for r in rows if not r.get("model")], gpu, torch.__version__, time.strftime("%Y-%m-%d")
    )
    path = out / f"{tuning.gpu_key(gpu)}.json"
    path.write_text(json.dumps(table, indent=1))
    tuning.clear_cache()
    failed = sum(1 for r in rows if not r.get("ok"))
    print(
        f"{len(rows)} candidates, {failed} failed their check, {len(table['entries'])} table entries -> {path} "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )
    return 1 if failed else 0
