"""`quick bench e2e`: end-to-end tokens/s of fp16 against QUICK on published model shapes (GPU only)."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "benchmarks: `quick bench e2e` (prefill/decode tokens/s, fp16 vs QUICK)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from quick.bench import e2e

    sub = parser.add_subparsers(dest="which", required=True)
    e2e.add_arguments(sub.add_parser("e2e", help="end-to-end generation benchmark"))


def run(args: argparse.Namespace) -> int:
    from quick.bench import e2e

    return e2e.main(args)
