"""Run every kernel variant under compute-sanitizer's memcheck, racecheck, initcheck and synccheck.

One Python process per tool loops over the cases of ``quick.testing.kernel_cases`` (every compiled variant of
the mma.sync GEMM, GEMV and split-k reduce; every quick_sm90 config and pipeline on sm_90; every decode kernel and
decode attention variant; kernels of other
modules through their dispatcher entry) on shapes at and around the tile edges. Inputs are drawn on the CPU
and copied as exact-size allocations with PyTorch's caching allocator off, so that memcheck sees every byte
past an allocation; outputs come from ``torch.empty``, so that initcheck catches any output element read back
without being written (and any read of an unwritten split-k workspace).

The kernels are compiled first, outside the sanitizer (and outside ``--budget``; the cache is shared with the
fuzzer and the GPU tests). The four tools run side by side, each for at most ``--budget`` seconds; cases are
ordered so that every variant runs once before any runs twice, so a budget that runs out first cuts the
repeats (the JSON says how many cases and variants each tool ran).

    OUT=/tmp/out python scripts/sanitize.py --budget 200          # writes $OUT/sanitize.json and logs
    python scripts/sanitize.py --list                             # the cases, no GPU needed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")


def find_sanitizer() -> str | None:
    cands = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "compute-sanitizer"))
            cands.append(os.path.join(home, "compute-sanitizer", "compute-sanitizer"))
    return next((c for c in cands if c and os.path.exists(c)), None)


# ------------------------------------------------------------------------------------------ inner process


def selected(case, kernels: str, match: str = "") -> bool:
    """``--kernels mma_gemm,dec``: only cases whose kernel name starts with one of these (empty: all);
    ``--match nwg1``: only variants whose name contains that text."""
    names = [k for k in kernels.split(",") if k]
    return (not names or any(case.kernel.startswith(k) for k in names)) and match in case.variant


def inner(args: argparse.Namespace) -> int:
    """Under the sanitizer: launch every case until the deadline; one JSON line per case on stdout."""
    import torch

    from quick.testing import kernel_cases as vc

    torch.manual_seed(0)
    cases = [c for c in vc.all_cases() if vc.available(c) and selected(c, args.kernels, args.match)]
    print(f"SANITIZE-INNER tool={args.tool} cases={len(cases)}", flush=True)
    gen = torch.Generator().manual_seed(1234)
    for i, case in enumerate(cases):
        if time.time() > args.deadline:
            print(json.dumps({"event": "deadline", "ran": i, "total": len(cases)}), flush=True)
            break
        rec = {"event": "case", "i": i, "label": case.label(), "kernel": case.kernel, "variant": case.variant}
        print(f"CASE {i} {case.label()}", flush=True)
        try:
            inp = vc.make_inputs(case, gen)
        except (ValueError, TypeError, NotImplementedError) as e:  # a layer that refuses this shape: not launched
            rec.update(ok=True, skipped=f"{type(e).__name__}: {e}"[:300])
            print("JSON " + json.dumps(rec), flush=True)
            continue
        try:
            out = vc.launcher(case)(inp["x"], inp["packed"], inp["bias"])
            torch.cuda.synchronize()
            host = out.cpu()
            rec["shape_ok"] = tuple(host.shape) == (case.m, case.n)
            rec["finite"] = bool(torch.isfinite(host).all())
            rec["ok"] = rec["shape_ok"] and rec["finite"]
        except Exception as e:  # recorded, not raised: the sanitizer's own report matters most
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        print("JSON " + json.dumps(rec), flush=True)
    else:
        print(json.dumps({"event": "done", "ran": len(cases), "total": len(cases)}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parent


_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")
_RACE = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_REPORT = re.compile(r"^========= (?!ERROR SUMMARY|RACECHECK SUMMARY|COMPUTE-SANITIZER|Target|  )(\S.*)$")


def parse_log(text: str) -> dict:
    """Error counts from the tool's summary, cases seen, and the first reports with the case that was running."""
    res: dict = {"summary_found": False, "errors": None, "warnings": 0}
    m = _SUMMARY.findall(text)
    r = _RACE.findall(text)
    if r:
        res.update(summary_found=True, errors=int(r[-1][1]), warnings=int(r[-1][2]))
    elif m:
        res.update(summary_found=True, errors=int(m[-1]))
    cases, reports, current = [], [], None
    failed_cases = []
    for line in text.splitlines():
        if line.startswith("CASE "):
            current = line[5:]
        elif line.startswith("JSON "):
            try:
                rec = json.loads(line[5:])
            except json.JSONDecodeError:
                continue
            cases.append(rec)
            if not rec.get("ok"):
                failed_cases.append(rec)
        else:
            mm = _REPORT.match(line)
            if mm and len(reports) < 40:
                reports.append({"case": current, "report": mm.group(1)[:300]})
    res["skipped"] = sum(1 for c in cases if c.get("skipped"))
    res["cases"] = len(cases) - res["skipped"]
    res["variants"] = len({(c["kernel"], c["variant"]) for c in cases if not c.get("skipped")})
    res["kernels"] = sorted({c["kernel"] for c in cases})
    res["python_failures"] = failed_cases[:20]
    res["python_failure_count"] = len(failed_cases)
    res["reports"] = reports
    res["finished_all"] = '"event": "done"' in text
    return res


