"""``python -m quick.kernels.compile_check``: build every kernel variant the package can launch, for sm_80 and
sm_90a, and print registers / shared memory / spills per kernel. Exit status 1 on any compile error or spill.

Variants come from the ``VARIANTS`` list of each launcher module in :data:`MODULES` (missing optional modules
are skipped). An entry is ``(source, defines, archs)``; ``(source, kernel_name, defines)`` is accepted too, with
the archs taken from the module's ``ARCHS`` (default: sm_90a for sources whose name mentions sm90, else
sm_80 and sm_90a). Compiles run in parallel (nvcc is single-threaded) and hit the on-disk cubin cache.
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

MODULES = ("quick.kernels.quick_mma", "quick.kernels.quick_sm90")
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


def _short(defines: dict) -> str:
    return " ".join(f"{k.split('_', 1)[-1]}={v}" for k, v in sorted(defines.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--force", action="store_true", help="recompile even when a cached cubin exists")
    ap.add_argument("--modules", nargs="*", default=list(MODULES))
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
