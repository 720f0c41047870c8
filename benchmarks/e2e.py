#!/usr/bin/env python3
"""End-to-end benchmark (same as `quick bench e2e`): see quick/bench/e2e.py."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quick.bench import e2e  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    e2e.add_arguments(parser)
    sys.exit(e2e.main(parser.parse_args()))
