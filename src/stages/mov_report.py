"""The MoV / MoLoRA experiment's table and figures, from reports/mov/results.json (stage mov).

* reports/tables/mov_table1.md: the paper's Table 1 layout (held-out average, % parameters updated),
  with the paper's T5-3B numbers beside ours where the paper reports them.
* reports/figures/mov_experts.png: held-out score vs number of experts (MoV and MoLoRA, soft routing).
* reports/figures/mov_routing.png: soft vs top-1 vs top-2, token vs sentence routing.
* reports/figures/mov_specialisation.png: average routing probability of each expert per task in one
  module of the last block (the paper's Figure 5).
* reports/figures/mov_blocks.png: average routing probability of each expert per decoder block.

Other result files in reports/mov/ (e.g. `h100_bigbench22.json`, a GPU run) get the same outputs with
their name as suffix. Called by the report stage (:func:`write_all`) or by hand: `python -m stages.mov_report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stages.common import load_config, read_json
from stages.figures import markdown_table

# Zadouri et al. 2023, T5-3B, average median accuracy over the 8 held-out tasks (as the mission quotes them).
PAPER_T5_3B = {"full fine-tuning": 60.06, "(IA)3": 52.90, "MoV-10": 59.93, "MoV-30": 60.61,
               "MoV-10 top-2": 57.45, "MoV-10 top-1": 54.92}


def _routed(entry: Mapping) -> bool:
    return entry.get("config") is not None and entry["config"]["num_experts"] > 1


def _variant(entry: Mapping) -> tuple[str, int, str, str]:
    """(kind, experts, routing, router input) of a trained method."""
    c = entry["config"]
    return c["kind"], c["num_experts"], c["routing"], c["router_input"]


def _ci(ci: Mapping | None) -> str | None:
    return None if not ci else f"{ci['estimate']:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]"


def table1(results: Mapping) -> str:
    heldout = results["heldout_tasks"]
    headers = ["method", "% params updated", "trainable params", "held-out average [95% CI]", *heldout,
               "held-out tasks answered by one constant choice", "training tasks (test) average", "paper T5-3B held-out"]
    rows = []
    for e in results["methods"]:
        shares = [(e["heldout"].get(t) or {}).get("top_prediction_share") for t in heldout]
        constant = None if None in shares else f"{sum(v >= 100.0 for v in shares)} / {len(shares)}"
        rows.append([e["label"], e["percent"], e["trainable"], _ci(e.get("heldout_interval")) or e["heldout_average"],
                     *[(e["heldout"].get(t) or {}).get("score") for t in heldout], constant, e["train_average"],
                     PAPER_T5_3B.get(e["label"])])
    base = results.get("heldout_baselines", {})
    names = {"chance": "uniform guess", "majority": "constant majority label",
             "majority_position": "constant most frequent gold position"}
    for name, text in names.items():
        if base:
            values = [base.get(t, {}).get(name) for t in heldout]
            mean = sum(values) / len(values) if None not in values else None
            rows.append([f"({text})", None, None, mean, *values, None, None, None])
    train, ev = results["train"], results["eval"]
    splits = "+".join(ev.get("heldout_splits", ["test"]))
    sizes = ", ".join(f"{t} {(results['methods'][0]['heldout'].get(t) or {}).get('n', '?')}" for t in heldout) \
        if results["methods"] else ""
    note = (
        f"**MoV / MoLoRA, Table 1 layout.** {results['model']}, trained on {len(results['train_tasks'])} tasks "
        f"({', '.join(results['train_tasks'])}) for {train['steps']} steps of {train['batch_size']} sequences of "
        f"<= {train['max_length']} tokens; zero-shot on the held-out tasks ({splits} splits, examples: {sizes}), "
        "rank classification over the answer choices. Scores 0-100 with the 95% percentile-bootstrap interval "
        "over examples; the last rows are what a uniform guess, a constant label (label-set tasks only) and "
        "a constant answer position score. The paper column is T5-3B after 500K steps (average median accuracy "
        "over 8 held-out T0 tasks): a reference for the ordering, not a comparable number.\n\n"
    )
    return note + markdown_table(headers, rows) + "\n\n" + comparisons_table(results) + "\n\n" + routing_table(results)


def comparisons_table(results: Mapping) -> str:
    """Paired differences of the held-out average (same examples), with their 95% intervals."""
    rows = [[c["label"], c["estimate"], c["low"], c["high"], "yes" if c["excludes_zero"] else "no"]
            for c in results.get("comparisons", [])]
    head = "**Paired differences, held-out average (A - B, points; 95% paired bootstrap over the same examples).**\n\n"
    return head + markdown_table(["A - B", "difference", "low", "high", "interval excludes 0"], rows)


def routing_table(results: Mapping) -> str:
    """Per routed method: router entropy (normalised by log E) in the first, middle and last blocks, and
    the largest expert load of the last block (1/E = balanced, 1 = collapsed)."""
    rows = []
    for e in results["methods"]:
        block = (e.get("routing") or {}).get("per_block")
        if not block or not block["load"]:
            continue
        experts = len(block["load"][0])
        norm = [h / np.log(experts) for h in block["entropy"]]
        picks = sorted({0, len(norm) // 2, len(norm) - 1})
        rows.append([e["label"], experts, *[norm[i] for i in picks][:3], max(block["load"][-1]), max(block["top1"][-1]),
                     e.get("router_aux_loss_last")])
    head = ("**Routing, all eval tokens.** Router entropy / log E in the first, middle and last decoder blocks "
            "(1 = uniform, 0 = one expert per token); the last block's largest mean expert probability and "
            "largest share of tokens whose best expert it is (1/E = balanced load, 1 = collapse); the summed "
            "auxiliary router loss of the last training step.\n\n")
    return head + markdown_table(["method", "experts", "entropy first", "entropy middle", "entropy last",
                                  "max load last", "max top-1 share last", "router aux loss"], rows)


def experts_figure(results: Mapping, path: Path) -> None:
    """Held-out average vs experts (1 = the plain method), one line per expert kind, soft token routing
    with the default router (the router-collapse variants are left out: they are not another expert count)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, name in (("ia3", "MoV ((IA)3 experts)"), ("lora", "MoLoRA (LoRA experts)")):
        points = sorted(
            (e["config"]["num_experts"], e["heldout_average"]) for e in results["methods"]
            if e.get("config") and e["config"]["kind"] == kind and e["config"]["routing"] == "soft"
            and e["config"]["router_input"] == "token" and e["heldout_average"] is not None
            and e["config"].get("router_init_scale", 1.0) == 1.0 and not e["config"].get("router_z_loss")
            and not e["config"].get("router_balance")
        )
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    base = [e["heldout_average"] for e in results["methods"] if e.get("config") is None]
    if base and base[0] is not None:
        ax.axhline(base[0], color="grey", linestyle="--", label="base, zero-shot")
    chance = [b["chance"] for b in results.get("heldout_baselines", {}).values()]
    if chance and len(chance) == len(results["heldout_tasks"]):
        ax.axhline(sum(chance) / len(chance), color="grey", linestyle=":", label="uniform guess")
    experts = sorted({e["config"]["num_experts"] for e in results["methods"] if e.get("config")})
    ax.set_xscale("log")
    ax.set_xticks(experts or [1])
    ax.set_xticklabels([str(x) for x in experts or [1]])
    ax.minorticks_off()
    ax.set_xlabel("experts per module (1 = (IA)3 / LoRA)")
    ax.set_ylabel("held-out average score")
    ax.set_title("Number of experts vs held-out score", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def routing_figure(results: Mapping, path: Path) -> None:
    """Held-out average of each routing variant (soft / top-1 / top-2, token / sentence) per expert kind."""
    variants = [e for e in results["methods"] if _routed(e) and e["heldout_average"] is not None]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.8 * len(variants) + 2), 4))
    if variants:
        order = {"soft": 0, "top1": 1, "top2": 2}
        variants.sort(key=lambda e: (_variant(e)[0], _variant(e)[1], _variant(e)[3] != "token",
                                     order.get(_variant(e)[2], 3)))
        colours = {"soft": "tab:blue", "top1": "tab:orange", "top2": "tab:green"}
        bars = ax.bar(range(len(variants)), [e["heldout_average"] for e in variants],
                      color=[colours.get(_variant(e)[2], "tab:purple") for e in variants], edgecolor="black")
        for bar, e in zip(bars, variants):
            if _variant(e)[3] == "sentence":
                bar.set_hatch("//")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([e["label"] for e in variants], rotation=30, ha="right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no routed method in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("held-out average score")
    ax.set_title("Routing: soft vs top-k (colour), token vs sentence (hatched)", fontsize=10)
    _save(fig, path)


def specialisation_figure(results: Mapping, path: Path, max_panels: int = 4) -> None:
    """Average routing probability per (task, expert) in the recorded module, one panel per routed method."""
    routed = [e for e in results["methods"] if (e.get("routing") or {}).get("per_task")][:max_panels]
    tasks = list(results["train_tasks"]) + list(results["heldout_tasks"])
    widths = [max(2.0, 0.45 * len(e["routing"]["per_task"][next(iter(e["routing"]["per_task"]))])) for e in routed]
    fig, axes = plt.subplots(1, max(len(routed), 1), figsize=(sum(widths) + 3.5 * max(len(routed), 1), 0.3 * len(tasks) + 1.8),
                             squeeze=False, gridspec_kw={"width_ratios": widths or [1]})
    for ax, e in zip(axes[0], routed):
        per_task = e["routing"]["per_task"]
        rows = [t for t in tasks if t in per_task]
        grid = np.asarray([per_task[t] for t in rows])
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(grid.max(), 1e-9), aspect="auto")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xticklabels([str(i) for i in range(grid.shape[1])], fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{t}{' (held-out)' if t in results['heldout_tasks'] else ''}" for t in rows], fontsize=7)
        if grid.shape[1] <= 5:
            for (i, j), value in np.ndenumerate(grid):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * grid.max() else "black")
        ax.set_xlabel("expert")
        ax.set_title(f"{e['label']}\n{e['routing']['module']}", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.05)
    if not routed:
        axes[0][0].text(0.5, 0.5, "no routed method in this run", ha="center", va="center")
        axes[0][0].set_axis_off()
    _save(fig, path)


