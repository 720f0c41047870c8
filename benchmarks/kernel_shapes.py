#!/usr/bin/env python3
"""QUICK's automatic kernel choice on real layer shapes, against cuBLAS and Humming, in one run.

    python benchmarks/kernel_shapes.py [--shapes NAME|KxN|held-out|tuned ...] [--m 1 16 ...] [--dtypes fp16 bf16]
        [--impls cublas quick humming] [--budget-s 420] [--warmup-ms 3] [--rep-ms 15] [--outdir DIR] [--tag TAG]
        [--humming-cache DIR] [--humming-tuning per-m|all] [--compile-workers N] [--no-prefetch] [--list]

Every cell (layer shape x M x dtype, group size 128, random AWQ-style weights with zero points) is timed for:

* ``cublas``: ``F.linear`` with the dequantized weight as a dense weight of the same dtype;
* ``quick``: ``QuickLinear.from_quantized(qw, layout=quick.checkpoint.preferred_layout(device))`` called as a layer,
  its own kernel choice (``choice``: ``quick.kernels.select.describe(layer, m)`` where that module exists, else the
  layout name);
* ``humming``: ``humming-kernels`` (0.1.19, the JIT 4-bit library vLLM ships) fed the same weights in AutoAWQ GEMM
  format (``get_layout("awq_gemm").pack(qw)``: qweight / qzeros / scales) through ``HummingLayer`` with
  ``quant_method: awq``, padded as vLLM pads (N to 256, K to 128) and run with vLLM's compute config
  (``{"use_batch_invariant": false, "use_f16_accum": false, "gemm_type": "dense"}``) and Humming's own heuristics.

Timing: ``quick.bench.timing.bench_us`` (median of ``triton.testing.do_bench``, L2 flushed before every repetition)
over ``graphed(fn)`` (CUDA-graph replay), short repetitions by default (``--warmup-ms 3 --rep-ms 15``). The first
eager call of each implementation at each (shape, M, dtype) is timed on its own (``first_call_ms``): QUICK's
selection may time a few candidates there, and JIT compilation shows up there too. Every eager output is checked
against an fp32 dequantize-then-matmul reference (TF32 off): ``max_rel_err`` = max |out - ref| / max |ref|,
``rel_err`` = relative Frobenius error, ``check`` = ``ok`` when ``rel_err`` is under ``quick.testing.REL_BOUND``.
Every cell runs in its own ``try``: a failure becomes an ``"error"`` in its row and the run goes on (a lost CUDA
context ends the run, outputs written). A cell whose graph capture fails is timed eagerly, marked ``"graph": false``
and left out of the ratios.

Order and budget: M values are visited in the order 1, 16, 128, 1024, 4096, 64, 2, 4, 8, 32, 256, 512, 2048 with
all shapes (and both dtypes) inside each, so a run cut by ``--budget-s`` (no new cell starts after that many seconds
from the start; the outputs are still written) covers every shape at the key batch sizes first. The JSON is
rewritten as rows come in (at most every 2 s and after each M pass), so a killed run still leaves its data;
SIGTERM / Ctrl-C stop the run and write all outputs.

Humming compiles its kernels with NVRTC at first use, one cubin per (layer shape, dtype, config): the problem shape
is a compile-time constant. With ``--humming-tuning per-m`` (default) each M gets the config Humming's heuristics
pick for that M (``humming.tune.get_heuristics_config(layer_config, shape_m=M, ...)``, passed as ``tuning_config``:
the same kernel vLLM's interval table launches at that M), so only the kernels the grid uses are built;
``--humming-tuning all`` calls the layer exactly as vLLM does (no tuning config: every M interval of the layer is
compiled at its first call, about 90 kernels per shape and dtype on sm_90 with 0.1.19: for a few shapes only). The
kernels are compiled ahead by a separate process (``--compile-workers`` threads, priority: the order of the cells)
into Humming's disk cache while cuBLAS and QUICK are timed; a Humming cell whose kernel is not built yet is
deferred, not waited for. Humming's cache is ``$HUMMING_CACHE_DIR``, default
``~/.humming/cache/`` (``--humming-cache DIR`` sets it; a fresh machine starts empty, so every kernel is compiled);
``compile_s`` in a Humming row is its kernel's compile time. Humming finds the CUDA toolkit through
``/usr/local/cuda``, ``/usr/local/cuda-*``, ``$CUDA_HOME``/``$CUDA_PATH`` or the ``nvidia`` pip packages (NVRTC
library and headers of the CUDA major version torch was built with); ``CUDA_HOME=/usr/local/cuda`` is set here when
unset and that folder exists. Its ``nvrtc_compile`` child has NVRTC open ``libnvrtc-builtins`` by name, so the folder
of the NVRTC library it uses is appended to ``LD_LIBRARY_PATH`` for child processes (the pip ``nvidia`` packages need
it). With torch >= 2.11 it loads its prebuilt launcher (no C++ build). Wheels for a machine without network:
humming-kernels and cuda-bindings / cuda-pathfinder (``pip install --no-deps --target DIR``, then ``PYTHONPATH=DIR``).

Outputs under ``--outdir`` (default benchmarks/results): ``kernel-shapes-<gpu>-<date>[-tag].json``
(``{"gpu", "torch", "date", "humming_version", "quick_commit", "rows": [{"impl", "M", "K", "N", "dtype", "us",
"choice", "model", "layer", "held_out", "first_call_ms", "max_rel_err", "rel_err", "check", "error", ...}]}``),
``.md`` (per M band and for held-out vs tuned shapes: geometric means of the cuBLAS/quick and Humming/quick time
ratios, the worst cell, the cells under 0.95x; then every fp16 cell; bf16 summarized) and ``.png`` (the ratios per
M, held-out shapes marked). ``quick_commit``: ``$QUICK_COMMIT``, else ``git rev-parse`` of this checkout.

Shapes: the (K, N) = (in_features, out_features) of layers of public model configs (numbers in ``MODELS`` below,
from each model's ``config.json``): fused q/k/v (N = (heads + 2 kv_heads) * head_dim), o_proj, fused gate/up
(N = 2 * intermediate) and down_proj, MoE experts' own intermediate sizes. A (K, N) shared by several models is
listed once with all of them. K must be a multiple of the group size 128; a selected layer that is not is skipped
and listed in ``SKIPPED``. Held-out shapes (``held_out_shapes()``) are never used to build tuning tables and are
reported separately: a shape is held out when ``zlib.crc32(b"KxN") % 4 == 1``, unless it is one of the shapes the
committed tables were measured on (``ALREADY_TUNED``). The rule depends on (K, N) alone, so adding shapes never
changes another shape's status. ``tuning_shapes()`` is the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import heapq
import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

_PROCESS_START = time.monotonic()  # the budget of a command-line run counts from the start, imports included
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quick.formats.layouts import AWQ_ORDER, get_layout  # noqa: E402
from quick.formats.weights import QuantizedWeight, dequantize  # noqa: E402

GROUP = 128
M_ORDER = (1, 16, 128, 1024, 4096, 64, 2, 4, 8, 32, 256, 512, 2048)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("cublas", "quick", "humming")
HUMMING_VERSION = "0.1.19"
# vLLM's HummingLinearMethod: compute config and padding of every dense layer
HUMMING_COMPUTE = {"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"}
HUMMING_PAD_N, HUMMING_PAD_K = 256, 128
THRESHOLD = 0.95  # a cell "below" when quick reaches less than this fraction of the other's speed

# ---------------------------------------------------------------------------------------------- the shapes

# From each model's config.json: hidden_size, num_attention_heads, num_key_value_heads, head_dim,
# intermediate_size; MoE: the experts' (moe_)intermediate_size, shared experts' total; MLA: DeepSeek-V2's ranks.
MODELS: dict[str, dict[str, int]] = {
    "Qwen2.5-0.5B": dict(hidden=896, heads=14, kv=2, head_dim=64, ffn=4864),
    "Qwen2.5-1.5B": dict(hidden=1536, heads=12, kv=2, head_dim=128, ffn=8960),
    "Qwen2.5-7B": dict(hidden=3584, heads=28, kv=4, head_dim=128, ffn=18944),
    "Qwen2.5-14B": dict(hidden=5120, heads=40, kv=8, head_dim=128, ffn=13824),
    "Qwen2.5-32B": dict(hidden=5120, heads=40, kv=8, head_dim=128, ffn=27648),
    "Qwen2.5-72B": dict(hidden=8192, heads=64, kv=8, head_dim=128, ffn=29568),
    "Llama-3.2-1B": dict(hidden=2048, heads=32, kv=8, head_dim=64, ffn=8192),
    "Llama-3.2-3B": dict(hidden=3072, heads=24, kv=8, head_dim=128, ffn=8192),
    "Llama-3.1-8B": dict(hidden=4096, heads=32, kv=8, head_dim=128, ffn=14336),
    "Llama-3.1-70B": dict(hidden=8192, heads=64, kv=8, head_dim=128, ffn=28672),
    "Llama-2-7B": dict(hidden=4096, heads=32, kv=32, head_dim=128, ffn=11008),
    "Llama-2-13B": dict(hidden=5120, heads=40, kv=40, head_dim=128, ffn=13824),
    "Mistral-7B": dict(hidden=4096, heads=32, kv=8, head_dim=128, ffn=14336),
    "Mixtral-8x7B": dict(hidden=4096, heads=32, kv=8, head_dim=128, expert_ffn=14336),
    "Mixtral-8x22B": dict(hidden=6144, heads=48, kv=8, head_dim=128, expert_ffn=16384),
    "Qwen3-30B-A3B": dict(hidden=2048, heads=32, kv=4, head_dim=128, expert_ffn=768),
    "Gemma-2-2B": dict(hidden=2304, heads=8, kv=4, head_dim=256, ffn=9216),
    "Gemma-2-9B": dict(hidden=3584, heads=16, kv=8, head_dim=256, ffn=14336),
    "Gemma-3-27B": dict(hidden=5376, heads=32, kv=16, head_dim=128, ffn=21504),
    "Phi-3-mini": dict(hidden=3072, heads=32, kv=32, head_dim=96, ffn=8192),
    # MLA attention (q_lora_rank null, kv_lora_rank 512, rope 64, nope 128, v 128); layer 0 dense (ffn 10944)
    "DeepSeek-V2-Lite": dict(
        hidden=2048,
        heads=16,
        kv_lora=512,
        rope_dim=64,
        nope_dim=128,
        v_dim=128,
        ffn=10944,
        expert_ffn=1408,
        shared_ffn=2 * 1408,
    ),
}

# (model, layer) pairs benchmarked, small models first; deduplicated by (K, N) keeping this order.
SELECTED: tuple[tuple[str, str], ...] = (
    ("Qwen2.5-0.5B", "qkv"),
    ("Qwen2.5-0.5B", "gate_up"),
    ("Qwen2.5-0.5B", "down"),
    ("Qwen2.5-1.5B", "qkv"),
    ("Llama-3.2-1B", "qkv"),
    ("Llama-3.2-1B", "gate_up"),
    ("Llama-3.2-3B", "o"),
    ("Llama-3.2-3B", "down"),
    ("Gemma-2-2B", "qkv"),
    ("Phi-3-mini", "qkv"),
    ("Qwen3-30B-A3B", "experts.gate_up"),
    ("Qwen3-30B-A3B", "experts.down"),
    ("Qwen3-30B-A3B", "o"),
    ("DeepSeek-V2-Lite", "experts.gate_up"),
    ("DeepSeek-V2-Lite", "experts.down"),
    ("DeepSeek-V2-Lite", "dense.down"),
    ("Mixtral-8x22B", "experts.gate_up"),
    ("Mixtral-8x22B", "experts.down"),
    ("Llama-3.1-8B", "qkv"),
    ("Llama-3.1-8B", "gate_up"),
    ("Llama-3.1-8B", "down"),
    ("Llama-2-7B", "qkv"),
    ("Llama-2-7B", "gate_up"),
    ("Qwen2.5-7B", "qkv"),
    ("Qwen2.5-7B", "gate_up"),
    ("Qwen2.5-7B", "down"),
    ("Gemma-2-9B", "qkv"),
    ("Qwen2.5-14B", "qkv"),
    ("Qwen2.5-14B", "down"),
    ("Gemma-3-27B", "gate_up"),
    ("Qwen2.5-32B", "gate_up"),
    ("Llama-3.1-70B", "qkv"),
    ("Llama-3.1-70B", "o"),
    ("Qwen2.5-72B", "gate_up"),
    ("Qwen2.5-72B", "down"),
)

# The shapes the committed tuning tables (quick/kernels/tables/) were measured on: tuned, never held out.
ALREADY_TUNED = frozenset(
    {
        (4096, 4096),
        (4096, 6144),
        (4096, 11008),
        (4096, 12288),
        (4096, 14336),
        (4096, 22016),
        (4096, 28672),
        (8192, 8192),
        (11008, 4096),
        (14336, 4096),
    }
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked layer shape: ``K`` in_features, ``N`` out_features, every (model, layer) that has it."""

    K: int
    N: int
    uses: tuple[tuple[str, str], ...]
    held_out: bool

    @property
    def key(self) -> str:
        return f"{self.K}x{self.N}"

    @property
    def model(self) -> str:
        return ", ".join(dict.fromkeys(m for m, _ in self.uses))

    @property
    def layer(self) -> str:
        return ", ".join(dict.fromkeys(f"{m}:{lay}" for m, lay in self.uses))

    @property
    def name(self) -> str:
        m, lay = self.uses[0]
        return f"{m.lower()}.{lay}"

    def names(self) -> list[str]:
        return [f"{m.lower()}.{lay}" for m, lay in self.uses]


