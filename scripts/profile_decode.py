"""Device diagnostic: where does one decode step (or one prefill forward) of a 7B model spend its GPU time?

Runs decode steps without a CUDA graph (so the profiler sees every kernel; kernel times are the same as inside
a graph) for each requested impl x variant, and reports per step: GPU kernel time, how much of it is the
linears (QUICK kernels, cuBLAS) and how much is everything else, and the number of kernels; plus the top
kernels. Writes ``profile-<model>-b<batch>.{txt,json}`` under ``--out`` (default ``$OUT`` or ``.``).

``--prefill TOKENS``: one forward of ``batch x TOKENS`` prompt tokens from an empty cache instead. Its tokens/s are
timed as the end-to-end benchmark's prefill mode times them (median CUDA-graph replay); the same forward without a
graph is profiled and its GPU time split into linears, attention, activation quantization, norms and the rest, and
the replay's time beyond the summed kernel time is reported as ``idle_ms`` (launch gaps, dependencies). Writes
``profile-prefill-<model>-b<batch>-t<tokens>.{txt,json}``.

    python scripts/profile_decode.py --impls fp16 quick quick_sm90 --variants graph step+fused --batch 1
    python scripts/profile_decode.py --model qwen3-30b-a3b --impls bf16 quick_sm90 --batch 1   # MoE: bf16 baseline
    python scripts/profile_decode.py --impls fp16 quick_sm90 w4a8 --variants fast+fused --batch 4 --prefill 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quick.bench.e2e import build_model, parse_variant  # noqa: E402
from quick.inference import StaticGenerator, uncompile_regions  # noqa: E402
from quick.models.fuse import fuse_model  # noqa: E402

# Kernel-name fragments of the linears: ours, cuBLAS/cuBLASLt (sm80 ampere_*, sm90 nvjet/sm90_xmma), CUTLASS.
GEMM_KEYS = ("quick", "gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "ampere_", "sm90_", "splitk")


# Our kernels that are not products: decode attention, the MoE plan, activation quantization (norm + quant included).
NOT_GEMM_KEYS = ("flash", "fmha", "sdpa", "attention", "attn", "moe_plan", "quant")


def is_gemm(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in GEMM_KEYS) and not any(k in low for k in NOT_GEMM_KEYS)


# What a prefill forward spends its GPU time on besides the products, matched in this order after is_gemm: attention
# (flash / memory-efficient SDPA kernels, ours), activation quantization (a norm that quantizes counts here), norms.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "efficient")),
    ("act_quant", ("quant",)),
    ("norm", ("norm", "rms", "rsqrt")),  # inductor names the fused RMSNorm after its ops (..._mean_mul_pow_rsqrt_0)
)


def category(name: str) -> str:
    """``linear``, one of :data:`CATEGORIES`, or ``other`` (elementwise, rotary, copies, reductions)."""
    if is_gemm(name):
        return "linear"
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def split_by_category(times: list[tuple[str, float]]) -> dict[str, float]:
    """Sum of ``(kernel name, us)`` per :func:`category` (every category present, zero where none ran)."""
    out = dict.fromkeys(["linear", *(c for c, _ in CATEGORIES), "other"], 0.0)
    for name, us in times:
        out[category(name)] += us
    return out


def profile_prefill(model, batch: int, variant: str, tokens: int, reps: int = 3) -> tuple[dict, str]:
    """One forward of ``batch x tokens`` from an empty cache: graph-replay tokens/s (as the e2e prefill mode) and the
    eager forward's kernels by category."""
    compile_mode, _, _ = parse_variant(variant)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda")
    t0 = time.perf_counter()
    timed = StaticGenerator(model, batch, tokens + 1, use_graph=True, compile=compile_mode, graph_prefill=True)
    timed.generate(ids, 1)  # warm-up: kernel builds, autotune, the capture
    rates = sorted(timed.generate(ids, 1)[1].prefill_tok_s for _ in range(reps))
    del timed
    eager = StaticGenerator(model, batch, tokens + 1, use_graph=False, compile=compile_mode)
    eager.prefill(ids)
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            eager.prefill(ids)
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.key_averages() if e.device_type == cuda]
    split = split_by_category([(e.key, e.self_device_time_total / reps) for e in events])
    gpu_ms = sum(split.values()) / 1000
    tok_s = rates[len(rates) // 2]
    graph_ms = batch * tokens / tok_s * 1000
    summary = {
        "variant": variant,
        "batch": batch,
        "tokens_per_forward": batch * tokens,
        "prefill_tok_s": round(tok_s, 1),
        "graph_ms_per_forward": round(graph_ms, 3),
        "gpu_ms_per_forward": round(gpu_ms, 3),
        "idle_ms": round(graph_ms - gpu_ms, 3),
        **{f"{cat}_ms": round(us / 1000, 3) for cat, us in split.items()},
        "kernels_per_forward": round(sum(e.count for e in events) / reps, 1),
        "setup_s": round(setup, 1),
    }
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70)
    return summary, table


