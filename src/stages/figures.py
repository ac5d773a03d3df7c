"""The paper's figures (radar, routing trace, forward-strategy run time) and Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats are printed with 2 decimals, None as an em dash."""

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "—"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def radar(scores: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: Path, title: str) -> None:
    """Figure 3: one polygon per method over the tasks' primary scores (0-100)."""
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(8, 8), subplot_kw={"polar": True})
    for method, per_task in scores.items():
        values = [per_task.get(t, float("nan")) for t in tasks]
        ax.plot(angles + angles[:1], values + values[:1], linewidth=1.5, label=method)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.05)
    ax.set_xticks(angles)
    ax.set_xticklabels([t.replace("_", "\n") for t in tasks], fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    _save(fig, path)


def routing_trace(trace: Mapping, path: Path) -> None:
    """Figure 4: token position (x) vs adapter (y), colour = share of MeteoRA modules whose top-1
    is that adapter; dots mark the majority adapter, dashed lines the segment boundaries (labelled with
    the segment's task), dotted lines where each answer starts.

    trace: {"adapters": [N names], "share": T x N list, "top1": [T ints], "boundaries":
    [{"position": int, "task": str}], "answer_spans": [[start, end]] (optional), "title": str}
    """
    share = np.asarray(trace["share"], dtype=float).T  # (N, T)
    adapters = trace["adapters"]
    fig, ax = plt.subplots(figsize=(min(24, max(8, share.shape[1] / 8)), 1.2 + 0.35 * len(adapters)))
    image = ax.imshow(share, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, pad=0.01, label="share of modules (top-1)")
    ax.scatter(range(share.shape[1]), trace["top1"], s=4, c="crimson", label="majority top-1")
    for b in trace["boundaries"]:
        ax.axvline(b["position"] - 0.5, color="black", linestyle="--", linewidth=1)
        ax.text(b["position"], -0.7, b["task"], fontsize=7, rotation=20, ha="left", va="bottom")
    for start, _ in trace.get("answer_spans", []):
        ax.axvline(start - 0.5, color="darkorange", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(adapters)))
    ax.set_yticklabels(adapters, fontsize=7)
    ax.set_xlabel("token position" + (" (dotted: the model's answer starts)" if trace.get("answer_spans") else " in the answer"))
    ax.set_title(trace.get("title", "routing trace"), pad=28)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    _save(fig, path)


def routing_confusion(confusion: Mapping, path: Path, title: str) -> None:
    """Task (row) by adapter (column): the share of the task's prompt tokens whose top-1 adapter is each
    adapter (rows sum to 1; the diagonal is the routing accuracy per task), the value written in each cell.

    confusion: {"tasks": [T names], "adapters": [N names], "shares": T x N list}
    """
    shares = np.asarray(confusion["shares"], dtype=float)
    tasks, adapters = confusion["tasks"], confusion["adapters"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(adapters), 1.2 + 0.45 * len(tasks)))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, pad=0.01, label="share of the task's prompt tokens (top-1)")
    for (i, j), value in np.ndenumerate(shares):
        ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                color="white" if value > 0.5 else "black")
    ax.set_xticks(range(len(adapters)))
    ax.set_xticklabels(adapters, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=7)
    ax.set_xlabel("top-1 adapter")
    ax.set_ylabel("prompt's task")
    ax.set_title(title)
    _save(fig, path)


def strategy_runtime(series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: Path) -> None:
    """Figure 5: one panel per benchmark (file, shapes, dtype); x = tokens, y = ms per decoder layer
    (both log), one line per forward strategy. series: {panel title: {strategy: [(tokens, ms), ...]}}."""
    panels = list(series)
    cols = min(max(len(panels), 1), 3)
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for strategy, points in series[panel].items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per decoder layer (7 projections)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no benchmark JSON with layer timings", ha="center", va="center")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
