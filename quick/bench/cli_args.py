"""Command-line options of ``quick bench e2e`` and ``quick tune``, without importing torch.

The parsers are built for every ``quick`` call (even ``--help``), so the options and their defaults live here and
the benchmark modules, which import torch and the kernels, are imported only when a benchmark runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# ---- quick bench e2e
MODELS = ["llama-2-7b", "mistral-7b", "llama-3-8b"]
BATCHES = [1, 16, 64, 128, 256]
# any other packed layout name (e.g. a W4A8 one) is accepted too; LM_HEAD appended to a layout quantizes the output
# projection as well (not done by default, as in AutoAWQ)
IMPLS = ["fp16", "quick", "quick_sm90"]
VARIANTS = [
    "graph",
    "graph+fused",
    "step",
    "step+fused",
    "regions",
    "regions+fused",
    "fast",
    "fast+fused",
    "eager",
    "eager+fused",
]
# the fastest measured path (docs/decode_path.md): the few-kernel decode step with fused projections, graphed
DEFAULT_VARIANT = "fast+fused"

# ---- quick tune
# Llama-2-7B / Llama-3-8B / Mistral-7B projections, fused (q|k|v, gate|up) first, as the inference path runs them
SHAPES = (
    (4096, 12288),
    (4096, 22016),
    (11008, 4096),
    (4096, 4096),
    (4096, 6144),
    (4096, 28672),
    (14336, 4096),
    (4096, 11008),
    (4096, 14336),
    (8192, 8192),
)
MS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (token counts, batch sizes, layers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_e2e_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the end-to-end benchmark (:func:`quick.bench.e2e.main`). Every option has a help text, so a
    parser with :class:`argparse.ArgumentDefaultsHelpFormatter` shows every default."""
    p.add_argument("--models", nargs="+", default=MODELS, help="published model shapes (random weights)")
    p.add_argument(
        "--batches", nargs="+", type=positive_int, default=BATCHES, help="batch sizes (sequences decoded at once)"
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=IMPLS,
        help="fp16 (bf16 for MoE shapes) or a packed layout (+lm_head: with the output projection)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=[DEFAULT_VARIANT],
        choices=VARIANTS,
        metavar="VARIANT",
        help=f"how the decode step runs, one of {', '.join(VARIANTS)} (several: an ablation, rows get a 'variant' key)",
    )
    p.add_argument("--fused", action="store_true", help="shorthand: add '+fused' to every variant")
    p.add_argument(
        "--compile",
        choices=["none", "step", "regions", "fast"],
        default=None,
        help="shorthand: replace the variants' compile mode (none = graph only)",
    )
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument(
        "--prefill",
        choices=["graph", "eager"],
        default="graph",
        help="time the prefill as a CUDA-graph replay (GPU work) or eager (includes Python launch overhead)",
    )
    p.add_argument(
        "--static-shapes",
        action="store_true",
        help="compile every batch size static (otherwise the batch dim turns symbolic on the 2nd size)",
    )
    p.add_argument(
        "--prefill-only",
        action="store_true",
        help="prefill throughput instead: one forward of the whole prompt per case, reported as prefill tokens/s "
        "(rows with mode 'prefill'; --gen is not used)",
    )
    p.add_argument("--prompt", type=positive_int, default=128, help="prompt tokens per sequence (prefill)")
    p.add_argument("--gen", type=positive_int, default=128, help="tokens generated per sequence (decode)")
    p.add_argument(
        "--layers", type=positive_int, default=None, help="truncate the model to this many layers (smoke runs)"
    )
    p.add_argument("--outdir", type=Path, default=Path("benchmarks/results"), help="folder for JSON, table and plot")


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``quick tune`` (:func:`quick.bench.tune.main`)."""
    p.add_argument("--out", type=Path, default=None, help="folder for the table (default: the user table folder)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="stop starting new measurements after this long (default: none)"
    )
    p.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN, most important first")
    p.add_argument("--ms", nargs="*", type=int, default=list(MS), help="batch sizes (each covers up to itself)")
    p.add_argument(
        "--layouts",
        nargs="*",
        default=None,
        help="quick_sm90 and/or quick (default: quick_sm90 on sm_90, quick elsewhere)",
    )