def profile_case(model, batch: int, variant: str, steps: int, prompt: int = 128) -> tuple[dict, str]:
    compile_mode, _, _ = parse_variant(variant)
    g = StaticGenerator(model, batch, prompt + steps + 8, use_graph=False, compile=compile_mode)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    t0 = time.perf_counter()
    nxt = g.prefill(ids).argmax(-1)
    for i in range(3):  # warm-up (compiles)
        nxt = g.decode_step(nxt, prompt + i).argmax(-1)
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(3, 3 + steps):
            nxt = g.decode_step(nxt, prompt + i).argmax(-1)
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.key_averages() if e.device_type == cuda]
    total = sum(e.self_device_time_total for e in events) / steps
    gemm = sum(e.self_device_time_total for e in events if is_gemm(e.key)) / steps
    kernels = sum(e.count for e in events) / steps
    from quick.bench.e2e import fusion_switches

    summary = {
        "variant": variant,
        "batch": batch,
        # with PDL a kernel's time includes its wait for the previous one (the overlap): read e2e tok/s for speed
        **fusion_switches(),
        "gpu_us_per_step": round(total, 1),
        "linear_us_per_step": round(gemm, 1),
        "other_us_per_step": round(total - gemm, 1),
        "kernels_per_step": round(kernels, 1),
        "setup_s": round(setup, 1),
    }
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70)
    # the kernels of one step in launch order, with their durations: which linear (shape) takes how long
    seq = sorted((e for e in prof.events() if e.device_type == cuda), key=lambda e: e.time_range.start)
    n = int(round(kernels))
    step = seq[len(seq) - n :] if n else []  # the last step (earlier ones may hold the profiler's start-up)
    summary["sequence"] = [[e.name[:48], round(e.time_range.elapsed_us(), 2)] for e in step]
    return summary, table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--impls", nargs="+", default=["quick"])
    p.add_argument("--variants", nargs="+", default=["graph"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--prefill", type=int, default=None, metavar="TOKENS", help="profile one prefill forward instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    variants = sorted(args.variants, key=lambda v: parse_variant(v)[2])  # unfused first: fusing is one-way
    results, text = [], []
    for impl in args.impls:
        model = build_model(args.model, impl, args.layers)
        for v in variants:
            if parse_variant(v)[2]:
                fuse_model(model)
            try:
                if args.prefill:
                    summary, table = profile_prefill(model, args.batch, v, args.prefill)
                else:
                    summary, table = profile_case(model, args.batch, v, args.steps)
            except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                print(f"{impl} {v}: {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                uncompile_regions(model)
                torch._dynamo.reset()
            summary = {"model": args.model, "impl": impl, **summary}
            print(json.dumps({k: v for k, v in summary.items() if k != "sequence"}), flush=True)
            if "sequence" in summary:
                lin = [us for name, us in summary["sequence"] if is_gemm(name)]
                print(f"linear kernels of one step, in order (us): {lin[:12]} ... {lin[-4:]}", flush=True)
            results.append(summary)
            text.append(f"=== {args.model} {impl} {v} batch {args.batch}: {json.dumps(summary)}\n{table}\n")
            print(text[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    stem = args.out / f"profile-{args.model}-b{args.batch}"
    if args.prefill:
        stem = args.out / f"profile-prefill-{args.model}-b{args.batch}-t{args.prefill}"
    stem.with_suffix(".txt").write_text("".join(text))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
