"""Count the bad-input cases of tests/test_bad_input.py per README category (from pytest's own collection).

python scripts/count_bad_input.py            # prints the Markdown table for the README's "Reliability" section
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_bad_input.py"


def collected() -> list[str]:
    """Node ids pytest collects (GPU cases included: they are collected everywhere and skip without CUDA)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        raise SystemExit(f"collection failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return ids


def categories() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("test_bad_input", TESTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CATEGORY


def main() -> int:
    cat = categories()
    counts: Counter = Counter()
    for node in collected():
        func = node.split("::")[1].split("[")[0]
        where = "gpu" if func.startswith("test_gpu") else "cpu"
        counts[(cat.get(func, f"(uncategorised) {func}"), where)] += 1
    rows = sorted(
        {c for c, _ in counts}, key=lambda c: list(dict.fromkeys(cat.values())).index(c) if c in cat.values() else 99
    )
    print("| category | CPU cases (CI) | GPU cases |")
    print("|---|---|---|")
    for c in rows:
        print(f"| {c} | {counts[(c, 'cpu')] or ''} | {counts[(c, 'gpu')] or ''} |")
    cpu, gpu = (
        sum(v for (_, w), v in counts.items() if w == "cpu"),
        sum(v for (_, w), v in counts.items() if w == "gpu"),
    )
    print(f"| **total** | **{cpu}** | **{gpu}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
