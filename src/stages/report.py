"""Stage report: the paper's tables (Markdown) and figures (PNG) from the JSON of the earlier stages.

Reads reports/eval/{results,traces}.json, reports/train_gates.json and every reports/benchmark/*.json;
writes reports/tables/{table1,per_task,table2,chained,routing}.md, reports/figures/{fig3_radar,
fig4_routing_trace,fig4b_routing_numbered,fig5_strategies,fig6_routing_confusion}.png, reports/plots/table1.json (for `dvc plots`) and
reports/results.md (all of it on one page, with date, machine and command).
Run: `python -m stages.report`.
"""

from __future__ import annotations

import datetime
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from stages.common import load_config, read_json, write_json
from stages.figures import markdown_table, radar, routing_confusion, routing_trace, strategy_runtime
from stages.mov_report import write_all as write_mov_reports

METHOD_LABELS = {"base": "base model", "oracle": "PEFT oracle (right adapter by hand)", "lora_b": "LoRA-B"}


def label(method: str) -> str:
    if method.startswith("meteora_top"):
        return f"MeteoRA top-{method.removeprefix('meteora_top')}"
    return METHOD_LABELS.get(method, method)


def with_interval(ci: dict | None, value: float | None = None) -> str | float | None:
    """"39.30 [35.10, 43.00]" from an interval dict of :mod:`stages.stats`; the bare value without one."""
    if ci is None:
        return value
    return f"{ci['estimate']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def table1(results: dict) -> str:
    intervals = results.get("intervals", {})
    rows = [[label(m), with_interval(intervals.get("table1", {}).get(m), r["average"]), r["accuracy"], r["bleu"],
             r["rouge_l"]] for m, r in results["table1"].items()]
    n = len(results["profile"]["tasks"])
    text = (f"**Table 1.** Average over the {n} tasks (primary score: accuracy, or ROUGE-L F1 for generative "
            "tasks, with its 95% bootstrap interval over the test examples; accuracy averaged over the "
            "classification tasks, BLEU / ROUGE-L over the generative ones).\n\n"
            + markdown_table(["method", "average [95% CI]", "accuracy", "BLEU", "ROUGE-L"], rows))
    claims = intervals.get("paired", {})
    if claims:
        text += ("\nPaired differences over the same test examples (95% bootstrap interval; a claim holds "
                 "where the interval excludes 0).\n\n")
        text += markdown_table(["difference", "estimate [95% CI]", "holds"], [
            [" - ".join(label(x) for x in key.split("-")), with_interval(ci),
             "yes" if ci["low"] > 0 or ci["high"] < 0 else "no"] for key, ci in claims.items()])
    return text


def per_task_table(results: dict) -> str:
    methods = results["methods"]
    routing = (results.get("routing") or {}).get("per_task", {})
    rows = []
    for task in results["profile"]["tasks"]:
        metric = results["metric_per_task"][task]
        cis = results.get("intervals", {}).get("per_task", {})
        rows.append([task, metric, *[with_interval(cis.get(m, {}).get(task), results["per_task"][m][task]["score"])
                                     for m in methods],
                     100 * routing[task] if task in routing else None])
    return ("**Per task.** Primary score per method; routing = MeteoRA's top-1 routing accuracy (%) on the "
            "task's test set.\n\n" + markdown_table(["task", "metric", *map(label, methods), "routing"], rows))


def table2(results: dict) -> str:
    rows = []
    cis = results.get("intervals", {}).get("composite", {})
    for name, comp in results["composite"].items():
        methods = [m for m in ("meteora", "lora_b") if m in comp]
        for task in comp["tasks"]:
            rows.append([name, task, *[comp[m]["subtasks"][task]["score"] for m in methods]])
        rows.append([name, "**average [95% CI]**",
                     *[with_interval(cis.get(name, {}).get(m), comp[m]["average"]) for m in methods]])
        rows.append([name, f"attempted (of {len(comp['tasks'])})", *[comp[m]["attempted"] for m in methods]])
    return ("**Table 2.** Composite-n: n questions of n tasks in one prompt, answered as a numbered list; "
            "per sub-task score, average and mean number of sub-questions attempted.\n\n"
            + markdown_table(["set", "sub-task", "MeteoRA", "LoRA-B"], rows))


