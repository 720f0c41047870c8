"""End-to-end generation benchmark: prefill then decode with a static cache and a CUDA-graphed decode step.

For each model shape (published config, random weights) and batch size: prefill ``prompt`` tokens, then
decode ``gen`` tokens greedily, forced to full length; fp16 (the same inference path, unquantized) against
QUICK 4-bit weights. Writes ``e2e-<gpu>-<date>.json`` ({"gpu", "date", "rows": [{"model", "impl", "batch",
"prefill_tok_s", "decode_tok_s", "peak_mem_GB"}]}), a markdown table and a PNG plot.

A *variant* is how the step runs, the same for fp16 and QUICK: ``graph`` (CUDA graph of the eager step),
``step``/``regions`` (``torch.compile`` of the whole step / of the norms, MLP and rotary, then the graph),
``fast`` (the few-kernel decode step of :mod:`quick.models.decoder`, then the graph), ``eager`` (no graph),
each optionally ``+fused`` (q/k/v and gate/up fused at load time). Several variants in one run (an ablation) add
a ``variant`` key to each row. Prefill is timed once (``prompt`` tokens, eager);
decode is timed over all ``gen - 1`` graph replays after one untimed warm-up generation that compiles and
captures (its time is ``setup_s`` in ``cases``).

``--prefill-only``: prefill throughput instead (``mode: "prefill"`` in the JSON and on every row): one forward of
the whole ``prompt`` per sequence from an empty cache, CUDA-graphed or eager as ``--prefill`` says, after one untimed
warm-up (which captures); ``prefill_tok_s`` is the median of :data:`PREFILL_REPEATS` timed forwards and
``decode_tok_s`` is null.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import re
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo

from quick import settings
from quick.bench.cli_args import (  # noqa: F401  (re-exported for scripts)
    BATCHES,
    DEFAULT_VARIANT,
    IMPLS,
    MODELS,
    VARIANTS,
    add_e2e_arguments,
)
from quick.inference import StaticGenerator, uncompile_regions
from quick.models.fuse import FusedProjection, fuse_model
from quick.models.synthetic import build_random_model


def parse_variant(v: str) -> tuple[str, bool, bool]:
    """``"step+fused"`` -> (compile mode for StaticGenerator, use a CUDA graph, fuse)."""
    if v not in VARIANTS:
        raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    base, _, fused = v.partition("+")
    compile_mode = base if base in ("step", "regions", "fast") else "none"
    return compile_mode, base != "eager", bool(fused)


def env_stamp() -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": dt.date.today().isoformat()}


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower())).lower()


# Where the benchmark builds its models (tests build tiny ones on the CPU).
DEVICE = "cuda"
MODES = ("decode", "prefill")
PREFILL_REPEATS = 5  # timed prefill forwards per case (--prefill-only); the median is reported


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory (None where there is no CUDA allocator to ask)."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def _generator(model, batch: int, max_len: int, variant: str, dynamic: bool | None, graph_prefill: bool):
    """A fresh generator for one case: the variant's compile mode, CUDA graphs where the model is on CUDA."""
    compile_mode, graph, _ = parse_variant(variant)
    device = next(model.parameters()).device
    gc.collect()  # the previous case's cache and graph pool must not count towards this one's peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graph = graph and device.type == "cuda"
    return StaticGenerator(
        model, batch, max_len, use_graph=graph, compile=compile_mode, dynamic=dynamic, graph_prefill=graph_prefill
    )


def run_one(
    model,
    batch: int,
    prompt: int,
    gen: int,
    vocab: int,
    variant: str = DEFAULT_VARIANT,
    dynamic: bool | None = None,
    graph_prefill: bool = True,
) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    t0 = time.perf_counter()
    g = _generator(model, batch, prompt + gen, variant, dynamic, graph_prefill)
    g.generate(ids, 4)  # warm-up: allocations, kernel builds, torch.compile, graph capture
    with torch.inference_mode():  # the cache tensors were made in inference mode
        g.cache.reset()
    _sync(device)
    setup_s = time.perf_counter() - t0
    _, stats = g.generate(ids, gen)
    row = {
        "batch": batch,
        "prefill_tok_s": round(stats.prefill_tok_s, 1),
        "decode_tok_s": round(stats.decode_tok_s, 1),
        "peak_mem_GB": _peak_gb(device),
        "setup_s": round(setup_s, 1),
    }
    del g
    return row


