"""`quick tune`: measure this GPU's kernel table (the fastest checked kernel and config per layer shape and batch)."""

from __future__ import annotations

import argparse

NAME = "tune"
HELP = "measure the kernel table for this GPU: the fastest correct kernel and config per layer shape and batch size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from quick.bench.cli_args import add_tune_arguments  # no torch: the parser is built for every `quick` call

    add_tune_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from quick.bench import tune

    return tune.main(args)