SEGMENT_GOAL = 0.8  # share of a chained segment's tokens routed to the segment's own adapter


def chained_table(results: dict) -> str:
    """Chained composite-n: per sub-task scores, averages with intervals, MeteoRA's paired differences,
    and the per-segment routing of MeteoRA against the 80% goal."""
    chained = results.get("chained") or {}
    if not chained:
        return ""
    cis = results.get("intervals", {}).get("chained", {})
    order = results["chained_methods"]  # the evaluation's order of the compared methods
    labels = {"meteora": "MeteoRA", "oracle": "oracle (segment's own adapter)", "lora_b": "LoRA-B", "base": "base model"}
    rows, claims, segments = [], [], []
    for name, chain in chained.items():
        methods = [m for m in order if m in chain]
        for task in chain["tasks"]:
            rows.append([name, task, *[chain[m]["subtasks"][task]["score"] if m in chain else None for m in order]])
        rows.append([name, "**average [95% CI]**",
                     *[with_interval(cis.get(name, {}).get(m), chain[m]["average"]) if m in chain else None
                       for m in order]])
        for other in methods[1:]:
            ci = cis.get(name, {}).get(f"meteora-{other}")
            if ci:
                claims.append([name, f"MeteoRA - {labels[other]}", with_interval(ci),
                               "yes" if ci["low"] > 0 else ("reversed" if ci["high"] < 0 else "no")])
        routing = chain.get("meteora", {}).get("segment_routing", {})
        for task in chain["tasks"]:
            seg, ans = routing.get("segment", {}).get(task), routing.get("answer", {}).get(task)
            if seg is not None:
                segments.append([name, task, 100 * seg, 100 * ans if ans is not None else None,
                                 "yes" if seg >= SEGMENT_GOAL else "no"])
    n = max(results["profile"].get("chained_samples", {}).values(), default=0)
    text = (f"**Table 2b.** Chained composite-n ({n} samples per set): the n sub-questions in ONE sequence, "
            "sub-question i appended after the model's own answer to i-1 (the whole history in the context); "
            "each sub-answer scored on its own task (Table 1's metric and budget). The average's 95% interval "
            "resamples samples.\n\n"
            + markdown_table(["set", "sub-task", *[labels[m] for m in order]], rows))
    if claims:
        text += ("\nMeteoRA's paired differences on the same samples (a claim holds where the interval "
                 "excludes 0).\n\n" + markdown_table(["set", "difference", "estimate [95% CI]", "MeteoRA better"], claims))
    if segments:
        text += (f"\nMeteoRA's routing per chained segment: share (%) of the segment's tokens (question and answer; "
                 f"answer alone) whose majority top-1 adapter is the segment's task; goal {100 * SEGMENT_GOAL:.0f}%.\n\n"
                 + markdown_table(["set", "segment task", "segment tokens (%)", "answer tokens (%)",
                                   f">= {100 * SEGMENT_GOAL:.0f}%"], segments))
    return text


def routing_table(results: dict, train: dict | None) -> str:
    routing = results.get("routing")
    if not routing:
        return ""
    ci = results.get("intervals", {}).get("routing")
    spread = f" [95% CI {100 * ci['low']:.1f}, {100 * ci['high']:.1f}]" if ci else ""
    text = (f"**Routing.** MeteoRA's overall top-1 routing accuracy on the test sets' prompt tokens: "
            f"{100 * routing['overall']:.1f}%{spread} (goal: 90%).\n\n")
    layers = routing["per_layer"]
    text += markdown_table(["decoder layer", *layers], [["test accuracy (%)", *[100 * v for v in layers.values()]]])
    segments = {n: c["meteora"].get("segment_routing_accuracy") for n, c in results["composite"].items() if "meteora" in c}
    if any(segments.values()):
        text += "\nComposite answers: share of each sub-answer's tokens whose majority top-1 adapter is that sub-task's.\n\n"
        text += markdown_table(["set", "sub-task", "accuracy (%)"],
                               [[n, t, 100 * v if v is not None else None] for n, s in segments.items() for t, v in s.items()])
    if train:
        final = train.get("final", {})
        text += (f"\nGate training: {train.get('steps_run')} steps in {train.get('time_s')} s "
                 f"({train.get('tokens_per_s')} tokens/s); final LM loss {final.get('lm_loss', float('nan')):.3f}, "
                 f"gate CE (mean over gates and tokens) {final.get('gate_loss', float('nan')):.3f}, training routing accuracy "
                 f"{100 * final.get('routing_accuracy', float('nan')):.1f}%.\n")
    return text