def run_one_prefill(
    model,
    batch: int,
    prompt: int,
    vocab: int,
    variant: str = DEFAULT_VARIANT,
    dynamic: bool | None = None,
    graph_prefill: bool = True,
    repeats: int = PREFILL_REPEATS,
) -> dict:
    """Prefill tokens/s of ``batch`` sequences of ``prompt`` tokens: one forward of the whole prompt from an empty
    cache, timed as :meth:`StaticGenerator.generate` times its prefill; the median of ``repeats`` after one warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    t0 = time.perf_counter()
    g = _generator(model, batch, prompt + 1, variant, dynamic, graph_prefill)
    g.generate(ids, 1)  # warm-up: allocations, kernel builds, the prefill graph's capture
    _sync(device)
    setup_s = time.perf_counter() - t0
    rates = sorted(g.generate(ids, 1)[1].prefill_tok_s for _ in range(repeats))
    row = {
        "batch": batch,
        "prefill_tok_s": round(rates[len(rates) // 2], 1),
        "decode_tok_s": None,
        "peak_mem_GB": _peak_gb(device),
        "mode": "prefill",
        "setup_s": round(setup_s, 1),
    }
    del g
    return row


LM_HEAD = "+lm_head"  # impl suffix: the output projection is quantized too (e.g. quick_sm90+lm_head)


def _build_layout(name: str, impl: str, layers: int | None):
    layout = impl.removesuffix(LM_HEAD)
    quantized = layout != "fp16"  # other impl names are packed layouts: quick (mma.sync), quick_sm90 (wgmma), ...
    return build_random_model(
        name,
        torch.float16,
        DEVICE,
        quantized,
        layout=layout if quantized else "quick",
        num_layers=layers,
        quantize_lm_head=quantized and impl.endswith(LM_HEAD),
    )


# impl -> builder(model shape name, impl, num_layers) of a random-weight model on the GPU. The hook for other
# weight formats (e.g. W4A8: register a builder that puts its linears in): anything not listed here is taken
# as a packed layout name for QuickLinear.
def _build_w4a8(name: str, impl: str, layers: int | None):
    """W4A8 (QQQ format, round-to-nearest of the random fp16 weights): ``w4a8`` per-channel, ``w4a8_g128``
    two-level g128, packed in the layout of this GPU's fastest W4A8 kernel (``w4a8_sm90`` on a Hopper GPU with its
    kernel built, else ``w4a8``). ``+fused`` variants fuse them like the W4A16 layers (:mod:`quick.models.fuse`)."""
    from quick.algorithms.rtn import _parent, quantizable_linears
    from quick.nn.linear_w4a8 import QuickLinearW4A8, preferred_w4a8_layout

    group = 128 if impl.endswith("_g128") else -1
    model = build_random_model(name, torch.float16, DEVICE, False, num_layers=layers)
    layout = preferred_w4a8_layout(DEVICE)
    for lin_name, lin in quantizable_linears(model):
        parent, child = _parent(model, lin_name)
        setattr(parent, child, QuickLinearW4A8.from_linear(lin, group, torch.float16, layout=layout))
    return model


IMPL_BUILDERS: dict = {"w4a8": _build_w4a8, "w4a8_g128": _build_w4a8}


def _build(name: str, impl: str, layers: int | None):
    return IMPL_BUILDERS.get(impl, _build_layout)(name, impl, layers)


def run(
    models: list[str],
    batches: list[int],
    impls: list[str],
    prompt: int,
    gen: int,
    layers: int | None,
    variants: list[str] | None = None,
    log=None,
    dynamic: bool | None = None,
    graph_prefill: bool = True,
    mode: str = "decode",
) -> tuple[list, list]:
    """Rows in the issue's format (plus ``variant`` when several run, ``mode`` for prefill-only runs) and per-case
    setup times. ``mode``: ``"decode"`` (prefill then ``gen`` decoded tokens) or ``"prefill"`` (prefill
    throughput, see the module docstring; ``gen`` is not used)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    variants = variants or [DEFAULT_VARIANT]
    for v in variants:
        parse_variant(v)
    # fusing cannot be undone on a loaded model: unfused variants first
    variants = sorted(variants, key=lambda v: parse_variant(v)[2])
    rows, cases = [], []
    for name in models:
        for impl in impls:
            t0 = time.perf_counter()
            try:
                model = _build(name, impl, layers)
            except Exception:  # noqa: BLE001 - e.g. a layout without kernels here: report, go on
                traceback.print_exc()
                continue
            build_s = time.perf_counter() - t0
            vocab = model.config.vocab_size
            for v in variants:
                compile_mode, _, fused = parse_variant(v)
                if fused:
                    fuse_model(model)
                # recorded per case: which runs had which projections fused (a group that cannot fuse warns)
                n_fused = sum(isinstance(m, FusedProjection) for m in model.modules())
                for b in batches:
                    try:
                        if mode == "prefill":
                            r = run_one_prefill(model, b, prompt, vocab, v, dynamic, graph_prefill)
                        else:
                            r = run_one(model, b, prompt, gen, vocab, v, dynamic, graph_prefill)
                    except torch.OutOfMemoryError:
                        print(f"{name} {impl} {v} batch {b}: out of memory", flush=True)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    except Exception:  # noqa: BLE001 - one failing cell must not lose the others
                        traceback.print_exc()
                        continue
                    setup_s = r.pop("setup_s")
                    r = {"model": name, "impl": impl, **r}
                    if len(variants) > 1:
                        r["variant"] = v
                    case = {
                        "model": name,
                        "impl": impl,
                        "variant": v,
                        "batch": b,
                        "setup_s": setup_s,
                        "build_s": round(build_s, 1),
                        "fused_projections": n_fused,
                    }
                    print(json.dumps({**r, "variant": v, "setup_s": setup_s}), flush=True)
                    if log is not None:
                        log.write(json.dumps({**r, **case}) + "\n")
                        log.flush()
                    rows.append(r)
                    cases.append(case)
                if compile_mode == "regions":
                    uncompile_regions(model)
                torch._dynamo.reset()  # compiled graphs of this variant are not reused by the next
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows, cases


