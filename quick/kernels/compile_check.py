"""``python -m quick.kernels.compile_check``: build every kernel variant the package can launch, for sm_80 and
sm_90a, and print registers / shared memory / spills per kernel. Exit status 1 on any compile error or spill.

Variants come from the ``VARIANTS`` list of each launcher module in :data:`MODULES` (missing optional modules
are skipped). An entry is ``(source, defines, archs)``; ``(source, kernel_name, defines)`` is accepted too, with
the archs from the module's ``variant_archs(defines)`` if it has one, else its ``ARCHS`` (default: sm_90a for
sources whose name mentions sm90, else sm_80 and sm_90a). Compiles run in parallel (nvcc is single-threaded) and
hit the on-disk cubin cache.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass

from quick.kernels import jit

MODULES = (
    "quick.kernels.mma",
    "quick.kernels.wgmma",
    "quick.kernels.w4a8_mma",
    "quick.kernels.w4a8_wgmma",
    "quick.kernels.decode",
    "quick.kernels.attention",
    "quick.kernels.moe",
    "quick.kernels.moe_sm90",
    "quick.kernels.normquant",
)
DEFAULT_ARCHS = ("sm_80", "sm_90a")


@dataclass
class Job:
    module: str
    source: str
    arch: str
    defines: dict


@dataclass
class KernelReport:
    name: str
    registers: int
    spill_bytes: int
    stack: int
    smem: int


def _variants(module_name: str) -> list[Job]:
    if importlib.util.find_spec(module_name) is None:
        return []
    mod = importlib.import_module(module_name)
    jobs = []
    for v in getattr(mod, "VARIANTS", []):
        if len(v) == 3 and isinstance(v[1], dict):
            source, defines, archs = v
        elif len(v) == 3 and isinstance(v[1], str):
            source, _name, defines = v
            archs = getattr(mod, "ARCHS", ("sm_90a",) if "sm90" in source else DEFAULT_ARCHS)
            if hasattr(mod, "variant_archs"):  # per variant (e.g. sm_90-only programmatic dependent launches)
                archs = mod.variant_archs(defines)
        else:
            raise ValueError(f"{module_name}.VARIANTS entry {v!r} is not (source, defines, archs)")
        for arch in (archs,) if isinstance(archs, str) else archs:
            jobs.append(Job(module_name, source, arch, dict(defines)))
    return jobs


def parse_ptxas(log: str) -> list[KernelReport]:
    """Per-entry registers, spill bytes, stack frame and static shared memory from a ``-Xptxas -v`` log."""
    reports: list[KernelReport] = []
    current: KernelReport | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = KernelReport(m.group(1), 0, 0, 0, 0)
            reports.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack = int(m.group(1))
            current.spill_bytes = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return reports


SASS_KEYS = ("LDG128", "LDG", "LDGSTS", "LDSM", "LDS", "HMMA", "LDL", "STL", "BAR")


def sass_counts(sass: str) -> dict[str, dict[str, int]]:
    """Per function: 16-byte global loads (LDG*.128), other global loads, cp.async (LDGSTS), ldmatrix (LDSM),
    shared loads, HMMA, local memory traffic (LDL/STL: spills or stack arrays) and barriers."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), dict.fromkeys(SASS_KEYS, 0))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if not m or cur is None:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base == "LDG":
            cur["LDG128" if ".128" in op else "LDG"] += 1
        elif base in cur:
            cur[base] += 1
    return out


def sass_report(jobs: list[Job]) -> int:
    """Disassemble each variant for this machine's GPU (or sm_90a) and count the instructions that matter."""
    import shutil
    import subprocess

    tool = shutil.which("cuobjdump")
    if tool is None:
        print("compile_check --sass: cuobjdump not found")
        return 1
    try:
        import torch

        arch = jit.arch_for_device() if torch.cuda.is_available() else "sm_90a"
    except Exception:  # noqa: BLE001
        arch = "sm_90a"
    bad = 0
    print(f"SASS ({arch}): " + " ".join(f"{k:>6}" for k in SASS_KEYS) + "  kernel / defines")
    seen = set()
    for job in jobs:
        key = (job.source, tuple(sorted(job.defines.items())))
        if key in seen:
            continue
        seen.add(key)
        res = jit.compile_cubin(job.source, arch, job.defines)
        sass = subprocess.run([tool, "--dump-sass", str(res.cubin)], capture_output=True, text=True).stdout
        for fn, c in sass_counts(sass).items():
            flag = "  <-- local memory" if c["LDL"] or c["STL"] else ""
            bad += bool(flag)
            print("      " + " ".join(f"{c[k]:>6}" for k in SASS_KEYS) + f"  {fn} {_short(job.defines)}{flag}")
    return 1 if bad else 0


def _short(defines: dict) -> str:
    return " ".join(f"{k.split('_', 1)[-1]}={v}" for k, v in sorted(defines.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--force", action="store_true", help="recompile even when a cached cubin exists")
    ap.add_argument("--modules", nargs="*", default=list(MODULES))
    ap.add_argument("--sass", action="store_true", help="instead: disassemble (cuobjdump) and count instructions")
    args = ap.parse_args(argv)

    try:
        jit.find_nvcc()
    except jit.KernelUnavailable as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 1
    jobs: list[Job] = []
    for name in args.modules:
        try:
            jobs += _variants(name)
        except Exception as e:  # an optional module that does not import is an error here: we must build it
            print(f"compile_check: cannot collect variants of {name}: {e}", file=sys.stderr)
            return 1
    if args.sass:
        return sass_report(jobs)
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor

    def build(job: Job):
        try:
            return jit.compile_cubin(job.source, job.arch, job.defines, force=args.force)
        except jit.KernelUnavailable as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as ex:
        results = list(ex.map(build, jobs))

    bad = 0
    print(f"{'source':<16} {'arch':<7} {'kernel':<22} {'regs':>4} {'stack':>5} {'spill':>5} {'smem':>5}  defines")
    for job, res in zip(jobs, results, strict=True):
        if isinstance(res, Exception):
            bad += 1
            print(f"{job.source:<16} {job.arch:<7} COMPILE ERROR  {_short(job.defines)}\n{res}")
            continue
        for rep in parse_ptxas(res.log):
            flag = ""
            if rep.spill_bytes or rep.stack:
                flag = "  <-- SPILL" if rep.spill_bytes else "  <-- stack"
                bad += bool(rep.spill_bytes)
            print(
                f"{job.source:<16} {job.arch:<7} {rep.name:<22} {rep.registers:>4} {rep.stack:>5} "
                f"{rep.spill_bytes:>5} {rep.smem:>5}  {_short(job.defines)}{flag}"
            )
    print(f"{len(jobs)} builds in {time.time() - t0:.1f} s; {'FAILED: ' + str(bad) + ' bad' if bad else 'all clean'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
