"""The thresholds of the config (``targets:``), each checked against the results: the worst (largest)
``metric`` over the rows of ``section`` that match ``where``, against ``limit``."""

from __future__ import annotations

from typing import Any

from .config import Target


def check(target: Target, results: dict[str, Any]) -> dict[str, Any]:
    """{"worst", "limit", "met", "rows"}: met is None when no matching row has the metric."""
    rows = [r for r in results.get(target.section, []) if all(r.get(k) == v for k, v in target.where.items())]
    values = [r[target.metric] for r in rows if r.get(target.metric) is not None]
    worst = max(values, default=None)
    return {
        "section": target.section,
        "metric": target.metric,
        "where": dict(target.where),
        "worst": worst,
        "limit": target.limit,
        "met": None if worst is None else worst <= target.limit,
        "rows": len(values),
    }


def summarize(targets: dict[str, Target], results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: check(target, results) for name, target in targets.items()}
