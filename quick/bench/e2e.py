"""End-to-end generation benchmark: prefill then decode with a static cache and a CUDA-graphed decode step.

For each model shape (published config, random weights) and batch size: prefill ``prompt`` tokens, then
decode ``gen`` tokens greedily, forced to full length; fp16 (the same inference path, unquantized) against
QUICK 4-bit weights. Writes ``e2e-<gpu>-<date>.json`` ({"gpu", "date", "rows": [{"model", "impl", "batch",
"prefill_tok_s", "decode_tok_s", "peak_mem_GB"}]}), a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import re
import traceback
from pathlib import Path

import torch

from quick.inference import StaticGenerator
from quick.models.synthetic import build_random_model

MODELS = ["llama-2-7b", "mistral-7b", "llama-3-8b"]
BATCHES = [1, 16, 64, 128, 256]


def env_stamp() -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": dt.date.today().isoformat()}


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower())).lower()


def run_one(model, batch: int, prompt: int, gen: int, vocab: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    g = StaticGenerator(model, batch, prompt + gen)
    g.generate(ids, 4)  # warm-up: allocations, kernel compilation, graph capture
    with torch.inference_mode():  # the cache tensors were made in inference mode
        g.cache.reset()
    _, stats = g.generate(ids, gen)
    row = {
        "batch": batch,
        "prefill_tok_s": round(stats.prefill_tok_s, 1),
        "decode_tok_s": round(stats.decode_tok_s, 1),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    del g
    return row


def run(models: list[str], batches: list[int], impls: list[str], prompt: int, gen: int, layers: int | None) -> list:
    rows = []
    for name in models:
        for impl in impls:
            quantized = impl != "fp16"  # other impl names are packed layouts: quick (mma.sync), quick_sm90 (wgmma)
            model = build_random_model(
                name, torch.float16, "cuda", quantized, layout=impl if quantized else "quick", num_layers=layers
            )
            vocab = model.config.vocab_size
            for b in batches:
                try:
                    r = run_one(model, b, prompt, gen, vocab)
                except torch.OutOfMemoryError:
                    print(f"{name} {impl} batch {b}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                except Exception:  # noqa: BLE001 - one failing cell must not lose the others
                    traceback.print_exc()
                    continue
                r = {"model": name, "impl": impl, **r}
                print(json.dumps(r), flush=True)
                rows.append(r)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def write_results(rows: list[dict], env: dict, outdir: Path, prompt: int, gen: int) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"e2e-{gpu_slug(env['gpu'])}-{env['date']}"
    doc = {**env, "prompt_tokens": prompt, "new_tokens": gen, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# End-to-end generation (random weights, published shapes)",
        "",
        f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. Prefill {prompt} tokens, "
        f"decode {gen} tokens (greedy, full length), static KV cache, decode step replayed from a CUDA graph.",
        "",
        "| model | batch | impl | prefill tok/s | decode tok/s | decode vs fp16 | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if (b["model"], b["batch"], b["impl"]) == (r["model"], r["batch"], "fp16")), None)
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['impl']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
            f"{ratio} | {r['peak_mem_GB']:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, env, stem.with_suffix(".png"))
    return stem


def _plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 3.6), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["batch"], r["decode_tok_s"]) for r in rows if r["model"] == m and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--impls", nargs="+", default=["fp16", "quick", "quick_sm90"], help="fp16 or a packed layout")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="truncate the model (smoke runs only)")
    p.add_argument("--outdir", type=Path, default=Path("benchmarks/results"))


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the end-to-end benchmark needs a CUDA GPU")
        return 1
    env = env_stamp()
    if "quick_sm90" in args.impls and torch.cuda.get_device_capability() != (9, 0):
        args.impls = [i for i in args.impls if i != "quick_sm90"]
    rows = run(args.models, args.batches, args.impls, args.prompt, args.gen, args.layers)
    stem = write_results(rows, env, args.outdir, args.prompt, args.gen)
    print(stem.with_suffix(".md").read_text())
    return 0 if rows else 1
