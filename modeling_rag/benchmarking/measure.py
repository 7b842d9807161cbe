"""Measuring: alternating timed repeats with the first call apart, extra peak memory, the GEMM peak."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch


def set_threads(n: int) -> None:
    """The same number of threads for torch and for FAISS's OpenMP loops."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(values: list[float]) -> dict:
    """Median, min and max of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_alternating(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    use_cpu_clock: bool,
    finishers: dict[str, Callable[[object], object] | None] | None = None,
) -> dict:
    """Runs every callable once (the first call, timed apart) and then `repeats` more times.

    The sides take turns, and the order of the turns alternates (A B, B A, A B, ...), so neither side
    always runs right after the other's work. Both the wall clock and the process CPU clock are read;
    the primary figures use the CPU clock when `use_cpu_clock` (one thread on a shared CPU: time spent
    descheduled by other work is not counted). `finishers[side]`, when given, runs untimed after each
    call on its output (e.g. to read and clear gradients); every call's (finished) output is kept.
    """
    finishers = finishers or {}
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    outputs: dict[str, list] = {k: [] for k in names}
    for r in range(1 + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            out = fns[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            finish = finishers.get(name)
            outputs[name].append(finish(out) if finish is not None else out)
    result = {}
    for k in names:
        primary = cpu[k] if use_cpu_clock else wall[k]
        result[k] = {
            "first_call_s": primary[0],
            **{f"{key}_s": value for key, value in summary(primary[1:]).items()},
            "wall_times_s": [round(x, 4) for x in wall[k]],
            "cpu_times_s": [round(x, 4) for x in cpu[k]],
            "outputs": outputs[k],
        }
    return result


def paired_ratios(timed: dict, slow: str, fast: str, use_cpu_clock: bool) -> dict:
    """`slow / fast` per repeat (the two calls of one repeat ran next to each other), summarised."""
    key = "cpu_times_s" if use_cpu_clock else "wall_times_s"
    ratios = [a / b for a, b in zip(timed[slow][key][1:], timed[fast][key][1:])]
    return summary(ratios)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_extra_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory (MiB) of one call of `fn` above what is resident (or allocated) before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set size) to the current VmRSS
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


def matmul_peak(device: torch.device, dtype: torch.dtype, clock=time.perf_counter, seconds: float = 1.0) -> float:
    """The best matrix-multiply throughput (FLOP/s) seen on a few model-shaped and square GEMMs."""
    shapes = [(4096, 768, 3072), (4096, 3072, 768), (2048, 2048, 2048)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = clock()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * m * k * n / max(clock() - t0, 1e-9))
    return best
