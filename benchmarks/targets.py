"""The thresholds of the config (``targets:``), each checked against the results: the worst (largest)
``metric`` over the rows of ``section`` that match ``where``, against ``limit``."""

from __future__ import annotations

from typing import Any

from .config import Target


def check(target: Target, results: dict[str, Any]) -> dict[str, Any]:
    """{"worst", "worst_ci", "limit", "met", "rows"}: met is None when no matching row has the metric."""
    rows = [r for r in results.get(target.section, []) if all(r.get(k) == v for k, v in target.where.items())]
    measured = [r for r in rows if r.get(target.metric) is not None]
    values = [r[target.metric] for r in measured]
    worst = max(values, default=None)
    worst_ci = next((r.get(f"{target.metric}_ci") for r in measured if r[target.metric] == worst), None)
    return {
        "section": target.section,
        "metric": target.metric,
        "where": dict(target.where),
        "worst": worst,
        "worst_ci": worst_ci,  # the worst row's 95% interval, where its metric has one
        "limit": target.limit,
        "met": None if worst is None else worst <= target.limit,
        "rows": len(values),
    }


def summarize(targets: dict[str, Target], results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: check(target, results) for name, target in targets.items()}
