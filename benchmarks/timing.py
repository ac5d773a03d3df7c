"""Median timings: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) and
``do_bench_cudagraph`` on a GPU, ``torch.utils.benchmark`` on a CPU; peak memory; errors kept as strings."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as torch_benchmark


def error_text(err: BaseException, limit: int = 500) -> str:
    """A failure as a result: the exception's type and message, cut at ``limit`` characters."""
    return f"{type(err).__name__}: {err}"[:limit]


def time_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds per call of fn."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=rep_ms / 1e3).median * 1e3


def time_graph_ms(fn: Callable[[], Any], rep_ms: float) -> tuple[float | None, str | None]:
    """Median milliseconds per call of fn replayed from a CUDA graph, or (None, why it failed): a host
    synchronisation inside fn cannot be captured."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")), None
    except Exception as err:  # a failed capture is a result to report, not a crash
        torch.cuda.synchronize()
        return None, error_text(err)
    finally:
        torch.cuda.empty_cache()


def time_call_s(fn: Callable[[], Any], min_run_s: float) -> float:
    """Median seconds per call of a long call (a whole ``generate``): ``torch.utils.benchmark``'s
    blocked_autorange, which synchronises CUDA around the calls."""
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_s).median


def peak_extra_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated while fn runs above what was allocated before (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def paired_ratio(values: list[float], references: list[float], resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float | None, list[float] | None]:
    """The median of the per-round ratios values[i] / references[i] (rounds timed side by side) and its
    percentile-bootstrap interval over rounds, [low, high] (None under three rounds); (None, None) when
    either list is empty or their lengths differ (a strategy that failed mid-way)."""
    if not values or len(values) != len(references) or not all(references):
        return None, None
    ratios = [v / r for v, r in zip(values, references)]
    estimate = statistics.median(ratios)
    if len(ratios) < 3:
        return estimate, None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return estimate, [medians[int(tail * (resamples - 1))], medians[int((1.0 - tail) * (resamples - 1))]]


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, None when either is missing."""
    if value is None or not reference:
        return None
    return value / reference
