"""Kernel timing shared by the benchmarks and the tuner: median of ``triton.testing.do_bench`` (the L2 cleared before
every repetition) over CUDA-graph replays of one call; where Triton is missing, CUDA events around single calls after
a 256 MB L2 flush, median of the repetitions."""

from __future__ import annotations

from collections.abc import Callable

import torch


def bench_us(fn: Callable[[], object], warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median time of ``fn()`` in microseconds, L2 flushed before each repetition."""
    try:
        from triton.testing import do_bench

        return 1000.0 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except ImportError:
        pass
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms))):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def kernel_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Mean device time in microseconds of the kernels one ``fn()`` launches (CUPTI through ``torch.profiler``),
    L2 flushed by a device copy before each call: the kernels' own time, without the launch latency that
    :func:`bench_us` includes (a few microseconds, which dominate kernels that last a few microseconds). Copies and
    memsets are not counted, and whatever the flush itself launches is measured alone and taken off."""
    src = torch.empty(128 * 1024 * 1024, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def flush_and(call: Callable[[], object] | None) -> float:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                dst.copy_(src)
                if call is not None:
                    call()
            torch.cuda.synchronize()
        total = 0.0
        for evt in prof.events():
            name = evt.name.lower()
            if evt.device_type == torch.autograd.DeviceType.CUDA and not name.startswith(("memcpy", "memset")):
                total += evt.device_time_total
        return total / reps

    return max(0.0, flush_and(fn) - flush_and(None))


def warm_up_for_capture(fn: Callable[[], object], side: torch.cuda.Stream) -> None:
    """The warm-up before a CUDA-graph capture of ``fn``: one call on the current stream (compiles, allocates),
    one on the side stream ``side`` (as capture needs), both finished on return."""
    fn()
    torch.cuda.synchronize()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured into a CUDA graph (after a warm-up that compiles and allocates); returns the replay.
    Timing replays measures the GPU work of ``fn`` without the Python launch cost, for every implementation
    alike (cuBLAS through F.linear pays a few microseconds of eager overhead too)."""
    warm_up_for_capture(fn, torch.cuda.Stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()

    def replay() -> None:  # the closure keeps the graph (and its memory pool) alive
        g.replay()

    return replay
