"""`quick bench e2e`: end-to-end tokens/s of fp16 against QUICK on published model shapes (GPU only)."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "benchmarks: `quick bench e2e` (prefill/decode tokens/s, fp16 vs QUICK)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from quick.bench.cli_args import add_e2e_arguments  # no torch: the parser is built for every `quick` call

    sub = parser.add_subparsers(dest="which", metavar="BENCHMARK")
    e2e = sub.add_parser(
        "e2e",
        help="end-to-end generation benchmark (random weights, published shapes; needs a CUDA GPU)",
        description="Prefill then decode with a static KV cache and a CUDA-graphed decode step, fp16 against QUICK "
        "4-bit weights on the same path; writes JSON, a markdown table and a plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_e2e_arguments(e2e)
    parser.set_defaults(_bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "which", None) is None:  # `quick bench` alone: show what there is to run
        args._bench_parser.print_help()
        return 0
    from quick.bench import e2e

    return e2e.main(args)