def blocks_figure(results: Mapping, path: Path, max_panels: int = 6) -> None:
    """Mean routing probability of each expert per decoder block (all eval tokens), one panel per routed method."""
    routed = [e for e in results["methods"] if (e.get("routing") or {}).get("per_block", {}).get("load")][:max_panels]
    fig, axes = plt.subplots(1, max(len(routed), 1), figsize=(2.6 * max(len(routed), 1) + 1, 4.5), squeeze=False)
    for ax, e in zip(axes[0], routed):
        grid = np.asarray(e["routing"]["per_block"]["load"])
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("decoder block")
        ax.set_title(e["label"], fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.05)
    if not routed:
        axes[0][0].text(0.5, 0.5, "no routed method in this run", ha="center", va="center")
        axes[0][0].set_axis_off()
    _save(fig, path)


def write_mov_report(results: Mapping, tables_dir: Path, figures_dir: Path, tag: str = "") -> list[Path]:
    """Write the table and the four figures (names suffixed with `_tag` if given); returns their paths."""
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    table = tables_dir / f"mov_table1{suffix}.md"
    table.write_text(table1(results), encoding="utf-8")
    figures = [figures_dir / f"mov_{name}{suffix}.png" for name in ("experts", "routing", "specialisation", "blocks")]
    experts_figure(results, figures[0])
    routing_figure(results, figures[1])
    specialisation_figure(results, figures[2])
    blocks_figure(results, figures[3])
    return [table, *figures]


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(reports: Path) -> list[Path]:
    """reports/mov/results.json -> untagged outputs; every other reports/mov/<tag>.json (e.g. a GPU
    run committed by hand) -> outputs tagged <tag>. metrics.json is skipped."""
    written = []
    for path in sorted((Path(reports) / "mov").glob("*.json")):
        if path.name != "metrics.json":
            tag = "" if path.name == "results.json" else path.stem
            written += write_mov_report(read_json(path), Path(reports) / "tables", Path(reports) / "figures", tag)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    for path in write_all(Path(cfg.paths.reports)):
        print(f"mov_report: wrote {path}")


if __name__ == "__main__":
    main()