def write_results(
    rows: list[dict],
    env: dict,
    outdir: Path,
    prompt: int,
    gen: int,
    variants: list[str] | None = None,
    cases: list[dict] | None = None,
    tag: str = "",
    mode: str = "decode",
) -> Path:
    """JSON, markdown table and plot of ``rows``. ``mode="prefill"`` (``--prefill-only``): the same schema with
    ``mode`` on the document and every row, the table and plot on prefill tokens/s, files named ``...-prefill``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prefill = mode == "prefill"
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"e2e-{gpu_slug(env['gpu'])}-{env['date']}{'-prefill' if prefill else ''}{'-' + tag if tag else ''}"
    variants = variants or [DEFAULT_VARIANT]
    doc = {**env, "prompt_tokens": prompt, "new_tokens": 0 if prefill else gen, "variants": variants}
    if prefill:
        doc["mode"] = "prefill"
        rows = [{**r, "mode": "prefill"} for r in rows]
    doc.update(rows=rows, cases=cases or [])
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    what = "prefill" if prefill else "decode"
    if prefill:
        intro = (
            f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. Prefill throughput: one forward "
            f"of {prompt} tokens per sequence from an empty static KV cache, {env.get('prefill', 'eager')} (graph: "
            f"one CUDA-graph replay), median of {PREFILL_REPEATS}. Variant(s): {', '.join(variants)} (+fused: q/k/v "
            "and gate/up fused). Ratios: prefill tokens/s against fp16 of the same variant."
        )
        header = ["| model | batch | impl | variant | prefill tok/s | prefill vs fp16 | peak GB |", "|" + "---|" * 7]
    else:
        intro = (
            f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. Prefill {prompt} tokens, "
            f"decode {gen} tokens (greedy, full length), static KV cache, prefill {env.get('prefill', 'eager')} "
            f"(graph: one CUDA-graph replay). Variant(s): {', '.join(variants)} "
            "(graph: CUDA graph of the eager decode step; step/regions: torch.compile of the whole step / of norms, "
            "MLP and rotary, then the graph; fast: the few-kernel decode step (compiled add+norm, attention, gate), "
            "then the graph; +fused: q/k/v and gate/up fused). Ratios: decode tokens/s against fp16 "
            "of the same variant."
        )
        header = [
            "| model | batch | impl | variant | prefill tok/s | decode tok/s | decode vs fp16 | peak GB |",
            "|" + "---|" * 8,
        ]
    lines = ["# End-to-end generation (random weights, published shapes)", "", intro + _fusions_note(env), "", *header]
    for r in rows:
        v = r.get("variant", variants[0])
        key = (r["model"], r["batch"], v)
        base = next(
            (b for b in rows if (b["model"], b["batch"], b.get("variant", variants[0])) == key and b["impl"] == "fp16"),
            None,
        )
        ratio = f"{r[f'{what}_tok_s'] / base[f'{what}_tok_s']:.2f}x" if base else ""
        peak = "-" if r["peak_mem_GB"] is None else f"{r['peak_mem_GB']:.1f}"
        cells = [r["model"], r["batch"], r["impl"], v, f"{r['prefill_tok_s']:.0f}"]
        cells += [ratio] if prefill else [f"{r['decode_tok_s']:.0f}", ratio]
        lines.append("| " + " | ".join(str(c) for c in [*cells, peak]) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, env, stem.with_suffix(".png"), what)
    return stem


def _plot(rows: list[dict], env: dict, path: Path, what: str = "decode") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 3.6), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        for impl, v in sorted({(r["impl"], r.get("variant", "")) for r in rows}):
            pts = sorted(
                (r["batch"], r[f"{what}_tok_s"])
                for r in rows
                if r["model"] == m and r["impl"] == impl and r.get("variant", "") == v
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"{impl} {v}".strip())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel(f"{what} tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_e2e_arguments(p)


def resolve_variants(variants: list[str], compile_mode: str | None, fused: bool) -> list[str]:
    out = []
    for v in variants:
        base, _, f = v.partition("+")
        if compile_mode is not None:
            base = {"none": "graph"}.get(compile_mode, compile_mode) if base != "eager" else base
        v2 = base + ("+fused" if (f or fused) else "")
        parse_variant(v2)
        if v2 not in out:
            out.append(v2)
    return out


def fusion_switches() -> dict[str, object]:
    """The fast decode step's kernel fusions this run has on (``QUICK_FUSIONS``, sorted) and whether the decode
    attention kernel is on (``QUICK_ATTN_KERNEL``); recorded in the results so that runs with and without them are
    told apart."""
    return {"fusions": sorted(settings.fusions()), "attn_kernel": settings.attention_kernel_enabled()}


def _fusions_note(env: dict) -> str:
    """The markdown's sentence on :func:`fusion_switches` (empty where the run did not record them)."""
    if "fusions" not in env:
        return ""
    note = f" Kernel fusions: {', '.join(env['fusions']) or 'none'}"
    if "attn_kernel" in env:
        note += f"; decode attention kernel {'on' if env['attn_kernel'] else 'off'}"
    return note + "."


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the end-to-end benchmark needs a CUDA GPU")
        return 1
    env = {**env_stamp(), **fusion_switches()}
    if torch.cuda.get_device_capability() != (9, 0):
        args.impls = [i for i in args.impls if not i.startswith("quick_sm90")]
    variants = resolve_variants(args.variants, args.compile, args.fused)
    mode = "prefill" if args.prefill_only else "decode"
    args.outdir.mkdir(parents=True, exist_ok=True)
    tag = ("-prefill" if args.prefill_only else "") + (f"-{args.tag}" if args.tag else "")
    rows, cases = [], []
    with open(args.outdir / f"e2e-cases{tag}.jsonl", "a") as log:  # every case as it finishes (a killed run keeps them)
        for model in args.models:  # results rewritten after each model: a run cut short keeps the finished ones
            dyn = False if args.static_shapes else None
            r, c = run(
                [model],
                args.batches,
                args.impls,
                args.prompt,
                args.gen,
                args.layers,
                variants,
                log,
                dyn,
                args.prefill == "graph",
                mode,
            )
            rows, cases = rows + r, cases + c
            env_run = {**env, "prefill": args.prefill}
            stem = write_results(rows, env_run, args.outdir, args.prompt, args.gen, variants, cases, args.tag, mode)
    print(stem.with_suffix(".md").read_text())
    return 0 if rows else 1
