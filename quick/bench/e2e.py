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

Mixture-of-experts shapes (``qwen3-30b-a3b``, ``mixtral-8x7b``) are built layer by layer from the meta device
(:mod:`quick.models.synthetic_moe`): 4-bit impls get random packed expert stacks run by the grouped kernel, the 16-bit
baseline ``bf16`` transformers' grouped-GEMM experts; both in bfloat16, the published dtype. Before building, the
weights, KV cache and prefill activations are checked against the GPU's free memory; where one impl does not fit,
every impl of that model runs with as many layers as it fits (a message says so). Their rows add ``"moe": true`` and
``"layers"`` and the files are named ``e2e-moe-<gpu>-<date>...``.
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
from quick.kernels import select
from quick.models.fuse import FusedProjection, fuse_model
from quick.models.synthetic import build_random_model


def packed_layouts(model: torch.nn.Module) -> set[str]:
    """Names of the packed layouts the model's quantized layers hold (empty for a 16-bit model)."""
    names = set()
    for mod in model.modules():
        lay, storage = getattr(mod, "layout", None), getattr(mod, "storage", None)
        if isinstance(getattr(lay, "name", None), str):
            names.add(lay.name)
        if isinstance(storage, str):
            names.add(storage)
    return names


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


# 16-bit impls that the markdown's ratios divide by (MoE shapes run bf16, dense ones fp16)
BASELINES = ("fp16", "bf16")
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
    from quick.models.linears import parent_of, quantizable_linears
    from quick.nn.linear_w4a8 import QuickLinearW4A8, preferred_w4a8_layout

    group = 128 if impl.endswith("_g128") else -1
    model = build_random_model(name, torch.float16, DEVICE, False, num_layers=layers)
    layout = preferred_w4a8_layout(DEVICE)
    for lin_name, lin in quantizable_linears(model):
        parent, child = parent_of(model, lin_name)
        setattr(parent, child, QuickLinearW4A8.from_linear(lin, group, torch.float16, layout=layout))
    return model


IMPL_BUILDERS: dict = {"w4a8": _build_w4a8, "w4a8_g128": _build_w4a8}


def _build(name: str, impl: str, layers: int | None):
    return IMPL_BUILDERS.get(impl, _build_layout)(name, impl, layers)


# Headroom of a MoE build beyond weights, KV cache and activations: allocator blocks, graph pools, GEMM workspaces.
MOE_SLACK_BYTES = 2 * 2**30
MOE_DTYPE = torch.bfloat16  # the published dtype of the MoE shapes; torch's grouped GEMM fast path is bf16 only


def _moe_impl(impl: str) -> tuple[torch.dtype, bool, str, bool]:
    """``(dtype, quantized, layout of the dense linears, quantize lm_head)`` of an impl on a MoE shape."""
    from quick.models.synthetic_moe import BASELINE_DTYPES

    layout = impl.removesuffix(LM_HEAD)
    if layout == "fp16":
        raise ValueError("MoE shapes: the 16-bit baseline is 'bf16' (torch's grouped GEMM has no fp16 fast path)")
    if impl in IMPL_BUILDERS:
        raise ValueError(f"impl '{impl}' has no MoE build (experts are W4A16 only)")
    quantized = layout not in BASELINE_DTYPES
    return (MOE_DTYPE if quantized else BASELINE_DTYPES[layout]), quantized, layout, quantized and impl != layout


def _moe_act_bytes(name: str, tokens: int, dtype: torch.dtype) -> int:
    """Prefill activations of one MoE block on ``tokens`` tokens (gathered input, gate|up, act, down per slot), twice:
    the eager warm-up and the captured prefill hold theirs in different pools."""
    from quick.models import synthetic
    from quick.models.moe import routing
    from quick.models.synthetic_moe import moe_family

    cfg = synthetic.load_config(name)
    _, top_k, _ = routing(cfg, moe_family(cfg).moe)  # type: ignore[union-attr]
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    slots = tokens * top_k
    return 2 * slots * (3 * inter + 2 * cfg.hidden_size) * torch.empty(0, dtype=dtype).element_size()


def moe_layers_to_run(name: str, impl: str, layers: int | None, batch: int, max_len: int, prompt: int) -> int | None:
    """``layers`` if the MoE model with its largest KV cache fits the GPU's free memory, else the most layers that do
    (with a message); :class:`MemoryError` where not even one layer fits."""
    from quick.models.synthetic_moe import kv_bytes_per_layer, layers_that_fit, weight_bytes

    dtype, quantized, layout, lm_head = _moe_impl(impl)
    fixed, per_layer = weight_bytes(name, dtype, quantized, 128, layout, layers, lm_head)
    free = torch.cuda.mem_get_info(torch.device(DEVICE))[0]
    kv = kv_bytes_per_layer(name, batch * max_len, dtype)
    budget = free - MOE_SLACK_BYTES - _moe_act_bytes(name, batch * prompt, dtype)
    n = layers_that_fit(fixed, per_layer, kv, budget)
    if n == len(per_layer):
        return layers
    need = (fixed + sum(per_layer) + kv * len(per_layer)) / 1e9
    msg = (
        f"{name} {impl}: {need:.1f} GB of weights and KV cache (batch {batch} x {max_len} tokens) exceed the "
        f"{budget / 1e9:.1f} GB usable of {free / 1e9:.1f} GB free on the GPU"
    )
    if n == 0:
        raise MemoryError(msg + "; not even one layer fits")
    print(f"{msg}; running {n} of {len(per_layer)} layers (as --layers {n})", flush=True)
    return n


