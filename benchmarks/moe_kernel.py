#!/usr/bin/env python3
"""The grouped 4-bit MoE GEMM (``csrc/quick_moe.cu``) against a 16-bit grouped GEMM on real expert shapes.

    python benchmarks/moe_kernel.py [--models qwen3-30b-a3b mixtral-8x7b] [--tokens 1 4 16 64 256 1024 4096]
        [--dtype bf16|fp16] [--warmup-ms 5] [--rep-ms 25] [--outdir DIR] [--dec-configs 1,16,4 2,8,3]
        [--sm90-max-block 256]

Per model, token count and projection (``gate_up``: ``[H, 2I]`` per expert with ``silu(gate) * up`` in the 4-bit
kernel's epilogue; ``down``: ``[I, H]`` with the routing weights in its epilogue), uniform random top-k routing:

* ``w4``: ``quick.kernels.moe.grouped_gemm`` on a static sorted-token plan (built outside the timing; the row gather
  happens inside the kernel), random packed weights in the ``quick`` layout, group size 128 with zero points;
* ``w4dec``: at 16-row plans, ``quick.kernels.moe.dec_grouped`` (the decode kernel over experts; gate_up without
  the epilogue, down staging ``silu(gate) * up`` from a ``[slots, 2I]`` product);
* ``w4sm90`` (sm_90): the grouped wgmma GEMM on a stack in the ``quick_sm90`` layout
  (``quick.kernels.moe_sm90.grouped_gemm_sm90``, on plan blocks of up to ``--sm90-max-block`` rows): gate_up gathers
  the rows into plan order and writes the plain product in plan order (``act(gate) * up`` is a separate step in the
  expert MLP, not timed here), down reads a ``[capacity, I]`` input in plan order and writes the weighted slot rows;
* ``w4sm90dec`` (sm_90, 16-row plans): the decode kernel over experts on that stack (the weight as the mma A operand),
  launched as ``w4dec``;
* ``w16``: ``torch._grouped_mm`` on the rows already sorted by expert (no gather, no activation, no weighting: a
  lower bound for the 16-bit side) where this torch has it and it runs, else ``torch.bmm`` over the routed experts
  (their rows zero-padded to the largest count, their weights gathered before the timing); each row says which.

Timing: ``quick.bench.timing.bench_us`` (median of ``triton.testing.do_bench``, L2 flushed before every repetition)
over CUDA-graph replays. GB/s = the routed experts' weight bytes (4-bit codes + 16-bit scales and zeros for ``w4``;
16-bit weights for ``w16``) / time: the bandwidth that matters at decode sizes, where the weights dominate.
Up to ``--decode-tokens`` tokens each cell also gets ``kernel_us``, the kernels' own device time
(``quick.bench.timing.kernel_us``: CUPTI, no launch latency), and its bandwidth share against the device-to-device
copy rate measured in the same run. Outputs ``moe_kernel_<gpu>.json``, ``.md`` and ``.png`` under ``--outdir``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import env_info, gpu_slug, measure_ceilings  # noqa: E402

from quick.bench.timing import bench_us, graphed, kernel_us  # noqa: E402
from quick.kernels import moe as qmoe  # noqa: E402
from quick.kernels import moe_sm90, wgmma  # noqa: E402
from quick.nn.moe import build_plan  # noqa: E402

# hidden, expert intermediate, experts, top-k
MODELS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
GROUP = 128


def w4_stack(e: int, k: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed weights (codes, scales around 1e-2, zero points) with the stack's shapes."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (e, k // 16, 2 * n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(e, k // GROUP, n, device="cuda") * 0.01 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (e, k // GROUP, n), device="cuda").to(dtype)
    return qweight, scales, zeros


def as_sm90(stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same random bytes as a ``quick_sm90`` stack (``qweight [E, K/64, 8N]``): timing does not depend on values."""
    qweight, scales, zeros = stack
    e, k16, n2 = qweight.shape
    return qweight.view(e, k16 // 4, 4 * n2), scales, zeros


W4_IMPLS = ("w4", "w4dec", "w4sm90", "w4sm90dec")


def w4_bytes(k: int, n: int) -> int:
    return k * n // 2 + 2 * (k // GROUP) * n * 2


def routing(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(t, e, device="cuda", generator=gen).topk(k, dim=1).indices


def w16_fn(x_sorted: torch.Tensor, w16: torch.Tensor, counts: torch.Tensor):
    """``(fn, name)``: the 16-bit grouped product of rows sorted by expert (``w16 [E, N, K]``, nn.Linear order)."""
    offs = counts.cumsum(0).to(torch.int32)
    wt = w16.transpose(1, 2)
    if hasattr(torch, "_grouped_mm"):
        try:
            fn = lambda: torch._grouped_mm(x_sorted, wt, offs=offs)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            return fn, "torch._grouped_mm"
        except RuntimeError as err:
            print(f"  torch._grouped_mm unavailable here ({str(err).splitlines()[0]}); bmm instead")
    used = torch.nonzero(counts).flatten()
    c = counts[used]
    top = int(c.max())
    starts = (counts.cumsum(0) - counts)[used]
    rows = starts[:, None] + torch.arange(top, device="cuda")[None]
    valid = torch.arange(top, device="cuda")[None] < c[:, None]
    xb = torch.where(valid[..., None], x_sorted[rows.clamp(max=x_sorted.shape[0] - 1)], 0)
    wb = wt[used].contiguous()
    return (lambda: torch.bmm(xb, wb)), "torch.bmm (routed experts, padded rows)"


def sm90_call(plan, w9: tuple, gate_up: bool, x: torch.Tensor, top_k: int, k: int, weights: torch.Tensor):
    """The grouped wgmma GEMM on ``plan``: gate_up gathers ``x`` and writes plan order; down reads a plan-order
    input ``[capacity, k]`` and writes the weighted slot rows."""
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    if gate_up:
        return functools.partial(moe_sm90.grouped_gemm_sm90, x, *w9, *ids, top_k, plan_rows_out=True, fill=False)
    hplan = torch.randn(plan.sorted_ids.shape[0], k, device="cuda").to(x.dtype)
    return functools.partial(moe_sm90.grouped_gemm_sm90, hplan, *w9, *ids, 1, weights, weights.numel(),
                             plan_rows_in=True, fill=False)  # fmt: skip


def measure(fn, args, decode: bool) -> dict:
    """``us`` (CUDA-graph replays, launch latency included) and, at decode sizes, ``kernel_us``: the kernels' own
    device time, which the bandwidth share against the copy rate is taken over."""
    replay = graphed(fn)
    out = {"us": round(bench_us(replay, args.warmup_ms, args.rep_ms), 2)}
    if decode and args.kernel_reps:
        out["kernel_us"] = round(kernel_us(replay, args.kernel_reps), 2)
    return out


def rates(t: dict, nbytes: int) -> dict:
    r = {"GBps": round(nbytes / t["us"] / 1e3, 1), "bytes": nbytes}
    if "kernel_us" in t:
        r["GBps_kernel"] = round(nbytes / t["kernel_us"] / 1e3, 1)
    return r


def bench_cell(model: str, t: int, dtype: torch.dtype, stacks: dict, w16: dict, args) -> list[dict]:
    h, i, e, k = MODELS[model]
    idx = routing(t, k, e, seed=t)
    weights = torch.rand(t, k, device="cuda")
    routed = int(torch.unique(idx).numel())
    bs = qmoe.block_size_for(t, k, e)
    plan = build_plan(idx, e, bs, static=True)
    counts = plan.counts.long()
    order = torch.sort(idx.reshape(-1), stable=True).indices
    x = torch.randn(t, h, device="cuda").to(dtype)
    hmid = torch.randn(t * k, i, device="cuda").to(dtype)
    hgu = torch.randn(t * k, 2 * i, device="cuda").to(dtype)
    ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
    rows = []
    for proj, (kk, n) in (("gate_up", (h, 2 * i)), ("down", (i, h))):
        qw, sc, z = stacks[proj]
        if proj == "gate_up":
            fn4 = functools.partial(qmoe.grouped_gemm, x, qw, sc, z, GROUP, *ids, k, None, "silu")
            xs = x[order // k]
        else:
            fn4 = functools.partial(qmoe.grouped_gemm, hmid, qw, sc, z, GROUP, *ids, 1, weights)
            xs = hmid[order]
        base = {"model": model, "tokens": t, "proj": proj, "K": kk, "N": n, "experts_routed": routed, "block": bs}
        decode = t <= args.decode_tokens
        m4 = measure(fn4, args, decode)
        us4 = m4["us"]
        b4 = routed * w4_bytes(kk, n)
        rows.append({**base, "impl": "w4", "config": qmoe.default_config(bs, kk).name, **m4, **rates(m4, b4)})
        act = "" if proj == "gate_up" else "silu"
        for cfg in (qmoe.DEC_CONFIG, *args.dec_configs):  # the default first: the markdown's w4dec column
            if qmoe.dec_unavailable(t, kk, n, GROUP, bs, act, dtype, x.device, cfg) is not None:
                continue
            # the decode kernel over experts: gate|up plain (no epilogue), down staging silu(gate) * up
            if proj == "gate_up":
                fnd = functools.partial(qmoe.dec_grouped, x, qw, sc, z, GROUP, *ids, k, t, config=cfg)
            else:
                fnd = functools.partial(qmoe.dec_grouped, hgu, qw, sc, z, GROUP, *ids, 1, t, weights, "silu",
                                        config=cfg)  # fmt: skip
            md = measure(fnd, args, decode)
            usd = md["us"]
            name = f"dec rb{cfg.rb} w{cfg.warps} s{cfg.stages}"
            rows.append({**base, "impl": "w4dec", "config": name, **md, **rates(md, b4)})
            print(f"{model} T={t:<5} {proj:<8} w4dec {usd:9.1f} us {b4 / usd / 1e3:7.0f} GB/s ({name})", flush=True)
        if wgmma.is_available(x.device):
            qw9, sc9, z9 = as_sm90(stacks[proj])
            w9 = (qw9, sc9, z9, GROUP)
            call = functools.partial(sm90_call, w9=w9, gate_up=proj == "gate_up", x=x, top_k=k, k=kk, weights=weights)
            bs9 = qmoe.block_size_for(t, k, e, "quick_sm90", GROUP, args.sm90_max_block)  # this layout's blocks
            timed = [("w4sm90", call(plan if bs9 == bs else build_plan(idx, e, bs9, static=True)), f"wgmma nt{bs9}")]
            for cfg in (qmoe.DEC_CONFIGS["quick_sm90"], *args.sm90_dec_configs):  # the default first, as above
                if qmoe.dec_unavailable(t, kk, n, GROUP, bs, act, dtype, x.device, cfg, "quick_sm90") is not None:
                    continue
                xin, gd, tw = (x, k, None) if proj == "gate_up" else (hgu, 1, weights)
                fd9 = functools.partial(qmoe.dec_grouped, xin, *w9, *ids, gd, t, tw, act, config=cfg,
                                        layout="quick_sm90")  # fmt: skip
                timed.append(("w4sm90dec", fd9, f"dec A-side rb{cfg.rb} w{cfg.warps} s{cfg.stages}"))
            for sb in args.sm90_blocks:  # the same product at other plan blocks: picks block_size_for's thresholds
                if sb != bs9 and not (GROUP == 32 and sb > qmoe.SM90_G32_MAX_BLOCK):
                    timed.append(("w4sm90_block", call(build_plan(idx, e, sb, static=True)), f"wgmma nt{sb}"))
            for impl, fn, name in timed:
                m = measure(fn, args, decode)
                us = m["us"]
                blk = bs if impl == "w4sm90dec" else int(name.rsplit("nt", 1)[1])
                rows.append({**base, "impl": impl, "config": name, "block": blk, **m, **rates(m, b4)})
                print(f"{model} T={t:<5} {proj:<8} {impl} {us:9.1f} us {b4 / us / 1e3:7.0f} GB/s ({name})", flush=True)
        fn16, name = w16_fn(xs, w16[proj], counts)
        m16 = measure(fn16, args, decode)
        us16 = m16["us"]
        b16 = routed * kk * n * 2
        rows.append({**base, "impl": "w16", "config": name, **m16, **rates(m16, b16)})
        print(f"{model} T={t:<5} {proj:<8} experts={routed:<4} w4 {us4:9.1f} us {b4 / us4 / 1e3:7.0f} GB/s | "
              f"w16 {us16:9.1f} us {b16 / us16 / 1e3:7.0f} GB/s ({name})", flush=True)  # fmt: skip
    return rows


def markdown(env: dict, rows: list[dict], dtype: str) -> str:
    lines = [
        "# Grouped 4-bit MoE GEMM against a 16-bit grouped GEMM",
        "",
        f"{env['gpu']}, torch {env['torch']}, CUDA {env.get('cuda')}, {env['date']}, {dtype}, group size {GROUP}, "
        "uniform random top-k routing. Median of do_bench (L2 flushed) over CUDA-graph replays. GB/s over the routed "
        "experts' weight bytes. w4: the grouped kernel with its gather and epilogue (gate_up: silu(gate) * up; down: "
        "routing weights); w4dec: the decode kernel over experts at 16-row plans (gate_up plain into [slots, 2I], "
        "down staging silu(gate) * up from it); w4sm90 / w4sm90dec (sm_90): the grouped wgmma GEMM (gate_up plain in "
        "plan order, down from plan-order rows) / the decode kernel on the same bytes as a quick_sm90 stack; w16: the "
        "baseline named per row, on rows already sorted (no gather, no epilogue).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        heads = " | ".join(f"{i} us (GB/s)" for i in W4_IMPLS)
        lines += [f"## {model}", "", f"| tokens | experts | block | proj | {heads} | w16 us (GB/s) | w16 / best w4 |",
                  "|---|---|---|---|" + "---|" * (len(W4_IMPLS) + 2)]  # fmt: skip
        for r4 in (r for r in rows if r["model"] == model and r["impl"] == "w4"):
            same = [r for r in rows if all(r[c] == r4[c] for c in ("model", "tokens", "proj"))]
            r16 = next(r for r in same if r["impl"] == "w16")
            by = {i: next((r for r in same if r["impl"] == i), None) for i in W4_IMPLS}
            best = min(r["us"] for r in by.values() if r)
            cells = " | ".join(f"{r['us']:.1f} ({r['GBps']:.0f})" if r else "-" for r in by.values())
            lines.append(
                f"| {r4['tokens']} | {r4['experts_routed']} | {r4['block']} | {r4['proj']} | {cells} | "
                f"{r16['us']:.1f} ({r16['GBps']:.0f}) | {r16['us'] / best:.2f} |"
            )
        lines.append("")
    timed = [r for r in rows if "kernel_us" in r and r["impl"] != "w4sm90_block"]
    if timed:
        copy = env.get("copy_TBps")
        lines += [
            "## kernel time at decode sizes",
            "",
            "The kernels' own device time (CUPTI through torch.profiler, mean of the profiled calls, L2 flushed before "
            "each), without the launch latency of the graph replay above; GB/s over the same bytes"
            + (f", and its share of the {copy} TB/s device-to-device copy rate measured in this run." if copy else "."),
            "",
            "| model | tokens | proj | impl | config | kernel us | GB/s | of copy rate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            share = f"{r['GBps_kernel'] / (copy * 1e3):.0%}" if copy else "-"
            lines.append(f"| {r['model']} | {r['tokens']} | {r['proj']} | {r['impl']} | {r['config']} | "
                         f"{r['kernel_us']:.1f} | {r['GBps_kernel']:.0f} | {share} |")  # fmt: skip
        lines.append("")
    sweep = [r for r in rows if r["impl"] == "w4sm90_block"]
    if sweep:
        lines += [
            "## grouped wgmma GEMM by plan block",
            "",
            "The same products at other plan blocks than the automatic one (`block_size_for`).",
            "",
            "| model | tokens | proj | block | us | auto block | auto us |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sweep:
            auto = next(a for a in rows if a["impl"] == "w4sm90" and all(a[c] == r[c] for c in ("model", "tokens",
                                                                                              "proj")))  # fmt: skip
            lines.append(f"| {r['model']} | {r['tokens']} | {r['proj']} | {r['block']} | {r['us']:.1f} | "
                         f"{auto['block']} | {auto['us']:.1f} |")  # fmt: skip
        lines.append("")
    names = sorted({r["config"] for r in rows if r["impl"] == "w16"})
    lines.append(f"16-bit baseline: {', '.join(names)}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """GB/s over the routed experts' weight bytes against tokens, per model and projection, one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, proj in enumerate(("gate_up", "down")):
            ax = axes[i][j]
            for impl in (*W4_IMPLS, "w16"):
                pts = sorted((r["tokens"], r["GBps"]) for r in rows
                             if r["model"] == model and r["proj"] == proj and r["impl"] == impl)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model} {proj}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("GB/s (routed experts' weights)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, stem: Path) -> None:
    """``stem``.json, .md and .png of one result set."""
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc, doc["rows"], doc["dtype"])
    if doc.get("note"):
        md = md.replace("\n\n## ", f"\n\n{doc['note']}\n\n## ", 1)
    stem.with_suffix(".md").write_text(md)
    plot(doc["rows"], stem.with_suffix(".png"), f"Grouped 4-bit MoE GEMM, {doc['gpu']}, {doc['dtype']}")


def _dec_config(text: str, wb: int = 1):
    from quick.kernels.decode import DecConfig

    rb, warps, stages = (int(v) for v in text.split(","))
    return DecConfig(rb, warps, stages, wb=wb)


def precompile(args, dtype: torch.dtype) -> None:
    """The swept decode configs' grouped variants, built in parallel before any timing (nvcc is single-threaded)."""
    from quick.kernels import decode as qd
    from quick.kernels import jit

    cfgs = [*args.dec_configs, *args.sm90_dec_configs]
    arch = jit.arch_for_device(0, arch_specific=True)
    jobs = [(qd.SOURCE, arch, {**c.defines(16, GROUP, dtype, a), "QD_GROUPED": 1}) for c in cfgs for a in (0, 1)]
    if jobs:
        jit.compile_many(jobs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--warmup-ms", type=float, default=5)
    ap.add_argument("--rep-ms", type=float, default=25)
    ap.add_argument("--outdir", type=Path, default=HERE / "results")
    ap.add_argument("--sm90-max-block", type=int, default=qmoe.SM90_AUTO_MAX_BLOCK, choices=qmoe.SM90_BLOCK_SIZES,
                    help="largest plan block the grouped wgmma GEMM gets (block_size_for's rule below it)")  # fmt: skip
    ap.add_argument("--sm90-blocks", nargs="*", type=int, default=[], choices=qmoe.SM90_BLOCK_SIZES,
                    help="also time the grouped wgmma GEMM at these plan blocks (rows 'w4sm90_block')")  # fmt: skip
    ap.add_argument("--decode-tokens", type=int, default=64,
                    help="up to this many tokens, also time the kernels' own device time (CUPTI)")  # fmt: skip
    ap.add_argument("--kernel-reps", type=int, default=20, help="calls profiled per kernel time (0: none)")
    ap.add_argument("--dec-configs", nargs="*", default=[], type=_dec_config, metavar="RB,WARPS,STAGES",
                    help="more decode-kernel configs to time beside the default (compiled at first use)")  # fmt: skip
    ap.add_argument("--sm90-dec-configs", nargs="*", default=[], type=functools.partial(_dec_config, wb=0),
                    metavar="RB,WARPS,STAGES",
                    help="the same for the decode kernel on quick_sm90 stacks (w4sm90dec)")  # fmt: skip
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_kernel: needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    precompile(args, dtype)
    env = {**env_info(), **measure_ceilings()}
    args.outdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.time()
    for model in args.models:
        h, i, e, _ = MODELS[model]
        stacks = {"gate_up": w4_stack(e, h, 2 * i, dtype), "down": w4_stack(e, i, h, dtype)}
        w16 = {
            "gate_up": (torch.randn(e, 2 * i, h, device="cuda") * 0.02).to(dtype),
            "down": (torch.randn(e, h, i, device="cuda") * 0.02).to(dtype),
        }
        for t in args.tokens:
            rows += bench_cell(model, t, dtype, stacks, w16, args)
        del stacks, w16
        torch.cuda.empty_cache()
    stem = args.outdir / f"moe_kernel_{gpu_slug()}"
    doc = {**env, "dtype": args.dtype, "group_size": GROUP, "rows": rows, "seconds": round(time.time() - t0, 1)}
    write(doc, stem)
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