def benchmark_series(name: str, bench: dict, routing: str = "random") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """(tokens, ms) points per strategy from the `layer` cells of a benchmark JSON (see
    :mod:`benchmarks`): one panel per (file, model shapes, dtype), cells of the given routing."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for cell in bench.get("layer", []):
        if cell.get("routing") != routing or not isinstance(cell.get("ms"), (int, float)):
            continue
        panel = f"{name}: {cell.get('model')} {cell.get('dtype')}, {routing} routing"
        series.setdefault(panel, {}).setdefault(cell["strategy"], []).append((float(cell["tokens"]), float(cell["ms"])))
    return series


def run(cfg: DictConfig, argv: Sequence[str]) -> list[Path]:
    """Write every table and figure; returns the files written."""
    reports = Path(cfg.paths.reports)
    results = read_json(reports / "eval" / "results.json")
    traces = read_json(reports / "eval" / "traces.json") if (reports / "eval" / "traces.json").is_file() else {}
    train = read_json(reports / "train_gates.json") if (reports / "train_gates.json").is_file() else None
    tables, figures = reports / "tables", reports / "figures"
    written: list[Path] = []

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)

    sections = {"table1": table1(results), "per_task": per_task_table(results), "table2": table2(results),
                "chained": chained_table(results), "routing": routing_table(results, train)}
    for key, text in sections.items():
        write(tables / f"{key}.md", text)

    tasks = results["profile"]["tasks"]
    scores = {label(m): {t: results["per_task"][m][t]["score"] for t in tasks} for m in results["methods"]}
    radar(scores, tasks, figures / "fig3_radar.png", "Figure 3: primary score per task")
    written.append(figures / "fig3_radar.png")
    for key, trace in traces.items():  # the chained trace is Figure 4; the numbered answer's, Figure 4b
        path = figures / ("fig4b_routing_numbered.png" if key.startswith("numbered/") else "fig4_routing_trace.png")
        routing_trace(trace, path)
        written.append(path)
    series = {}
    for path in sorted((reports / "benchmark").glob("*.json")):
        found = benchmark_series(path.stem, read_json(path))
        if not found:
            print(f"report: {path} has no layer timings; left out of Figure 5")
        series.update(found)
    strategy_runtime(series, figures / "fig5_strategies.png")
    written.append(figures / "fig5_strategies.png")
    confusion = (results.get("routing") or {}).get("confusion")
    if confusion:
        k = results["profile"]["gate_top_k"]
        routing_confusion(confusion, figures / "fig6_routing_confusion.png",
                          f"Figure 6: MeteoRA top-{k} routing on the test prompts, task x top-1 adapter (%)")
        written.append(figures / "fig6_routing_confusion.png")
    write_json(reports / "plots" / "table1.json",
               [{"method": label(m), "average": r["average"]} for m, r in results["table1"].items()])
    written.append(reports / "plots" / "table1.json")
    written += write_mov_reports(reports)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, {platform.platform()}"
    command = "dvc repro" if "--params" in argv else "python -m stages.report " + " ".join(argv)
    figs = "".join(f"\n![{p.stem}](figures/{p.name})\n" for p in written if p.suffix == ".png")
    header = (f"# Results: model {results['profile']['model']}, {len(tasks)} tasks\n\n"
              f"Made {stamp} on {machine} by `{command}`.\n\n")
    write(reports / "results.md", header + "\n".join(s for s in sections.values() if s) + figs)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv)
    for path in run(cfg, argv):
        print(f"report: wrote {path}")


if __name__ == "__main__":
    main()