def _build_moe(name: str, impl: str, layers: int | None):
    """A MoE shape for ``impl`` (see the module docstring) on :data:`DEVICE`."""
    from quick.models.synthetic_moe import build_random_moe

    dtype, quantized, layout, lm_head = _moe_impl(impl)
    return build_random_moe(name, dtype, DEVICE, quantized, 128, layout, layers, quantize_lm_head=lm_head)


def moe_layers(name: str, impls: list[str], layers: int | None, batch: int, max_len: int, prompt: int) -> int | None:
    """The layers every impl of a MoE shape runs with: ``layers``, or fewer where some impl would not fit the GPU, so
    that the rows of one model compare like with like (impls without a MoE build are left to fail at their build)."""
    if torch.device(DEVICE).type != "cuda":
        return layers
    fits = []
    for impl in impls:
        try:
            fits.append(moe_layers_to_run(name, impl, layers, batch, max_len, prompt))
        except ValueError:
            continue
    sized = [n for n in fits if n is not None]
    return min(sized) if sized else layers


def build_model(name: str, impl: str, layers: int | None = None):
    """The random-weight model of a benchmark row: a published dense or MoE shape (``name``) for ``impl`` (fp16 or
    bf16, a packed layout, ``w4a8`` / ``w4a8_g128``), ``layers`` decoder layers (None: all), on the GPU."""
    return _build_moe(name, impl, layers) if _is_moe(name) else _build(name, impl, layers)


def _is_moe(name: str) -> bool:
    from quick.models.synthetic_moe import is_moe_shape

    try:
        return is_moe_shape(name)
    except ValueError:  # not a bundled shape: the dense builders report it
        return False


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
        moe = _is_moe(name)
        try:
            model_layers = moe_layers(name, impls, layers, max(batches), prompt + gen, prompt) if moe else layers
        except MemoryError as err:
            print(err, flush=True)
            continue
        for impl in impls:
            t0 = time.perf_counter()
            try:
                model = build_model(name, impl, model_layers)
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
                    if moe:
                        r.update(moe=True, layers=model.config.num_hidden_layers)
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
                        "kernels": select.chosen(b, packed_layouts(model)),  # which kernel ran each decode linear
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
    kind = "e2e-moe" if any(r.get("moe") for r in rows) else "e2e"
    suffix = ("-prefill" if prefill else "") + ("-" + tag if tag else "")
    stem = outdir / f"{kind}-{gpu_slug(env['gpu'])}-{env['date']}{suffix}"
    variants = variants or [DEFAULT_VARIANT]
    doc = {**env, "prompt_tokens": prompt, "new_tokens": 0 if prefill else gen, "variants": variants}
    if prefill:
        doc["mode"] = "prefill"
        rows = [{**r, "mode": "prefill"} for r in rows]
    doc.update(rows=rows, cases=cases or [])
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    what = "prefill" if prefill else "decode"
    base_name = "/".join(sorted({r["impl"] for r in rows if r["impl"] in BASELINES})) or "fp16"
    if prefill:
        intro = (
            f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. Prefill throughput: one forward "
            f"of {prompt} tokens per sequence from an empty static KV cache, {env.get('prefill', 'eager')} (graph: "
            f"one CUDA-graph replay), median of {PREFILL_REPEATS}. Variant(s): {', '.join(variants)} (+fused: q/k/v "
            f"and gate/up fused). Ratios: prefill tokens/s against {base_name} of the same variant."
        )
        header = [
            f"| model | batch | impl | variant | prefill tok/s | prefill vs {base_name} | peak GB |",
            "|" + "---|" * 7,
        ]
    else:
        intro = (
            f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. Prefill {prompt} tokens, "
            f"decode {gen} tokens (greedy, full length), static KV cache, prefill {env.get('prefill', 'eager')} "
            f"(graph: one CUDA-graph replay). Variant(s): {', '.join(variants)} "
            "(graph: CUDA graph of the eager decode step; step/regions: torch.compile of the whole step / of norms, "
            "MLP and rotary, then the graph; fast: the few-kernel decode step (compiled add+norm, attention, gate), "
            f"then the graph; +fused: q/k/v and gate/up fused). Ratios: decode tokens/s against {base_name} "
            "of the same variant."
        )
        header = [
            f"| model | batch | impl | variant | prefill tok/s | decode tok/s | decode vs {base_name} | peak GB |",
            "|" + "---|" * 8,
        ]
    lines = ["# End-to-end generation (random weights, published shapes)", "", intro + _fusions_note(env), "", *header]
    for r in rows:
        v = r.get("variant", variants[0])
        key = (r["model"], r["batch"], v, r.get("layers"))
        base = next(
            (
                b
                for b in rows
                if (b["model"], b["batch"], b.get("variant", variants[0]), b.get("layers")) == key
                and b["impl"] in BASELINES
            ),
            None,
        )
        ratio = f"{r[f'{what}_tok_s'] / base[f'{what}_tok_s']:.2f}x" if base else ""
        peak = "-" if r["peak_mem_GB"] is None else f"{r['peak_mem_GB']:.1f}"
        model = f"{r['model']} ({r['layers']} layers)" if "layers" in r else r["model"]
        cells = [model, r["batch"], r["impl"], v, f"{r['prefill_tok_s']:.0f}"]
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
