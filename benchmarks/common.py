"""Shared benchmark plumbing: environment stamp, measured ceilings, the streaming floor, the implementation
registry, and the JSON / markdown / PNG writers (every result is stamped with GPU, torch and CUDA versions and the
date). Timing (``bench_us``, ``graphed``) lives in ``quick.bench.timing`` (the tuner in the package uses it too):
the median of ``triton.testing.do_bench``, which clears the L2 cache before every repetition, over graph replays.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quick.bench.timing import bench_us, graphed, warm_up_for_capture  # noqa: F401  (re-exported for the scripts)

# --------------------------------------------------------------------------------------------- environment


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str | None = None) -> str:
    """Short file-name form: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    name = name or gpu_name()
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower())).lower()


def env_info() -> dict:
    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.date.today().isoformat(),
    }


# ------------------------------------------------------------------------------------------ streaming floor


def stream_floor_us(nbytes: int) -> float:
    """Time to stream ``nbytes`` through a plain read-only kernel (``csrc/quick_stream_probe.cu``: 16-byte loads,
    8 in flight per thread, 4 CTAs of 512 threads per SM), under the same timing as the kernels (graph replay,
    L2 flushed by a memset first): the practical floor of a kernel that must read that much (``torch.sum`` is
    not one: it has costs of its own, docs/kernels.md)."""
    import ctypes

    from quick.kernels import jit

    kern = jit.load_kernel("quick_stream_probe.cu", "quick_stream_probe", {"QP_U": 8, "QP_EF": 0})
    buf = torch.randint(0, 2**31 - 1, (max(nbytes // 4, 4),), device="cuda", dtype=torch.int32)
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    n16 = buf.numel() * 4 // 16
    blocks = 4 * torch.cuda.get_device_properties(buf.device).multi_processor_count
    replay = graphed(lambda: kern((blocks,), (512,), [buf, ctypes.c_longlong(n16), sink]))
    return bench_us(replay)


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and an fp16 8192^3 GEMM rate, measured here."""
    n = 1 << 30  # 1 GiB each way
    bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    t = bench_us(lambda: bufs[1].copy_(bufs[0]), rep_ms=100)
    copy_tbps = 2 * n / (t * 1e-6) / 1e12
    bufs.clear()
    s = 8192
    x = torch.randn(s, s, device="cuda", dtype=torch.float16)
    y = torch.randn(s, s, device="cuda", dtype=torch.float16)
    t = bench_us(lambda: x @ y, rep_ms=200)
    return {"copy_TBps": round(copy_tbps, 3), "fp16_TFLOPS": round(2 * s**3 / (t * 1e-6) / 1e12, 1)}


# -------------------------------------------------------------------------------------------- registry


@dataclass
class Impl:
    """A benchmarked implementation: ``make(problem)`` returns a zero-argument callable to time (or raises
    to mark it unavailable for that problem); ``applies(M, K, N)`` filters the grid."""

    name: str
    dtype: str
    make: Callable[[dict], Callable[[], object]]
    applies: Callable[[int, int, int], bool] = field(default=lambda m, k, n: True)


IMPLS: dict[str, Impl] = {}


def register_impl(impl: Impl) -> Impl:
    IMPLS[impl.name] = impl
    return impl


# ------------------------------------------------------------------------------------------------ writers


def flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def w4_bytes(m: int, k: int, n: int, group: int = 128) -> float:
    """Fewest bytes a W4A16 product must move: int4 weights, fp16 scales and zeros, x in, out."""
    g = k if group == -1 else group
    return k * n / 2 + 2 * (k // g) * n * 2 + 2 * m * k + 2 * m * n


def roofline_us(m: int, k: int, n: int, ceilings: dict, group: int = 128) -> float:
    t_mem = w4_bytes(m, k, n, group) / (ceilings["copy_TBps"] * 1e12)
    t_flop = flops(m, k, n) / (ceilings["fp16_TFLOPS"] * 1e12)
    return 1e6 * max(t_mem, t_flop)


def write_json(path: Path, env: dict, ceilings: dict, rows: list[dict], extra: dict | None = None) -> None:
    doc = {
        "gpu": env["gpu"],
        "torch": env["torch"],
        "cuda": env.get("cuda"),
        "date": env["date"],
        "ceilings": ceilings,
        "rows": rows,
    }
    doc.update(extra or {})
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_markdown(
    path: Path,
    env: dict,
    ceilings: dict,
    rows: list[dict],
    shapes: list[tuple[int, int]],
    impls: list[str],
    group: int = 128,
    title: str = "W4A16 kernels",
    floors: dict | None = None,
) -> str:
    """One table per (K, N): microseconds (TFLOP/s) per implementation and M, with the roofline time and,
    when given, the measured streaming floor of the shape (``floors[(K, N)]``, us)."""
    lines = [
        f"# {title}",
        "",
        f"{env['gpu']}, torch {env['torch']}, CUDA {env.get('cuda')}, {env['date']}. Median of do_bench with the "
        f"L2 flushed, random data. Ceilings measured in the same run: copy {ceilings['copy_TBps']} TB/s "
        f"(read + write), fp16 GEMM {ceilings['fp16_TFLOPS']} TFLOP/s. Roofline = max(bytes / copy BW, "
        f"flops / fp16 rate), bytes = int4 weights + fp16 scales and zeros (g{group}) + x + out.",
        "",
    ]
    for k, n in shapes:
        floor = (floors or {}).get((k, n))
        lines += [
            f"## K={k}, N={n}" + (f" (streaming floor under the same timing: {floor:.1f} us)" if floor else ""),
            "",
            "| M | roofline | " + " | ".join(impls) + " |",
            "|---|---|" + "---|" * len(impls),
        ]
        ms = sorted({r["M"] for r in rows if r["K"] == k and r["N"] == n})
        for m in ms:
            cells = []
            for name in impls:
                r = next((r for r in rows if (r["impl"], r["M"], r["K"], r["N"]) == (name, m, k, n)), None)
                cells.append(f"{r['us']:.1f} ({r['tflops']:.0f})" if r else "")
            lines.append(f"| {m} | {roofline_us(m, k, n, ceilings, group):.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Cells: microseconds (TFLOP/s). Streaming floor: a plain read (sum) of the same number of bytes as "
        "the int4 weights + scales + zeros, timed the same way; it includes writing back the dirty L2 "
        "lines that do_bench's cache flush (a 256 MB memset) leaves behind."
    )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_png(
    path: Path,
    env: dict,
    ceilings: dict,
    rows: list[dict],
    shapes: list[tuple[int, int]],
    impls: list[str],
    group: int = 128,
) -> None:
    """TFLOP/s against M per implementation, one panel per shape, with the roofline drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (k, n) in zip(axes.flat, shapes, strict=False):
        ms = sorted({r["M"] for r in rows if r["K"] == k and r["N"] == n})
        if not ms:
            continue
        mm = [2 ** (i / 4) for i in range(0, int(4 * math.log2(max(ms))) + 1)]
        roof = [flops(m, k, n) / (roofline_us(m, k, n, ceilings, group) * 1e-6) / 1e12 for m in mm]
        ax.plot(mm, roof, "k--", lw=1, label="roofline")
        for name in impls:
            pts = sorted((r["M"], r["tflops"]) for r in rows if r["impl"] == name and (r["K"], r["N"]) == (k, n))
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"K={k} N={n}", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, CUDA {env.get('cuda')}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
