"""Kernel choices timed at first use and kept on disk per GPU, for shapes no measured table covers.

The first eager call of a (layout, K, N, group size, dtype) at a batch bucket (the power of two at or above M) times the
few plausible candidates of :mod:`quick.kernels.select` on its own inputs, keeps the fastest one whose output agrees
with the model's choice, and writes it to ``<QUICK_TUNING_DIR>/<gpu>.autotune.json`` (entries in the format of the
measured tables, :mod:`quick.kernels.tuning`), so later processes on this GPU start with it. Nothing is timed while a
CUDA graph is being captured: the caller then takes the model's choice for that call.

Each candidate is timed as a CUDA-graph replay: the GPU work alone, as the graphed decode step and the benchmarks see
it. Timed eagerly, a launcher's Python cost (tens of microseconds, more on a busy host) outlasts the L2 flush and
decides the race between kernels of different host cost instead of their GPU time.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from quick import settings
from quick.kernels import tuning

FLUSH_BYTES = 128 * 1024 * 1024  # more than any L2 here, and ~40 us of GPU work that hides the Python launch cost
REPS = 10
FORMAT = 2  # cache files of another format (timed eagerly) are ignored, so their picks are timed again
AGREE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # split-k and tile order change the rounding, not the result

_LOCK = threading.Lock()
_MEM: dict[Path, dict[tuple, dict]] = {}


def bucket(m: int) -> int:
    """The batch bucket of ``m`` rows: the power of two at or above it."""
    return 1 << max(0, (m - 1).bit_length())


def path_for(device: torch.device) -> Path:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return settings.tuning_dir() / f"{tuning.gpu_key(torch.cuda.get_device_name(idx))}.autotune.json"


def _key(layout: str, k: int, n: int, m: int, group_size: int, dtype: torch.dtype) -> tuple:
    return (layout, k, n, bucket(m), group_size, str(dtype).removeprefix("torch."))


def _entry_key(e: dict) -> tuple:
    return (e["layout"], int(e["K"]), int(e["N"]), int(e["M"]), int(e["group_size"]), e["dtype"])


def _load(path: Path) -> dict[tuple, dict]:
    hit = _MEM.get(path)
    if hit is not None:
        return hit
    entries: dict[tuple, dict] = {}
    if path.is_file():
        try:
            body = json.loads(path.read_text())
            if body.get("format") == FORMAT:
                for e in body["entries"]:
                    entries[_entry_key(e)] = e
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"ignoring the autotune cache {path}: {err}", RuntimeWarning, stacklevel=3)
            entries = {}
    _MEM[path] = entries
    return entries


def lookup(
    device: torch.device, layout: str, k: int, n: int, m: int, group_size: int, dtype: torch.dtype
) -> dict | None:
    """The cached entry (``kernel``, ``config``, ``splits``, ``us``) for this problem's bucket, or None."""
    with _LOCK:
        return _load(path_for(device)).get(_key(layout, k, n, m, group_size, dtype))


def record(device: torch.device, layout: str, k: int, n: int, m: int, group_size: int, dtype: torch.dtype,
           entry: dict) -> None:  # fmt: skip
    """Keep ``entry`` in memory and on disk (merged with what other processes wrote; atomic replace)."""
    path = path_for(device)
    key = _key(layout, k, n, m, group_size, dtype)
    full = {"layout": layout, "K": k, "N": n, "M": key[3], "group_size": group_size, "dtype": key[5], **entry}
    with _LOCK:
        mine = _load(path)
        mine[key] = full
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                try:
                    old = json.loads(path.read_text())
                    for e in old["entries"] if old.get("format") == FORMAT else []:
                        mine.setdefault(_entry_key(e), e)
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # a corrupt file is replaced by what this process knows
            body = {
                "format": FORMAT,
                "gpu": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "entries": list(mine.values()),
            }
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=0)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as err:  # a read-only home must not stop inference: the choice stays in memory
            warnings.warn(f"could not write the autotune cache {path}: {err}", RuntimeWarning, stacklevel=3)


def clear_memory() -> None:
    """Forget what was loaded (tests; after the folder setting changed)."""
    with _LOCK:
        _MEM.clear()


def time_candidates(
    run: Callable[[object, torch.Tensor], torch.Tensor],
    candidates: list,
    out_shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> list[float | None]:
    """Median microseconds of ``run(candidate, out)`` per candidate, the L2 flushed before each repetition; None for
    a candidate that failed or whose output disagrees with the first candidate's (the reference: the model's pick)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    ref: torch.Tensor | None = None
    times: list[float | None] = []
    for i, cand in enumerate(candidates):
        out = torch.empty(out_shape, dtype=dtype, device=device)
        try:
            run(cand, out)
            torch.cuda.synchronize(device)
        except Exception as err:  # noqa: BLE001 - a candidate that cannot launch here is skipped, not fatal
            if i == 0:  # without the reference nothing can be checked: the caller runs the model's pick as is
                return [None] * len(candidates)
            warnings.warn(f"autotune: candidate {cand} failed: {err}", RuntimeWarning, stacklevel=2)
            times.append(None)
            continue
        o = out.double()
        if not torch.isfinite(o).all():
            if i == 0:
                return [None] * len(candidates)
            times.append(None)
            continue
        if i == 0:
            ref = o
        elif ref is not None:
            err = float((o - ref).norm() / ref.norm().clamp_min(1e-30))
            if err > AGREE.get(dtype, 3e-2):
                msg = f"autotune: candidate {cand} disagrees with the model's choice ({err:.2e})"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                times.append(None)
                continue
        graph = _captured(run, cand, out, device)
        launch = graph.replay if graph is not None else functools.partial(run, cand, out)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
        for start, end in events:
            flush.zero_()
            start.record()
            launch()
            end.record()
        torch.cuda.synchronize(device)
        ts = sorted(s.elapsed_time(e) * 1000.0 for s, e in events)
        times.append(ts[len(ts) // 2])
        del graph, launch
    del flush
    return times


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device for every timing: launchers keep per-stream buffers (split-k counters), so a new
    stream per candidate would leave a buffer behind each time."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if idx not in _STREAMS:
            _STREAMS[idx] = torch.cuda.Stream(idx)
        return _STREAMS[idx]


def _uncached_allocator() -> bool:
    """PyTorch's caching allocator switched off (as under compute-sanitizer): a capture would call cudaMalloc."""
    return os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "") not in ("", "0")


def _captured(run: Callable[[object, torch.Tensor], torch.Tensor], cand, out: torch.Tensor, device) -> object | None:
    """``run(cand, out)`` captured into a CUDA graph (warmed up on the capture stream first, so per-stream buffers
    exist before the capture), or None off CUDA or where the capture fails (that candidate is then timed eagerly)."""
    if torch.device(device).type != "cuda" or _uncached_allocator():
        return None
    side = _capture_stream(torch.device(device))
    side.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            run(cand, out)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):  # other threads may use CUDA
            run(cand, out)
        torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - timing eagerly is slower to trust, not wrong
        warnings.warn(f"autotune: {cand} could not be captured, timed eagerly: {err}", RuntimeWarning, stacklevel=3)
        torch.cuda.synchronize(device)
        return None
    return graph
