#!/usr/bin/env python3
"""Static instruction count of a kernel's main loop (no GPU needed): compile one variant to a cubin, disassemble it
with nvdisasm, take the largest loop (a backward branch) that contains a tensor-core instruction, and count its SASS
by opcode. The cubin is built by ``quick.kernels.jit`` with the launcher's flags (and cache), so it is the one that
runs. The per-word and per-HMMA figures in docs/dec_notes.md come from this.

    python scripts/sass_loop.py quick_dec.cu -D QD_NT=1 -D QD_RB=4 -D QD_WARPS=8 [--arch sm_90a]

nvdisasm: $NVDISASM, on PATH, or the copy in the nvidia-cuda-nvdisasm pip package.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quick.kernels import jit  # noqa: E402

INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)")


def find_nvdisasm() -> str:
    cands = [os.environ.get("NVDISASM"), shutil.which("nvdisasm")]
    cands += glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu*", "bin", "nvdisasm"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise SystemExit("nvdisasm not found: set NVDISASM or pip install nvidia-cuda-nvdisasm")


def main_loop(sass: str, mma: tuple[str, ...] = ("HMMA", "HGMMA", "IMMA")) -> list[str]:
    """The instructions of the largest loop body (label .. backward branch) holding a tensor-core instruction."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i + 1) < i:
            body = [x for x in lines[labels[m.group(1)] : i + 1] if INSTR.match(x)]
            if any(op in x for x in body for op in mma) and len(body) > len(best):
                best = body
    return best


def opcode(line: str) -> str:
    text = INSTR.match(line).group(2)
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate
    return text.split()[0].split(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a file of quick/kernels/csrc")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="NAME=VALUE")
    ap.add_argument("--arch", default="sm_90a")
    a = ap.parse_args()
    defines = dict(d.split("=", 1) for d in a.defines)
    cubin = jit.compile_cubin(a.source, a.arch, defines).cubin  # the launcher's own flags and cubin cache
    sass = subprocess.run([find_nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    body = main_loop(sass)
    if not body:
        raise SystemExit("no loop with a tensor-core instruction found")
    counts = collections.Counter(opcode(x) for x in body)
    mma = sum(v for k, v in counts.items() if k in ("HMMA", "HGMMA", "IMMA"))
    print(f"{len(body)} instructions in the main loop, {mma} tensor-core ({len(body) / mma:.1f} per mma)")
    print(", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