def precompile(kernels: str = "") -> float:
    """Build the variants the cases launch (``--kernels`` of MoE kernels only: just the MoE module's)."""
    import torch

    from quick.kernels import jit
    from quick.testing import kernel_cases as vc

    t0 = time.time()
    arch = jit.arch_for_device()
    names = [k for k in kernels.split(",") if k]
    moe_only = bool(names) and all(n.startswith("moe") for n in names)
    jobs = vc.moe_compile_jobs(arch) if moe_only else vc.compile_jobs(arch)
    jit.compile_many(jobs, workers=os.cpu_count())
    print(f"precompiled {len(jobs)} variants in {time.time() - t0:.1f} s on {torch.cuda.get_device_name()}", flush=True)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the four tools (compile not included)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--kernels", default="", help="kernel prefixes: mma_gemm, mma_gemv, sm90, dec, attn, registry")
    ap.add_argument("--match", default="", help="only variants whose name contains this text (e.g. nwg1)")
    ap.add_argument("--out", default=os.environ.get("OUT", "sanitize_out"))
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="memcheck", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        return inner(args)

    from quick.testing import kernel_cases as vc

    if args.list:
        cases = [c for c in vc.all_cases() if selected(c, args.kernels, args.match)]
        for c in cases:
            print(c.label())
        print(f"{len(cases)} cases, {len({(c.kernel, c.variant) for c in cases})} variants")
        return 0

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "budget_s": args.budget,
        "tools": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    san = find_sanitizer()
    import torch

    if san is None or not torch.cuda.is_available():
        summary["error"] = "compute-sanitizer or a CUDA device not found"
        (out / "sanitize.json").write_text(json.dumps(summary, indent=1))
        print(summary["error"])
        return 2
    summary["sanitizer"] = subprocess.run([san, "--version"], capture_output=True, text=True).stdout.strip()[-200:]
    summary["device"] = torch.cuda.get_device_name()
    summary["compile_s"] = round(precompile(args.kernels), 1)
    t_start = time.time()  # the budget is the tools' time; compiling is shared with the fuzzer and the tests
    summary["modules_with_variants"] = vc.kernel_modules_with_variants()
    summary["registry_entries_covered"] = [f"{e.layout}:{e.name}" for e in vc.registry_entries()]
    cases = [c for c in vc.all_cases() if vc.available(c) and selected(c, args.kernels, args.match)]
    summary["kernels"] = args.kernels or "all"
    summary["cases_available"] = len(cases)
    summary["variants_available"] = len({(c.kernel, c.variant) for c in cases})

    tools = [t for t in args.tools.split(",") if t]
    # no first-use timing under the tools: the choice comes from the table or the model, the same in every tool
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1", QUICK_AUTOTUNE="0")
    # The tools run side by side (one process each, separate CUDA contexts on the one GPU): their cost is
    # mostly instrumenting each kernel module as it loads, which does not contend much.
    deadline = t_start + max(args.budget - 30.0, 10.0)  # ~30 s: the last case and the tool's own summary
    procs = {}
    for tool in tools:
        cmd = [san, "--tool", tool, "--print-limit", "200"]
        if tool == "racecheck":
            cmd += ["--racecheck-report", "all"]
        cmd += [sys.executable, str(Path(__file__).resolve()), "--inner", "--tool", tool, "--deadline", str(deadline)]
        cmd += ["--kernels", args.kernels, "--match", args.match]
        log = open(out / f"sanitize-{tool}.log", "w")  # noqa: SIM115  (closed below)
        procs[tool] = (subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log, time.time())  # fmt: skip
        print(f"=== {tool} started", flush=True)
    rc = 0
    for tool, (proc, log, t0) in procs.items():
        timed_out = False
        try:
            proc.wait(timeout=max(t_start + args.budget + 60.0 - time.time(), 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the sanitizer and the Python process under it
            proc.wait()
        log.close()
        code = None if timed_out else proc.returncode
        res = parse_log((out / f"sanitize-{tool}.log").read_text(errors="replace"))
        res.update(returncode=code, timed_out=timed_out, wall_s=round(time.time() - t0, 1))
        summary["tools"][tool] = res
        res["all_variants"] = res["variants"] == summary["variants_available"]
        bad = (
            timed_out
            or not res["summary_found"]
            or res["errors"]
            or res["python_failure_count"]
            or code != 0
            or (cases and res["cases"] == 0)
        )
        rc = rc or (1 if bad else 0)
        print(
            f"{tool}: errors={res['errors']} cases={res['cases']}/{len(cases)} variants={res['variants']}/"
            f"{summary['variants_available']} python_failures={res['python_failure_count']} rc={code} "
            f"timed_out={timed_out} {res['wall_s']} s",
            flush=True,
        )
        for r in res["reports"][:5]:
            print("   ", r)
    summary["total_s"] = round(time.time() - t_start, 1)
    summary["sanitizer_runs"] = len(tools)
    summary["cases_run_total"] = sum(t["cases"] for t in summary["tools"].values())
    summary["errors_total"] = sum((t["errors"] or 0) for t in summary["tools"].values())
    summary["every_variant_under_every_tool"] = all(t["all_variants"] for t in summary["tools"].values())
    (out / "sanitize.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "tools"}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