def model_layers(cfg: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear layer a model config implies (fused q/k/v and gate/up, as the inference path runs them)."""
    h = cfg["hidden"]
    out: dict[str, tuple[int, int]] = {}
    if "kv_lora" in cfg:  # MLA (DeepSeek-V2): no fused q/k/v
        qk = cfg["nope_dim"] + cfg["rope_dim"]
        out["q"] = (h, cfg["heads"] * qk)
        out["kv_a"] = (h, cfg["kv_lora"] + cfg["rope_dim"])
        out["kv_b"] = (cfg["kv_lora"], cfg["heads"] * (cfg["nope_dim"] + cfg["v_dim"]))
        out["o"] = (cfg["heads"] * cfg["v_dim"], h)
    else:
        out["qkv"] = (h, (cfg["heads"] + 2 * cfg["kv"]) * cfg["head_dim"])
        out["o"] = (cfg["heads"] * cfg["head_dim"], h)
    prefix = "dense." if "expert_ffn" in cfg else ""
    if "ffn" in cfg:
        out[prefix + "gate_up"] = (h, 2 * cfg["ffn"])
        out[prefix + "down"] = (cfg["ffn"], h)
    if "expert_ffn" in cfg:
        out["experts.gate_up"] = (h, 2 * cfg["expert_ffn"])
        out["experts.down"] = (cfg["expert_ffn"], h)
    if "shared_ffn" in cfg:
        out["shared.gate_up"] = (h, 2 * cfg["shared_ffn"])
        out["shared.down"] = (cfg["shared_ffn"], h)
    return out


def is_held_out(k: int, n: int) -> bool:
    """The fixed hold-out rule (see the module docstring): depends on (K, N) only."""
    return (k, n) not in ALREADY_TUNED and zlib.crc32(f"{k}x{n}".encode()) % 4 == 1


def build_shapes(
    models: dict[str, dict[str, int]] | None = None, selected: Sequence[tuple[str, str]] | None = None
) -> tuple[list[Shape], list[dict[str, Any]]]:
    """The benchmarked shapes (deduplicated by (K, N), in ``selected`` order, each with every (model, layer) of the
    catalog that has it) and the selected layers skipped for a K that is not a multiple of the group size."""
    models = MODELS if models is None else models
    selected = SELECTED if selected is None else selected
    uses: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for name, cfg in models.items():
        for lay, kn in model_layers(cfg).items():
            uses.setdefault(kn, []).append((name, lay))
    shapes: dict[tuple[int, int], Shape] = {}
    skipped: list[dict[str, Any]] = []
    for name, lay in selected:
        try:
            k, n = model_layers(models[name])[lay]
        except KeyError:
            raise ValueError(f"selected layer {name}:{lay} is not in the model catalog") from None
        if k % GROUP:
            skipped.append(
                {"model": name, "layer": lay, "K": k, "N": n, "reason": f"K={k} is not a multiple of {GROUP}"}
            )
            continue
        if (k, n) not in shapes:
            first = [(name, lay)] + [u for u in uses[(k, n)] if u != (name, lay)]
            shapes[(k, n)] = Shape(k, n, tuple(first), is_held_out(k, n))
    return list(shapes.values()), skipped


SHAPES, SKIPPED = build_shapes()


def held_out_shapes() -> list[tuple[int, int]]:
    """(K, N) of the held-out shapes: never to be used for tuning tables."""
    return [(s.K, s.N) for s in SHAPES if s.held_out]


def tuning_shapes() -> list[tuple[int, int]]:
    """(K, N) of the shapes a tuner may measure."""
    return [(s.K, s.N) for s in SHAPES if not s.held_out]


def order_ms(ms: Iterable[int]) -> list[int]:
    """``ms`` in the visiting order: the ones of ``M_ORDER`` in that order, others after them as given."""
    ms = list(dict.fromkeys(ms))
    for m in ms:
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"M must be a positive int, got {m!r}")
    return [m for m in M_ORDER if m in ms] + [m for m in ms if m not in M_ORDER]


def select_shapes(specs: Sequence[str] | None, catalog: Sequence[Shape] | None = None) -> list[Shape]:
    """``--shapes``: names (``qwen2.5-7b.qkv``, any model:layer alias), ``KxN`` (a catalog shape or a custom one),
    ``held-out``, ``tuned`` or ``all``; catalog order, duplicates dropped."""
    catalog = list(SHAPES if catalog is None else catalog)
    if not specs:
        return catalog
    by_name = {name: s for s in catalog for name in s.names()}
    by_kn = {(s.K, s.N): s for s in catalog}
    out: dict[tuple[int, int], Shape] = {}
    for spec in specs:
        low = spec.strip().lower()
        if low in ("all", "held-out", "tuned"):
            picked = [s for s in catalog if low == "all" or s.held_out == (low == "held-out")]
        elif low in by_name:
            picked = [by_name[low]]
        else:
            parts = low.split("x")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(
                    f"unknown shape {spec!r}: give a name ({', '.join(list(by_name)[:3])}, ...), KxN, "
                    "held-out, tuned or all"
                )
            k, n = int(parts[0]), int(parts[1])
            if k <= 0 or n <= 0 or k % GROUP or n % 64:
                raise ValueError(f"shape {spec!r}: K must be a positive multiple of {GROUP} and N of 64")
            picked = [by_kn.get((k, n), Shape(k, n, (("custom", spec),), False))]
        for s in picked:
            out.setdefault((s.K, s.N), s)
    return list(out.values())


def cell_plan(ms: Sequence[int], n_shapes: int, dtypes: Sequence[str]) -> list[tuple[int, int, str]]:
    """Cells ``(M, shape index, dtype)`` in run order: M outermost (``ms`` already ordered), shapes, dtypes."""
    return [(m, si, dt) for m in ms for si in range(n_shapes) for dt in dtypes]


# ---------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="QUICK's kernel choice vs cuBLAS and Humming on real layer shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shapes", nargs="*", default=None, help="names, KxN, held-out, tuned or all (default: all)")
    p.add_argument("--m", nargs="*", type=int, default=list(M_ORDER), help="batch sizes M")
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES), help="activation dtypes")
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS), help="implementations")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new cell after this many seconds (0: none)")
    p.add_argument("--warmup-ms", type=float, default=3.0, help="do_bench warm-up per cell")
    p.add_argument("--rep-ms", type=float, default=15.0, help="do_bench repetitions per cell")
    p.add_argument("--outdir", type=Path, default=HERE / "results", help="folder for JSON, markdown and PNG")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--check", choices=["all", "none"], default="all", help="check every eager output vs fp32")
    p.add_argument("--humming-cache", default=None, help="Humming's kernel cache folder (sets HUMMING_CACHE_DIR)")
    p.add_argument(
        "--humming-tuning",
        choices=["per-m", "all"],
        default="per-m",
        help="per-m: the heuristics' config of each M as tuning_config; all: no tuning_config (every M interval)",
    )
    p.add_argument("--compile-workers", type=int, default=max(1, (os.cpu_count() or 2) - 4), help="Humming builds")
    p.add_argument("--no-prefetch", action="store_true", help="compile Humming kernels inline, at first call")
    p.add_argument("--cache-gb", type=float, default=40.0, help="GPU memory for weights kept between M passes")
    p.add_argument("--list", action="store_true", help="print the shapes and the plan, then exit")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and resolve: ``shapes`` (list of :class:`Shape`), ``ms`` (visiting order), ``dtypes``, ``impls``."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.shapes = select_shapes(args.shapes)
        args.ms = order_ms(args.m)
    except ValueError as e:
        p.error(str(e))
    if not args.ms or not args.dtypes or not args.impls:
        p.error("--m, --dtypes and --impls need at least one value each")
    args.dtypes = list(dict.fromkeys(args.dtypes))
    args.impls = list(dict.fromkeys(args.impls))
    if args.warmup_ms <= 0 or args.rep_ms <= 0 or args.compile_workers < 1 or args.cache_gb < 0:
        p.error("--warmup-ms, --rep-ms, --compile-workers must be positive and --cache-gb non-negative")
    if args.budget_s is not None and args.budget_s < 0:
        p.error("--budget-s must be >= 0 (0: no budget)")
    return args


# ---------------------------------------------------------------------------------------------- summary


BANDS = (("M<=16", 1, 16), ("M 32-256", 32, 256), ("M 64-128", 64, 128), ("M>=512", 512, None))
GROUPS = ("all", "tuned", "held-out")
OTHERS = {"cublas": "cuBLAS", "humming": "Humming"}


def _usable(r: dict) -> bool:
    us = r.get("us")
    ok = isinstance(us, (int, float)) and not isinstance(us, bool) and math.isfinite(us) and us > 0
    return ok and not r.get("error") and r.get("check") != "fail" and r.get("graph", True) is not False


def ratio_cells(rows: Iterable[dict], other: str) -> list[dict]:
    """Cells where both ``quick`` and ``other`` have a usable time: ``ratio`` = other's us / quick's us (quick's
    speedup: > 1 means quick is faster). Rows with an error, a failed check or no time are left out."""
    rows = list(rows)
    quick = {(r["K"], r["N"], r["M"], r["dtype"]): r for r in rows if r.get("impl") == "quick" and _usable(r)}
    cells = []
    for r in rows:
        if r.get("impl") != other or not _usable(r):
            continue
        q = quick.get((r["K"], r["N"], r["M"], r["dtype"]))
        if q is None:
            continue
        cells.append(
            {
                "K": r["K"],
                "N": r["N"],
                "M": r["M"],
                "dtype": r["dtype"],
                "held_out": bool(q.get("held_out", False)),
                "model": q.get("model", ""),
                "ratio": r["us"] / q["us"],
            }
        )
    return cells


def _stats(cells: list[dict]) -> dict:
    if not cells:
        return {"n": 0, "geomean": None, "worst": None, "below": 0}
    worst = min(cells, key=lambda c: c["ratio"])
    geo = math.exp(sum(math.log(c["ratio"]) for c in cells) / len(cells))
    return {"n": len(cells), "geomean": geo, "worst": worst, "below": sum(c["ratio"] < THRESHOLD for c in cells)}


def _in_band(m: int, lo: int, hi: int | None) -> bool:
    return m >= lo and (hi is None or m <= hi)


def summarize(rows: Iterable[dict]) -> dict:
    """The summary maths of the report: for every M band x shape group (all / tuned / held-out) x dtype (all / fp16
    / bf16) and each other implementation, the geometric mean of the time ratios other/quick, the worst cell and the
    number of cells under ``THRESHOLD``; the same per M; the targets; error and failed-check counts."""
    rows = list(rows)
    cells = {o: ratio_cells(rows, o) for o in OTHERS}
    table = []
    bands = [*BANDS, ("all M", 1, None)]
    for band, lo, hi in bands:
        for group in GROUPS:
            for dt in ("all", "fp16", "bf16"):
                entry: dict[str, Any] = {"band": band, "group": group, "dtype": dt}
                for o, cs in cells.items():
                    sel = [
                        c
                        for c in cs
                        if _in_band(c["M"], lo, hi)
                        and (group == "all" or c["held_out"] == (group == "held-out"))
                        and (dt == "all" or c["dtype"] == dt)
                    ]
                    entry[o] = _stats(sel)
                table.append(entry)
    per_m = []
    for m in sorted({c["M"] for cs in cells.values() for c in cs}):
        entry = {"M": m}
        for dt in ("fp16", "bf16"):
            for o, cs in cells.items():
                entry[f"{dt}:{o}"] = _stats([c for c in cs if c["M"] == m and c["dtype"] == dt])
        per_m.append(entry)

    def look(band: str, group: str, other: str) -> dict:
        return next(e[other] for e in table if (e["band"], e["group"], e["dtype"]) == (band, group, "all"))

    targets = []

    def target(name: str, value: float | None, goal: float) -> None:
        targets.append({"target": name, "value": value, "goal": goal, "met": None if value is None else value >= goal})

    w = look("all M", "all", "cublas")["worst"]
    target("vs cuBLAS: worst cell", w and w["ratio"], THRESHOLD)
    target("vs cuBLAS: geomean at M<=16", look("M<=16", "all", "cublas")["geomean"], 2.5)
    target("vs cuBLAS: geomean at M 64-128", look("M 64-128", "all", "cublas")["geomean"], 1.5)
    for band in ("M<=16", "M 32-256", "M>=512"):
        for group in ("all", "held-out"):
            target(f"vs Humming: geomean at {band} ({group})", look(band, group, "humming")["geomean"], 1.1)
    w = look("all M", "all", "humming")["worst"]
    target("vs Humming: worst cell", w and w["ratio"], THRESHOLD)

    errors: dict[str, int] = {}
    messages: dict[str, dict] = {}
    for r in rows:
        if r.get("error"):
            errors[r["impl"]] = errors.get(r["impl"], 0) + 1
            msg = str(r["error"]).splitlines()[0][:200]
            m = messages.setdefault(f"{r['impl']}: {msg}", {"count": 0, "first": r})
            m["count"] += 1
    fails = [r for r in rows if r.get("check") == "fail"]
    eager = [r for r in rows if r.get("graph") is False]
    return {
        "threshold": THRESHOLD,
        "table": table,
        "per_m": per_m,
        "targets": targets,
        "errors": errors,
        "error_messages": messages,
        "check_failures": fails,
        "eager_rows": eager,
        "cells": {o: len(cs) for o, cs in cells.items()},
        "rows": len(rows),
    }


# ---------------------------------------------------------------------------------------------- writers


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_cell(c: dict | None) -> str:
    return "-" if not c else f"{c['ratio']:.2f}x {c['K']}x{c['N']} M={c['M']} {c['dtype']}"


def _fmt_us(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("error"):
        return "err"
    return f"{r['us']:.1f}" + ("!" if r.get("check") == "fail" else "")


def write_json(path: Path, meta: dict, rows: list[dict], indent: int | None = None) -> None:
    """``{"gpu", "torch", "date", "humming_version", "quick_commit", "rows"}``, written atomically (temp + rename)."""
    doc = {k: meta.get(k) for k in ("gpu", "torch", "date", "humming_version", "quick_commit")}
    doc["rows"] = rows
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n")
    os.replace(tmp, path)


def render_markdown(
    meta: dict, rows: list[dict], shapes: Sequence[Shape], run: dict, summary: dict | None = None
) -> str:
    """The report: run line, summary per band (all dtypes, then fp16 and bf16), targets, geomean per M, every fp16
    cell, errors, failed checks, the shape list."""
    summary = summary or summarize(rows)
    n_held = sum(s.held_out for s in shapes)
    lines = [
        "# QUICK kernel choice on real layer shapes: cuBLAS, QUICK, Humming",
        "",
        f"{meta.get('gpu')}, torch {meta.get('torch')}, humming-kernels {meta.get('humming_version')}, "
        f"quick {meta.get('quick_commit')}, {meta.get('date')}. Group size {GROUP}, random weights with zero points "
        f"(the same codes for every implementation), M in {run.get('ms')}, dtypes {run.get('dtypes')}. "
        + (
            "CPU smoke run: wall-clock medians of eager calls, no CUDA graphs. "
            if meta.get("gpu") == "cpu"
            else f"Median of do_bench (L2 flushed) over CUDA-graph replays, warm-up {run.get('warmup_ms')} ms, "
            f"repetitions {run.get('rep_ms')} ms. "
        )
        + f"Humming: AutoAWQ GEMM tensors through HummingLayer (quant_method awq, vLLM's "
        f"padding and compute config), tuning {run.get('humming_tuning')}.",
        "",
        f"Ratios are quick's speedup, the other's time / quick's time (> 1: quick faster); a cell is counted under "
        f"{THRESHOLD}x when quick reaches less than {THRESHOLD} of the other's speed. {len(shapes)} shapes, "
        f"{n_held} held out of tuning (marked `*`). Rows with an error or a failed check are left out of the ratios.",
        "",
        f"Run: {run.get('status', '?')}, {run.get('elapsed_s', 0):.0f} s, {summary['rows']} rows"
        + (f", {run['not_run']} planned cells not run" if run.get("not_run") else "")
        + ".",
        "",
    ]

    def band_table(dt: str) -> None:
        lines.extend(
            [
                "| M band | group | cells | vs cuBLAS geomean | worst | < 0.95x | cells | vs Humming geomean "
                "| worst | < 0.95x |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        )
        for e in summary["table"]:
            if e["dtype"] != dt:
                continue
            c, h = e["cublas"], e["humming"]
            lines.append(
                f"| {e['band']} | {e['group']} | {c['n']} | {_fmt_ratio(c['geomean'])} | {_fmt_cell(c['worst'])} | "
                f"{c['below']} | {h['n']} | {_fmt_ratio(h['geomean'])} | {_fmt_cell(h['worst'])} | {h['below']} |"
            )
        lines.append("")

    lines += ["## Summary, fp16 and bf16 together", ""]
    band_table("all")
    lines += ["## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in summary["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {_fmt_ratio(t['value'])} | {t['goal']}x | {met} |")
    lines.append("")
    for dt in ("fp16", "bf16"):
        lines += [f"## Summary, {dt}", ""]
        band_table(dt)
    lines += [
        "## Geometric mean per M",
        "",
        "| M | fp16 vs cuBLAS | fp16 vs Humming | bf16 vs cuBLAS | bf16 vs Humming | worst fp16 vs Humming |",
        "|---|---|---|---|---|---|",
    ]
    for e in summary["per_m"]:
        lines.append(
            f"| {e['M']} | {_fmt_ratio(e['fp16:cublas']['geomean'])} | {_fmt_ratio(e['fp16:humming']['geomean'])} | "
            f"{_fmt_ratio(e['bf16:cublas']['geomean'])} | {_fmt_ratio(e['bf16:humming']['geomean'])} | "
            f"{_fmt_cell(e['fp16:humming']['worst'])} |"
        )
    lines += [
        "",
        "## Every fp16 cell (us; `err`: see Errors; `!`: failed check)",
        "",
        "| shape | model:layer | M | cuBLAS | quick | Humming | vs cuBLAS | vs Humming | quick choice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    index = {(r["impl"], r["K"], r["N"], r["M"], r["dtype"]): r for r in rows}
    for s in shapes:
        ms = sorted({r["M"] for r in rows if (r["K"], r["N"], r["dtype"]) == (s.K, s.N, "fp16")})
        for i, m in enumerate(ms):
            cb, q, h = (index.get((impl, s.K, s.N, m, "fp16")) for impl in ("cublas", "quick", "humming"))
            rc = cb["us"] / q["us"] if cb and q and _usable(cb) and _usable(q) else None
            rh = h["us"] / q["us"] if h and q and _usable(h) and _usable(q) else None
            label = f"{s.key}{'*' if s.held_out else ''}" if i == 0 else ""
            who = s.uses[0][0] + ":" + s.uses[0][1] if i == 0 else ""
            choice = str(q.get("choice") or "") if q else ""
            lines.append(
                f"| {label} | {who} | {m} | {_fmt_us(cb)} | {_fmt_us(q)} | {_fmt_us(h)} | {_fmt_ratio(rc)} | "
                f"{_fmt_ratio(rh)} | {choice[:80]} |"
            )
    lines += ["", "## Errors", ""]
    if summary["error_messages"]:
        lines += ["| impl: error | cells | first cell |", "|---|---|---|"]
        for msg, info in sorted(summary["error_messages"].items(), key=lambda kv: -kv[1]["count"]):
            f = info["first"]
            lines.append(f"| {msg.replace('|', '/')} | {info['count']} | {f['K']}x{f['N']} M={f['M']} {f['dtype']} |")
    else:
        lines.append("None.")
    lines += ["", "## Correctness", ""]
    checked = [r for r in rows if r.get("check") in ("ok", "fail")]
    lines.append(
        f"{len(checked)} outputs checked against the fp32 reference, {len(summary['check_failures'])} over the "
        "bound (relative Frobenius error vs quick.testing.REL_BOUND)."
    )
    for r in summary["check_failures"][:50]:
        lines.append(
            f"- {r['impl']} {r['K']}x{r['N']} M={r['M']} {r['dtype']}: rel_err {r.get('rel_err')}, "
            f"max_rel_err {r.get('max_rel_err')}"
        )
    if summary["eager_rows"]:
        lines.append(
            f"{len(summary['eager_rows'])} rows were timed eagerly (their CUDA-graph capture failed) and are left out "
            "of the ratios: "
            + ", ".join(f"{r['impl']} {r['K']}x{r['N']} M={r['M']} {r['dtype']}" for r in summary["eager_rows"][:20])
        )
    for impl in IMPLS:
        errs = [r["max_rel_err"] for r in rows if r.get("impl") == impl and r.get("max_rel_err") is not None]
        if errs:
            lines.append(f"- {impl}: largest max_rel_err {max(errs):.2e} over {len(errs)} cells")
    lines += ["", "## Shapes", "", "| K x N | held out | models and layers |", "|---|---|---|"]
    for s in shapes:
        lines.append(f"| {s.key} | {'yes' if s.held_out else ''} | {s.layer} |")
    for sk in run.get("skipped", []):
        lines.append(f"| {sk['K']}x{sk['N']} | skipped | {sk['model']}:{sk['layer']}: {sk['reason']} |")
    return "\n".join(lines) + "\n"


def plot_png(path: Path, meta: dict, rows: list[dict]) -> bool:
    """Quick's speedup over cuBLAS and over Humming per M: a box per M over all cells (both dtypes), every cell as a
    point (held-out shapes as crosses), lines at 1 and at the threshold. Returns False when there is nothing to plot."""
    cells = {o: ratio_cells(rows, o) for o in OTHERS}
    if not any(cells.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ms = sorted({c["M"] for cs in cells.values() for c in cs})
    pos = {m: i for i, m in enumerate(ms)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), squeeze=False)
    for ax, (o, label) in zip(axes.flat, OTHERS.items(), strict=True):
        cs = cells[o]
        data = [[c["ratio"] for c in cs if c["M"] == m] for m in ms]
        keep = [i for i, d in enumerate(data) if d]
        if keep:
            ax.boxplot([data[i] for i in keep], positions=keep, widths=0.6, showfliers=False)
        for held, marker, color, name in ((False, "o", "C0", "tuned shapes"), (True, "x", "C3", "held-out shapes")):
            pts = [c for c in cs if c["held_out"] == held]
            jitter = [((zlib.crc32(f"{c['K']}x{c['N']}{c['dtype']}".encode()) % 1000) / 1000 - 0.5) * 0.5 for c in pts]
            ax.scatter(
                [pos[c["M"]] + j for c, j in zip(pts, jitter, strict=True)],
                [c["ratio"] for c in pts],
                marker=marker,
                s=12,
                color=color,
                alpha=0.6,
                label=name,
            )
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.axhline(THRESHOLD, color="r", ls=":", lw=1)
        ax.set_yscale("log")
        values = [c["ratio"] for c in cs] or [1.0]
        lo, hi = min(0.5, min(values) / 1.2), max(2.0, max(values) * 1.2)
        ax.set_ylim(lo, hi)
        ticks = [0.1, 0.25, 0.5, 0.75, 0.95, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100]
        ax.set_yticks([t for t in ticks if lo <= t <= hi])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if not cs:
            ax.text(0.5, 0.7, "no cells", transform=ax.transAxes, ha="center")
        ax.set_xticks(range(len(ms)), [str(m) for m in ms])
        ax.set_xlabel("M")
        ax.set_ylabel(f"{label} time / quick time")
        ax.set_title(f"quick vs {label} ({len(cs)} cells)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{meta.get('gpu')}, torch {meta.get('torch')}, humming {meta.get('humming_version')}, "
        f"quick {meta.get('quick_commit')}, {meta.get('date')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- AWQ for Humming


def awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors Humming's ``AWQWeightSchema`` loads (``qweight`` int32 [K, N/8], ``qzeros`` int32
    [K/G, N/8], ``scales`` [K/G, N]): the project's ``awq_gemm`` layout, the same one checkpoints are read from."""
    return get_layout("awq_gemm").pack(qw)


def humming_awq_specs(k: int, n: int, group_size: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes Humming's AWQ schema (4 bits) declares for a [K, N] layer: what ``HummingLayer`` allocates
    and ``load_state_dict`` must fill."""
    return {
        "qweight": ((k, n * 4 // 32), torch.int32),
        "scales": ((k // group_size, n), dtype),
        "qzeros": ((k // group_size, n * 4 // 32), torch.int32),
    }


def humming_awq_decode(words: torch.Tensor) -> torch.Tensor:
    """What Humming's ``AWQWeightSchema`` reads from AWQ words, on any device: its ``unpack_weight`` kernel takes
    nibble ``i`` of each int32 from bits ``4i``..``4i+3`` (arithmetic shifts here, no byte views), then it reorders
    each group of 8 with the index ``[0, 4, 1, 5, 2, 6, 3, 7]``. Returns the codes [rows, 8 * words] as int32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return nibbles[..., [0, 4, 1, 5, 2, 6, 3, 7]].reshape(*words.shape[:-1], -1).to(torch.int32)


def awq_reorder_matches_humming() -> bool:
    """Humming's fixed reorder index is the inverse of AutoAWQ's packing order ``AWQ_ORDER`` (nibble i holds column
    AWQ_ORDER[i]): then column c is at nibble index[c]."""
    index = [0, 4, 1, 5, 2, 6, 3, 7]
    return all(AWQ_ORDER[index[c]] == c for c in range(8))


# ---------------------------------------------------------------------------------------------- Humming support


class Humming:
    """The Humming adapter: imports ``humming`` lazily, builds a ``HummingLayer`` from AWQ tensors as vLLM's
    ``HummingLinearMethod`` prepares its layers, gives the heuristics' tuning config per M, calls the layer."""

    def __init__(self, device: torch.device, tuning: str = "per-m") -> None:
        self.device = device
        self.tuning = tuning
        self.error: str | None = None
        self.version: str | None = None
        self.compute = json.dumps(HUMMING_COMPUTE)
        if device.type != "cuda":
            self.error = "humming needs a CUDA device"
            return
        try:
            import humming
            from humming.layer import HummingLayer
            from humming.tune import get_heuristics_config

            self.version = getattr(humming, "__version__", None)
            self._layer_cls = HummingLayer
            self._heuristics = get_heuristics_config
        except Exception as e:  # noqa: BLE001 - every humming row then carries this error
            self.error = f"humming unavailable: {type(e).__name__}: {e}"

    def build(self, awq: dict[str, torch.Tensor], k: int, n: int, dtype: torch.dtype) -> torch.nn.Module:
        with torch.device(self.device):  # its parameters are allocated with torch.empty: straight on the GPU
            layer = self._layer_cls(
                shape_n=n,
                shape_k=k,
                weight_config={"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True},
                pad_n_to_multiple=HUMMING_PAD_N,
                pad_k_to_multiple=HUMMING_PAD_K,
                torch_dtype=dtype,
            )
        layer = layer.to(self.device)
        layer.load_from_tensors(awq)
        layer.transform()
        return layer

    def layer_config(self, layer: torch.nn.Module) -> str:
        return layer.humming_config.to_str()

    def config_for(self, layer: torch.nn.Module, m: int) -> dict:
        """The heuristics' choice at M (what vLLM's interval table holds for M), as a fresh dict."""
        cfg = self._heuristics(
            layer.humming_config,
            shape_m=m,
            use_f16_accum=HUMMING_COMPUTE["use_f16_accum"],
            use_batch_invariant=HUMMING_COMPUTE["use_batch_invariant"],
            gemm_type=HUMMING_COMPUTE["gemm_type"],
            device=self.device,
        )
        return json.loads(json.dumps(cfg, default=str))

    def tuning_string(self, cfg: dict) -> str | None:
        return json.dumps(cfg) if self.tuning == "per-m" else None

    def call(self, layer: torch.nn.Module, x: torch.Tensor, tuning: str | None) -> torch.Tensor:
        return layer(x, compute_config=self.compute, tuning_config=tuning)


def humming_choice(cfg: dict) -> str:
    """A short name of a Humming tuning config: mma type, block/warp shapes, stages and switches."""

    def shape(v: Any) -> str:
        return "x".join(str(int(t)) for t in v) if isinstance(v, (list, tuple)) else str(v)

    parts = [str(cfg.get("mma_type", "?")), f"b{shape(cfg.get('block_shape'))}", f"w{shape(cfg.get('warp_shape'))}"]
    parts.append(f"st{cfg.get('num_stages', '?')}")
    for key, short in (("use_stream_k", "streamk"), ("use_warp_spec", "ws"), ("use_tma", "tma")):
        if cfg.get(key):
            parts.append(short)
    if cfg.get("num_sms"):
        parts.append(f"sms{cfg['num_sms']}")
    if cfg.get("num_ctas_per_sm", 1) != 1:
        parts.append(f"ctas{cfg['num_ctas_per_sm']}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- compile server


def expose_nvrtc_builtins() -> str | None:
    """Humming's ``nvrtc_compile`` child process has NVRTC dlopen ``libnvrtc-builtins`` by name: append the folder
    of the NVRTC library Humming picked to ``LD_LIBRARY_PATH``. Only processes started afterwards see it (the loader
    of a running process reads the variable once), and appending changes no library already found."""
    try:
        from humming.utils.nvrtc import get_nvrtc_library_path

        folder = os.path.dirname(get_nvrtc_library_path())
    except Exception:  # noqa: BLE001 - Humming reports a missing NVRTC itself at its first compile
        return None
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if folder not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([*paths, folder])
    return folder


def _humming_prepare(layer: str, compute: str, tuning: str | None, device: int) -> None:
    from humming.kernel.humming import HummingKernel

    HummingKernel.prepare_kernels(layer, compute, tuning, device)


def _compile_server(jobs: Any, done: Any, env: dict, workers: int, device: int, compile_fn: Callable | None) -> None:
    """Separate process: build the queued kernels into Humming's disk cache, lowest priority first, ``workers`` at a
    time; report ``(key, error or None, seconds)``. Its own CUDA context loads the cubins, so nothing touches the
    benchmark's context (a module load in another thread could break a CUDA-graph capture there)."""
    os.environ.update(env)
    try:
        if compile_fn is None:
            torch.cuda.set_device(device)
            torch.zeros(1, device=f"cuda:{device}")  # the CUDA context and its libraries first
            import humming  # noqa: F401

            expose_nvrtc_builtins()
            compile_fn = _humming_prepare
    except BaseException as e:  # noqa: BLE001
        done.put(("__fatal__", f"{type(e).__name__}: {e}", 0.0))
        return
    heap: list = []
    cv = threading.Condition()
    state = {"stop": False}

    def feed() -> None:
        while True:
            item = jobs.get()
            with cv:
                if item is None:
                    state["stop"] = True
                    cv.notify_all()
                    return
                heapq.heappush(heap, item)
                cv.notify()

    def work() -> None:
        while True:
            with cv:
                while not heap and not state["stop"]:
                    cv.wait()
                if state["stop"]:
                    return
                _, _, key, layer, compute, tuning = heapq.heappop(heap)
            t = time.perf_counter()
            try:
                compile_fn(layer, compute, tuning, device)
                err = None
            except BaseException as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"[:2000]
            done.put((key, err, time.perf_counter() - t))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for th in threads:
        th.start()
    feed()
    for th in threads:
        th.join(timeout=1.0)


class CompileServer:
    """The benchmark's side of :func:`_compile_server`: submit jobs with a priority, poll results."""

    def __init__(self, workers: int, device: int, env: dict, compile_fn: Callable | None = None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.jobs, self.done_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_compile_server, args=(self.jobs, self.done_q, env, workers, device, compile_fn), daemon=True
        )
        self.proc.start()
        self.results: dict[Any, tuple[str | None, float]] = {}
        self.submitted: set = set()
        self.fatal: str | None = None
        self._seq = 0

    def submit(self, key: Any, priority: tuple, layer: str, compute: str, tuning: str | None) -> None:
        if key in self.submitted or not self.usable():
            return
        self.submitted.add(key)
        self._seq += 1
        self.jobs.put((priority, self._seq, key, layer, compute, tuning))

    def poll(self) -> None:
        import queue

        while True:
            try:
                key, err, secs = self.done_q.get_nowait()
            except queue.Empty:
                return
            if key == "__fatal__":
                self.fatal = err
            else:
                self.results[key] = (err, secs)

    def usable(self) -> bool:
        return self.fatal is None and self.proc.is_alive()

    def ready(self, key: Any) -> bool:
        """Built (or failed), or never to be: the cell can run now (inline compile where the server is gone)."""
        self.poll()
        return key in self.results or key not in self.submitted or not self.usable()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.jobs.put(None)
        self.proc.join(timeout=3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=3)


# ---------------------------------------------------------------------------------------------- problems


def _chunk_cols(k: int, budget_bytes: int = 1 << 28) -> int:
    """Columns per chunk so that one fp32 [K, cols] temporary stays under ``budget_bytes``."""
    return max(64, (budget_bytes // (4 * k)) // 64 * 64)


def dense_weight(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``dequant(W)`` in ``nn.Linear`` orientation [N, K], ``dtype``, built in column chunks (bounded temporaries)."""
    k, n = qw.shape
    out = torch.empty(n, k, dtype=dtype, device=qw.q.device)
    step = _chunk_cols(k)
    for n0 in range(0, n, step):
        sl = slice(n0, min(n, n0 + step))
        out[sl] = dequantize(qw.q[:, sl], qw.scales[:, sl], qw.zeros[:, sl], qw.group_size, dtype).t()
    return out


def reference_out(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """fp32 ``x @ dequant(W)`` (TF32 off), in column chunks."""
    k, n = qw.shape
    x32 = x.float()
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = _chunk_cols(k)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for n0 in range(0, n, step):
            sl = slice(n0, min(n, n0 + step))
            out[:, sl] = x32 @ dequantize(qw.q[:, sl], qw.scales[:, sl], qw.zeros[:, sl], qw.group_size)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def errors_vs(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    """``max_rel_err`` (max abs error / max abs reference), ``rel_err`` (Frobenius) and ``check`` vs REL_BOUND."""
    from quick.testing import REL_BOUND, rel_error

    o = out.float()
    if not torch.isfinite(o).all():
        return {"max_rel_err": None, "rel_err": None, "check": "fail"}
    denom = max(ref.abs().max().item(), 1e-30)
    mre = (o - ref).abs().max().item() / denom
    fro = rel_error(out, ref)
    check = "ok" if fro < REL_BOUND[dtype] else "fail"
    return {"max_rel_err": float(f"{mre:.3g}"), "rel_err": float(f"{fro:.3g}"), "check": check}


class Problem:
    """One shape's weights for every dtype and implementation, built on first use (errors kept per implementation)."""

    def __init__(self, shape: Shape, seed: int, device: torch.device) -> None:
        self.shape, self.device = shape, device
        k, n = shape.K, shape.N
        gen = torch.Generator(device=device).manual_seed(seed)
        self.q = torch.randint(0, 16, (k, n), generator=gen, device=device, dtype=torch.uint8)
        self.zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device=device, dtype=torch.uint8)
        # the distribution of quick.testing.random_quantized (scale 0.02), drawn on the device
        self.scales32 = (torch.rand(k // GROUP, n, generator=gen, device=device) * 0.75 + 0.25) * (0.02 / 8)
        self.parts: dict[tuple[str, str], Any] = {}
        self.errors: dict[tuple[str, str], str] = {}

    def qw(self, dt: str) -> QuantizedWeight:
        return QuantizedWeight(self.q, self.scales32.to(DTYPES[dt]), self.zeros, GROUP)

    def get(self, impl: str, dt: str, make: Callable[[], Any]) -> Any:
        """The part (dense weight, QuickLinear, HummingLayer) of ``impl`` at ``dt``; raises the build error again on
        every later call instead of rebuilding."""
        key = (impl, dt)
        if key in self.errors:
            raise RuntimeError(self.errors[key])
        if key not in self.parts:
            try:
                self.parts[key] = make()
            except Exception as e:  # noqa: BLE001
                self.errors[key] = f"{type(e).__name__}: {e}"
                raise
        return self.parts[key]

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.q, self.zeros, self.scales32))
        for part in self.parts.values():
            if isinstance(part, torch.Tensor):
                total += part.numel() * part.element_size()
            elif isinstance(part, torch.nn.Module):
                total += sum(t.numel() * t.element_size() for t in [*part.parameters(), *part.buffers()])
        return total


# ---------------------------------------------------------------------------------------------- the run


def quick_commit() -> str:
    env = os.environ.get("QUICK_COMMIT", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def humming_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("humming-kernels")
    except Exception:  # noqa: BLE001
        return None


def _describe_fn() -> Callable | None:
    """``quick.kernels.select.describe(layer, m)`` where that module exists."""
    try:
        if importlib.util.find_spec("quick.kernels.select") is None:
            return None
        return getattr(importlib.import_module("quick.kernels.select"), "describe", None)
    except Exception:  # noqa: BLE001
        return None


def _cpu_time_us(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """CPU stand-in of bench_us(graphed(fn)) (no CUDA): median of a few calls."""
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return sorted(times)[len(times) // 2]


class Runner:
    """The benchmark loop: cells in plan order, Humming cells deferred until their kernel is built, budget, outputs."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        log: Callable[[str], None] | None = None,
        t0: float | None = None,
    ) -> None:
        self.args, self.device = args, device
        self.log = log or (lambda msg: print(msg, flush=True))
        self.shapes: list[Shape] = list(args.shapes)
        self.rows: list[dict] = []
        self.t0 = time.monotonic() if t0 is None else t0  # the budget counts from here
        budget = args.budget_s or 0
        self.deadline = self.t0 + budget if budget > 0 else math.inf
        self.cuda = device.type == "cuda"
        if self.cuda:
            env = common.env_info()
        else:
            env = {"gpu": "cpu", "torch": torch.__version__, "date": _dt.date.today().isoformat()}
        self.meta = {
            "gpu": env["gpu"],
            "torch": env["torch"],
            "date": env["date"],
            "humming_version": humming_version() if "humming" in args.impls else None,
            "quick_commit": quick_commit(),
        }
        slug = common.gpu_slug(env["gpu"]) if self.cuda else "cpu"
        stem = f"kernel-shapes-{slug}-{env['date']}" + (f"-{args.tag}" if args.tag else "")
        args.outdir.mkdir(parents=True, exist_ok=True)
        self.paths = {ext: args.outdir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
        self.problems: dict[int, Problem] = {}
        self.cache_bytes = int(args.cache_gb * 2**30)
        self.layer_keys: dict[tuple[int, str], str] = {}  # (shape, dtype) -> Humming layer config
        self.hcfg: dict[tuple[int, str, int], dict] = {}  # (shape, dtype, M) -> Humming tuning config
        self.deferred: list[tuple[tuple, tuple[int, int, str]]] = []
        self.not_run = 0
        self.status = "running"
        self.last_write = 0.0
        self.describe = _describe_fn()
        self.preferred = None
        self.humming: Humming | None = None
        self.server: CompileServer | None = None
        self.broken: str | None = None  # set when the CUDA context is lost: the run stops
        self.logged: dict[str, int] = {}

    # -- setup

    def setup(self) -> None:
        if self.cuda:
            from quick.checkpoint import preferred_layout

            self.preferred = preferred_layout(self.device)
        if "humming" in self.args.impls:
            self.humming = Humming(self.device, self.args.humming_tuning)
            if self.humming.error:
                self.log(f"[shapes] {self.humming.error}")
            elif not self.args.no_prefetch:
                env = {k: os.environ[k] for k in ("HUMMING_CACHE_DIR", "CUDA_HOME") if k in os.environ}
                env["HUMMING_DISABLE_PARALLEL_BUILD"] = "1"  # one build per worker thread, no background builds
                try:
                    idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
                    self.server = CompileServer(self.args.compile_workers, idx, env)
                except Exception as e:  # noqa: BLE001
                    self.log(f"[shapes] no compile process ({type(e).__name__}: {e}); Humming compiles inline")
            if not self.humming.error:
                folder = expose_nvrtc_builtins()  # after the compile process started: it does this itself
                self.log(
                    f"[shapes] humming {self.humming.version}, NVRTC from {folder}, kernel cache "
                    f"{os.environ.get('HUMMING_CACHE_DIR', '~/.humming/cache/')}"
                )

    # -- problems and inputs

    def problem(self, si: int) -> Problem:
        if si in self.problems:
            return self.problems[si]
        s = self.shapes[si]
        prob = Problem(s, seed=1000 + si, device=self.device)
        return prob

    def keep(self, si: int, prob: Problem) -> None:
        """Keep the problem for later M passes while the cache has room (else it is rebuilt on each visit)."""
        if si in self.problems:
            return
        used = sum(p.nbytes() for p in self.problems.values())
        if used + prob.nbytes() <= self.cache_bytes:
            self.problems[si] = prob

    def x(self, si: int, m: int, dt: str) -> torch.Tensor:
        """The same activations whenever a cell runs (deferred cells too)."""
        seed = zlib.crc32(f"{si}:{m}:{dt}".encode())
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(m, self.shapes[si].K, generator=gen, device=self.device, dtype=torch.float32).to(DTYPES[dt])

    # -- parts

    def part(self, prob: Problem, si: int, impl: str, dt: str) -> Any:
        dtype = DTYPES[dt]
        if impl == "cublas":
            return prob.get(impl, dt, lambda: dense_weight(prob.qw(dt), dtype))
        if impl == "quick":
            from quick.nn.linear import QuickLinear

            layout = self.preferred or "quick"
            return prob.get(impl, dt, lambda: QuickLinear.from_quantized(prob.qw(dt), layout=layout))
        assert self.humming is not None
        if self.humming.error:
            raise RuntimeError(self.humming.error)
        s = prob.shape
        layer = prob.get(impl, dt, lambda: self.humming.build(awq_tensors(prob.qw(dt)), s.K, s.N, dtype))
        if (si, dt) not in self.layer_keys:
            self.layer_keys[(si, dt)] = self.humming.layer_config(layer)
            self.submit_humming(si, dt, layer)
        return layer

    def submit_humming(self, si: int, dt: str, layer: torch.nn.Module) -> None:
        """Heuristic configs for every planned M of this (shape, dtype); queue their builds in run order."""
        di = self.args.dtypes.index(dt)
        for m in self.args.ms:
            try:
                self.hcfg[(si, dt, m)] = self.humming.config_for(layer, m)
            except Exception as e:  # noqa: BLE001
                self.hcfg[(si, dt, m)] = {"__error__": f"{type(e).__name__}: {e}"}
        if self.server is None:
            return
        lay, compute = self.layer_keys[(si, dt)], self.humming.compute
        if self.args.humming_tuning == "all":
            self.server.submit((si, dt, 0), (0, si, di), lay, compute, None)
            return
        for rank, m in enumerate(self.args.ms):
            cfg = self.hcfg[(si, dt, m)]
            if "__error__" not in cfg:
                self.server.submit((si, dt, m), (rank, si, di), lay, compute, self.humming.tuning_string(cfg))

    def humming_key(self, si: int, dt: str, m: int) -> tuple:
        return (si, dt, 0 if self.args.humming_tuning == "all" else m)

    # -- one cell

    def fn_for(self, impl: str, part: Any, x: torch.Tensor, si: int, dt: str, m: int) -> Callable[[], torch.Tensor]:
        if impl == "cublas":
            return lambda: F.linear(x, part)
        if impl == "quick":
            return lambda: part(x)
        cfg = self.hcfg.get((si, dt, m), {})
        if "__error__" in cfg:
            raise RuntimeError(f"humming heuristics: {cfg['__error__']}")
        tuning = self.humming.tuning_string(cfg)
        return lambda: self.humming.call(part, x, tuning)

    def time_us(self, fn: Callable[[], object], row: dict) -> float:
        """bench_us over the CUDA-graph replay of ``fn``; eager (Python launch included) if the capture fails, which
        the row then says (``graph: false`` and the capture error in ``note``), as benchmarks/kernel.py does."""
        if not self.cuda:
            return _cpu_time_us(fn, self.args.warmup_ms, self.args.rep_ms)
        try:
            replay = common.graphed(fn)
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize(self.device)  # raises (and ends the run) if the context did not survive
            row["graph"] = False
            row["note"] = f"graph capture failed, eager timing: {type(e).__name__}: {e}"[:500]
            replay = fn
        try:
            return common.bench_us(replay, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms)
        finally:
            del replay

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run_cell(self, prob: Problem, si: int, m: int, dt: str, impl: str, x: torch.Tensor, ref: list) -> dict:
        s = prob.shape
        row: dict[str, Any] = {
            "impl": impl,
            "M": m,
            "K": s.K,
            "N": s.N,
            "dtype": dt,
            "us": None,
            "choice": None,
            "model": s.model,
            "layer": s.layer,
            "held_out": s.held_out,
        }
        try:
            if impl == "humming":
                key = self.humming_key(si, dt, m)
                if self.server is not None and key in self.server.results:
                    err, secs = self.server.results[key]
                    row["compile_s"] = round(secs, 2)
                    if err:
                        raise RuntimeError(f"humming kernel build: {err}")
            part = self.part(prob, si, impl, dt)
            fn = self.fn_for(impl, part, x, si, dt, m)
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            row["first_call_ms"] = round((time.perf_counter() - t) * 1e3, 3)
            if impl == "quick":
                row["choice"] = self.quick_choice(part, m)
            elif impl == "humming":
                cfg = self.hcfg.get((si, dt, m), {})
                row["choice"] = humming_choice(cfg)
                row["config"] = cfg
            else:
                row["choice"] = f"F.linear {dt}"
            if self.args.check == "all":
                if not ref:
                    ref.append(reference_out(x, prob.qw(dt)))
                if tuple(out.shape) != (m, s.N):
                    raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(m, s.N)}")
                row.update(errors_vs(out, ref[0], DTYPES[dt]))
            del out
            row["us"] = round(self.time_us(fn, row), 3)
        except Exception as e:  # noqa: BLE001 - the row records it; the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
            first = row["error"].splitlines()[0][:300]
            seen = self.logged.get(f"{impl}:{first[:80]}", 0)
            self.logged[f"{impl}:{first[:80]}"] = seen + 1
            if seen < 3:  # the same error on every cell is logged thrice; the JSON rows carry every one
                self.log(f"[shapes] {impl} {s.key} M={m} {dt}: {first}")
            if self.cuda:
                try:
                    torch.cuda.synchronize(self.device)
                except Exception as e2:  # noqa: BLE001 - a sticky error: every later cell would fail too
                    self.broken = f"{type(e2).__name__}: {e2}"[:300]
        return row

    def quick_choice(self, layer: Any, m: int) -> str:
        if not self.cuda:  # QuickLinear runs its reference path off the GPU
            return f"{layer.layout_name} reference"
        if self.describe is not None:
            try:
                return str(self.describe(layer, m))
            except Exception as e:  # noqa: BLE001
                return f"{layer.layout_name} (describe failed: {type(e).__name__}: {e})"[:200]
        return str(layer.layout_name)

    # -- loop

    def over_budget(self) -> bool:
        return self.broken is not None or time.monotonic() > self.deadline

    def visit(self, m: int, si: int, only: Sequence[tuple[str, str]] | None = None) -> None:
        """Run the cells of shape ``si`` at ``m`` (every dtype x impl, or just ``only``); defer unbuilt Humming."""
        try:
            prob = self.problem(si)
        except Exception as e:  # noqa: BLE001
            for dt in self.args.dtypes:
                for impl in self.args.impls:
                    s = self.shapes[si]
                    self.rows.append(
                        {
                            "impl": impl,
                            "M": m,
                            "K": s.K,
                            "N": s.N,
                            "dtype": dt,
                            "us": None,
                            "choice": None,
                            "model": s.model,
                            "layer": s.layer,
                            "held_out": s.held_out,
                            "error": f"weights: {type(e).__name__}: {e}"[:1000],
                        }
                    )
            return
        todo = only or [(dt, impl) for dt in self.args.dtypes for impl in self.args.impls]
        for dt in dict.fromkeys(d for d, _ in todo):
            x = self.x(si, m, dt)
            ref: list = []
            for impl in [i for d, i in todo if d == dt]:
                if impl == "humming" and only is None and self.humming and not self.humming.error:
                    try:
                        self.part(prob, si, impl, dt)  # builds the layer and queues its kernels
                    except Exception:  # noqa: BLE001 - run_cell records the build error
                        pass
                    key = self.humming_key(si, dt, m)
                    if self.server is not None and not self.server.ready(key):
                        prio = (self.args.ms.index(m), si, self.args.dtypes.index(dt))
                        self.deferred.append((prio, (m, si, dt)))
                        continue
                self.rows.append(self.run_cell(prob, si, m, dt, impl, x, ref))
            del x, ref
        self.keep(si, prob)
        if self.cuda and m >= 512:
            torch.cuda.empty_cache()

    def cell_ready(self, m: int, si: int, dt: str) -> bool:
        return self.server is None or self.server.ready(self.humming_key(si, dt, m))

    def run_ready_deferred(self, block: bool = False) -> None:
        """Run deferred Humming cells whose kernel is built, in priority order; ``block``: wait for the rest (until
        the budget)."""
        while self.deferred:
            if self.over_budget():
                return
            ready = [d for d in self.deferred if self.cell_ready(*d[1])]
            if not ready:
                if not block:
                    return
                time.sleep(0.2)
                continue
            ready.sort()
            prio, (m, si, dt) = ready[0]
            self.deferred.remove((prio, (m, si, dt)))
            self.visit(m, si, only=[(dt, "humming")])
            self.maybe_write()

    def maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_write > 2.0:
            write_json(self.paths["json"], self.meta, self.rows)
            self.last_write = now

    def run(self) -> int:
        plan = cell_plan(self.args.ms, len(self.shapes), self.args.dtypes)
        n_cells = len(plan) * len(self.args.impls)
        a = self.args
        self.log(
            f"[shapes] {len(self.shapes)} shapes x {len(a.ms)} M x {len(a.dtypes)} dtypes x {len(a.impls)} impls = "
            f"{n_cells} cells; budget {a.budget_s} s; out {self.paths['json']}"
        )
        for sk in SKIPPED:
            self.log(f"[shapes] skipped {sk['model']}:{sk['layer']} {sk['K']}x{sk['N']}: {sk['reason']}")
        visits = list(dict.fromkeys((m, si) for m, si, _ in plan))
        try:
            self.setup()
            for i, (m, si) in enumerate(visits):
                if self.over_budget():
                    break
                self.visit(m, si)
                self.run_ready_deferred()
                self.maybe_write(force=i + 1 == len(visits) or visits[i + 1][0] != m)
                if i + 1 == len(visits) or visits[i + 1][0] != m:
                    self.log(
                        f"[shapes] M={m} done at {time.monotonic() - self.t0:.0f} s, {len(self.rows)} rows, "
                        f"{len(self.deferred)} Humming cells waiting for their kernel"
                    )
            self.run_ready_deferred(block=True)
            self.not_run = n_cells - len(self.rows)  # every cell that started left a row
            self.status = "complete" if self.not_run == 0 else f"stopped at the {self.args.budget_s:.0f} s budget"
            if self.broken:
                self.status = f"aborted, CUDA context lost ({self.broken})"
        except KeyboardInterrupt:
            self.not_run = n_cells - len(self.rows)
            self.status = "interrupted"
            self.log("[shapes] interrupted: writing what was measured")
        finally:
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if self.server is not None:
                self.server.close()
            self.finish()
        return 0

    def finish(self) -> None:
        run = {
            "ms": self.args.ms,
            "dtypes": self.args.dtypes,
            "warmup_ms": self.args.warmup_ms,
            "rep_ms": self.args.rep_ms,
            "humming_tuning": self.args.humming_tuning,
            "status": self.status,
            "elapsed_s": time.monotonic() - self.t0,
            "not_run": self.not_run,
            "skipped": SKIPPED,
        }
        write_json(self.paths["json"], self.meta, self.rows, indent=1)
        summary = summarize(self.rows)
        try:
            self.paths["md"].write_text(render_markdown(self.meta, self.rows, self.shapes, run, summary))
        except Exception:  # noqa: BLE001
            self.log(traceback.format_exc())
        try:
            if not plot_png(self.paths["png"], self.meta, self.rows):
                self.log("[shapes] no ratio to plot")
        except Exception as e:  # noqa: BLE001
            self.log(f"[shapes] plot failed: {type(e).__name__}: {e}")
        self.log(short_report(summary, run))
        self.log(f"[shapes] wrote {self.paths['json']}, .md, .png")


def short_report(summary: dict, run: dict) -> str:
    """The last lines of the output: the summary table for all dtypes and the targets."""
    lines = [
        f"[shapes] {run['status']}, {run['elapsed_s']:.0f} s, {summary['rows']} rows, errors {summary['errors']}, "
        f"failed checks {len(summary['check_failures'])}, not run {run['not_run']}"
    ]
    lines.append(
        f"{'band':<9} {'group':<9} {'vs cuBLAS':>10} {'n':>4} {'<.95':>5} {'vs Humming':>11} {'n':>4} {'<.95':>5}"
    )
    for e in summary["table"]:
        if e["dtype"] != "all":
            continue
        c, h = e["cublas"], e["humming"]
        lines.append(
            f"{e['band']:<9} {e['group']:<9} {_fmt_ratio(c['geomean']):>10} {c['n']:>4} {c['below']:>5} "
            f"{_fmt_ratio(h['geomean']):>11} {h['n']:>4} {h['below']:>5}"
        )
    for t in summary["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        lines.append(f"  {t['target']}: {_fmt_ratio(t['value'])} (goal {t['goal']}x) {met}")
    return "\n".join(lines)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, device: str | None = None, t0: float | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in args.shapes:
            print(f"{s.key:>12} {'held-out' if s.held_out else 'tuned   '} {s.layer}")
        for sk in SKIPPED:
            print(f"{sk['K']}x{sk['N']:<6} skipped  {sk['model']}:{sk['layer']}: {sk['reason']}")
        print(
            f"{len(args.shapes)} shapes ({sum(s.held_out for s in args.shapes)} held out), M {args.ms}, "
            f"{len(args.shapes) * len(args.ms) * len(args.dtypes) * len(args.impls)} cells"
        )
        return 0
    if args.humming_cache:
        os.environ["HUMMING_CACHE_DIR"] = str(Path(args.humming_cache).resolve())
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _sigterm)
    with torch.no_grad():
        return Runner(args, dev, t0=t0).run()


if __name__ == "__main__":
    sys.exit(main(t0=_PROCESS_START))
