#!/usr/bin/env python3
"""Where does a decode GEMM spend its time? Nsight Compute on the tuned kernels at K = N = 8192, M = 1 and 16.

    OUT=$OUT timeout 150 python3 scripts/ncu_decode.py          # on the GPU machine (Firecracker: ncu works)
    OUT=$OUT timeout 150 python3 scripts/ncu_decode.py --dec    # the decode kernel on Llama-2-7B's batch-1 linears

``--dec``: the decode kernel (``quick_dec``, the kernel and config ``quick.kernels.select`` picks at M = 1, without
timing candidates inside the profile) on the four linear shapes of a Llama-2-7B layer as the fast step calls them
(fused q/k/v 4096 x 12288, o 4096², fused gate/up 4096 x 22016, down 11008 x 4096), and the read-only probe over the
gate/up bytes: DRAM throughput, occupancy and stalls, to tell whether waves, short CTAs or DRAM locality limit its
streaming rate (docs/kernels.md).

Profiles, with the clocks left alone (``--clock-control none``) and the caches flushed by ncu before each
replay: the W4A16 Hopper GEMM (``quick_sm90``, wgmma) and the W4A8 Hopper GEMM at M = 1 and 16 with their tuned
configs, and the read-only probe over the same bytes (the floor). Writes ``$OUT/ncu_decode.txt`` (the
speed-of-light, memory, scheduler and warp-state sections) and ``$OUT/ncu_stalls.txt`` (per kernel, the SASS
instructions with the most stall samples, from the source page). ``--target`` is the process ncu runs.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "ncu_out"))
KERNELS = "regex:quick_sm90_gemm|quick_w4a8_sm90_gemm|quick_stream_probe"
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "SchedulerStats", "WarpStateStats", "LaunchStats", "Occupancy")


def target() -> int:
    """Each kernel three times (the first launch of each also loads the cubin); ncu profiles all 15 launches."""
    import torch

    from quick.formats.layouts import get_layout, pack_w4a8_sm90
    from quick.formats.w4a8 import W4A8Weight
    from quick.kernels import w4a8_wgmma as w8
    from quick.kernels import wgmma as sm
    from quick.testing import random_quantized

    gen = torch.Generator().manual_seed(1)
    k = n = 8192
    qw = random_quantized(k, n, 128, torch.float16, "cpu", gen)
    p16 = {kk: v.cuda() for kk, v in get_layout("quick_sm90").pack(qw).items()}
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    gs = torch.randint(1, 17, (k // 128, n), generator=gen, dtype=torch.int16)
    p8 = {kk: v.cuda() for kk, v in pack_w4a8_sm90(W4A8Weight(q, torch.rand(n) * 1e-3 + 1e-4, gs, 128)).items()}
    for m in (1, 16):
        x = torch.randn(m, k, generator=gen).half().cuda()
        xq, sx = w8.quantize_activations_sm90(x)
        for _ in range(3):
            sm.gemm_w4a16_sm90(x, p16["qweight"], p16["scales"], p16["zeros"], 128)
        for _ in range(3):
            w8.gemm_w4a8_sm90_q(
                xq, sx, p8["qweight"], p8["channel_scale"], p8["group_scale"], 128, None, torch.float16, widen=True
            )
        torch.cuda.synchronize()
    try:
        run_probe(k, n)
    except Exception as e:  # noqa: BLE001
        print(f"probe not run: {e}")
    return 0


def run_probe(k: int, n: int) -> None:
    """The read-only probe, three times, over the bytes of a K x N g128 weight (codes, scales, zeros)."""
    import ctypes

    import torch

    from quick.kernels import jit

    buf = torch.ones((k * n // 2 + 4 * (k // 128) * n) // 4, dtype=torch.int32, device="cuda")
    sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    kern = jit.load_kernel("quick_stream_probe.cu", "quick_stream_probe", {"QP_U": 8, "QP_EF": 0})
    n16 = buf.numel() * buf.element_size() // 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def probe() -> None:  # 16-byte loads, 8 in flight per thread, 4 CTAs of 512 threads per SM
        kern((sms * 4,), (512,), [buf, ctypes.c_longlong(n16), sink])

    for _ in range(3):
        probe()
    torch.cuda.synchronize()


DEC_SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))  # (K, N) of one Llama-2-7B layer
DEC_KERNELS = "regex:quick_dec|quick_stream_probe"


def target_dec() -> int:
    """Each Llama-2-7B linear at M = 1 three times through the layout's automatic entry (the kernel and config
    ``select`` picks: override, table, autotune cache, model), then the probe over the gate/up bytes three times."""
    os.environ["QUICK_AUTOTUNE"] = "0"  # timing candidates here would put their launches into the profile
    import torch

    from quick.formats.layouts import get_layout
    from quick.kernels import select
    from quick.testing import random_quantized

    gen = torch.Generator().manual_seed(1)
    for k, n in DEC_SHAPES:
        qw = random_quantized(k, n, 128, torch.float16, "cpu", gen)
        p = {kk: v.cuda() for kk, v in get_layout("quick_sm90").pack(qw).items()}
        x = torch.randn(1, k, generator=gen).half().cuda()
        w = (p["qweight"], p["scales"], p["zeros"], 128)
        print(f"K={k} N={n} M=1: {select.choose(select.prepare('quick_sm90', x, *w, None)[0]).describe()}")
        for _ in range(3):
            select.matmul("quick_sm90", x, *w)
        torch.cuda.synchronize()
    run_probe(*DEC_SHAPES[2])
    return 0


def stalls(rep: Path, ncu: str) -> str:
    """Top SASS lines by stall samples per profiled kernel (ncu's source page, CSV)."""
    out = []
    proc = subprocess.run(
        [ncu, "-i", str(rep), "--page", "source", "--csv", "--print-source", "sass"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout
    (OUT / "ncu_source.csv").write_text(text)  # raw, for parsing elsewhere
    out.append(f"source page: {len(text)} chars, rc {proc.returncode}, {proc.stderr[-300:]}")
    rows = list(csv.reader(io.StringIO(text)))
    header = None
    cur = []
    for r in rows:
        if r and r[0] in ("# Address", "Address") or (r and "Source" in r and "Warp Stall Sampling (All Samples)" in r):
            if header and cur:
                out.append(_top(header, cur))
            header, cur = r, []
        elif header and len(r) == len(header):
            cur.append(r)
    if header and cur:
        out.append(_top(header, cur))
    return "\n".join(out)


def _top(header: list[str], rows: list[list[str]], n: int = 40) -> str:
    def col(name: str) -> int:
        return next((i for i, h in enumerate(header) if h.startswith(name)), -1)

    i_s, i_src = col("Warp Stall Sampling (All"), col("Source")
    if i_s < 0:
        return "no stall column in: " + ",".join(header[:12])

    def val(r: list[str]) -> float:
        try:
            return float(r[i_s].replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(val(r) for r in rows) or 1.0
    top = sorted(rows, key=val, reverse=True)[:n]
    lines = [f"--- {len(rows)} instructions, {total:.0f} stall samples; top {n}:"]
    for r in top:
        lines.append(f"{100 * val(r) / total:5.1f}%  {r[i_src][:110]}")
    return "\n".join(lines)


def main() -> int:
    dec = "--dec" in sys.argv
    if "--target" in sys.argv:
        return target_dec() if dec else target()
    OUT.mkdir(parents=True, exist_ok=True)
    ncu = shutil.which("ncu") or next(
        (c for c in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu") if os.path.exists(c)), None
    )
    if ncu is None:
        print("ncu not found")
        return 1
    rep = OUT / "decode.ncu-rep"
    cmd = [
        ncu,
        "--clock-control",
        "none",
        "--cache-control",
        "all",
        "-k",
        DEC_KERNELS if dec else KERNELS,
        "--launch-count",
        "15",
        "-f",
        "-o",
        str(rep.with_suffix("")),
    ]
    for s in (*SECTIONS, "SourceCounters"):
        cmd += ["--section", s]
    cmd += ["--import-source", "no", sys.executable, str(Path(__file__).resolve()), "--target"]
    cmd += ["--dec"] if dec else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    details = subprocess.run([ncu, "-i", str(rep), "--page", "details"], capture_output=True, text=True, timeout=120)
    (OUT / "ncu_decode.txt").write_text(details.stdout + details.stderr)
    (OUT / "ncu_stalls.txt").write_text(stalls(rep, ncu))
    keep = (
        "quick_",
        "Duration",
        "DRAM Throughput",
        "Memory Throughput",
        "Compute (SM) Throughput",
        "Registers",
        "Issue Slots Busy",
        "No Eligible",
        "Warp Cycles Per Issued",
        "Stall",
        "Grid Size",
        "Block Size",
    )
    print("\n".join(ln for ln in details.stdout.splitlines() if any(k in ln for k in keep))[-9000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
