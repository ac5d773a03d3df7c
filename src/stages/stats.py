"""Percentile-bootstrap confidence intervals over test examples (NumPy).

A score of the tables is the mean over tasks of each task's mean per-example score (one task: that
task's mean). Its interval resamples the examples of every task with replacement, on their own, and
takes the percentiles of the resampled averages. A paired interval of A - B resamples the same
examples for both methods, i.e. bootstraps the per-example differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval (same scale as the scores)."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        """True when the whole interval is on one side of 0 (a paired difference that holds)."""
        return self.low > 0 or self.high < 0


def _arrays(per_task: Mapping[str, Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(v, dtype=np.float64) for v in per_task.values()]
    if not arrays:
        raise ValueError("bootstrap: no task to average")
    for name, a in zip(per_task, arrays):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"bootstrap: task {name!r} has no per-example scores (shape {a.shape})")
    return arrays


def bootstrap(per_task: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL,
              seed: int = SEED) -> Interval:
    """Interval of the mean over tasks of the task means; per_task[t] holds task t's per-example scores (n_t,)."""
    rng = np.random.default_rng(seed)
    arrays = _arrays(per_task)
    means = np.zeros(resamples)
    for a in arrays:
        means += a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    means /= len(arrays)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    estimate = float(np.mean([a.mean() for a in arrays]))
    return Interval(estimate, float(low), float(high), level)


def paired(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], resamples: int = RESAMPLES,
           level: float = LEVEL, seed: int = SEED) -> Interval:
    """Interval of A - B over the same examples (tasks and example order must match)."""
    if list(a) != list(b):
        raise ValueError(f"paired bootstrap: tasks differ: {list(a)} vs {list(b)}")
    diffs = {}
    for task in a:
        x, y = np.asarray(a[task], dtype=np.float64), np.asarray(b[task], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired bootstrap: task {task!r} has {x.size} vs {y.size} examples")
        diffs[task] = x - y
    return bootstrap(diffs, resamples, level, seed)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], resamples: int = RESAMPLES,
                    level: float = LEVEL, seed: int = SEED) -> Interval:
    """Interval of sum(numerators) / sum(denominators) over examples (e.g. correctly routed tokens over
    tokens, one pair per prompt), resampling the examples."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0 or den.sum() <= 0:
        raise ValueError(f"bootstrap_ratio: need matching non-empty 1-D arrays with a positive total, got {num.shape}, {den.shape}")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(resamples, num.size))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), np.finfo(np.float64).tiny)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return Interval(float(num.sum() / den.sum()), float(low), float(high), level)
