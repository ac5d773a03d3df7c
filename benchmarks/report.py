"""A results mapping as Markdown tables (medians with their ratios side by side) and as flat metrics."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(ci: list[float] | None, digits: int = 3) -> str:
    return f" [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else ""


def _cell(row: dict | None, key: str, ratios: tuple[str, ...]) -> str:
    if row is None:
        return "-"
    if row.get(key) is None:
        return "error" if row.get("error") or row.get("graph_error") else "-"
    parts = [f"{_fmt(row.get(r), 2)}x{_interval(row.get(f'{r}_ci'), 2)}" for r in ratios if row.get(r) is not None]
    return _fmt(row[key]) + (f" ({', '.join(parts)})" if parts else "")


def layer_tables(cells: list[dict]) -> list[str]:
    lines: list[str] = []
    strategies = list(dict.fromkeys(c["strategy"] for c in cells))
    groups = list(dict.fromkeys((c["model"], c["dtype"], c["routing"]) for c in cells))
    for group in groups:
        mine = [c for c in cells if (c["model"], c["dtype"], c["routing"]) == group]
        for key, suffix, label in (("ms", "", "eager"), ("ms_graph", "_graph", "replayed from a CUDA graph")):
            if not any(c.get(key) is not None for c in mine):
                continue
            lines += [
                f"### Layer: {group[0]}, {group[1]}, {group[2]} routing, {label}",
                "",
                "ms per decoder layer (x single LoRA in torch, x PEFT LoRA; eager: median of the per-round ratios "
                "[95% bootstrap interval over rounds])",
                "",
                "| tokens | " + " | ".join(strategies) + " |",
                "|---:|" + "---:|" * len(strategies),
            ]
            for tokens in dict.fromkeys(c["tokens"] for c in mine):
                row = {c["strategy"]: c for c in mine if c["tokens"] == tokens}
                lines.append(
                    f"| {tokens} | "
                    + " | ".join(
                        _cell(
                            row.get(s), key, () if s in ("base", "single") else (f"x_single{suffix}", f"x_peft{suffix}")
                        )
                        for s in strategies
                    )
                    + " |"
                )
            lines.append("")
    errors = [c for c in cells if c.get("error") or c.get("graph_error")]
    if errors:
        lines += [
            "Errors: "
            + "; ".join(
                f"{c['strategy']} T={c['tokens']} {c['routing']}: {c.get('error') or c.get('graph_error')}"
                for c in errors[:8]
            ),
            "",
        ]
    worst = [c for c in cells if c.get("err") is not None and c.get("ms") is not None]
    if worst:
        lines += [
            "Largest relative error against float64 per strategy: "
            + ", ".join(
                f"{s} {max(c['err'] for c in worst if c['strategy'] == s):.1e}"
                for s in dict.fromkeys(c["strategy"] for c in worst)
            ),
            "",
        ]
    return lines


def model_tables(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        lines += [
            f"### Whole model, {mode}",
            "",
            "prefill: ms per forward; decode: ms per generated token (x bare, x PEFT one LoRA)",
            "",
            "| phase | batch | " + " | ".join(systems) + " |",
            "|---|---:|" + "---:|" * len(systems),
        ]
        for phase, batch in dict.fromkeys((r["phase"], r["batch"]) for r in mine):
            row = {r["system"]: r for r in mine if (r["phase"], r["batch"]) == (phase, batch)}
            lines.append(
                f"| {phase} | {batch} | "
                + " | ".join(_cell(row.get(s), "ms", ("x_bare", "x_peft_lora")) for s in systems)
                + " |"
            )
        lines.append("")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += [
            "Errors: "
            + "; ".join(f"{r['system']} {r['phase']} b={r['batch']} {r['mode']}: {r['error']}" for r in errors),
            "",
        ]
    return lines


def train_table(rows: list[dict]) -> list[str]:
    lines = [
        "### Training step (whole model, forward + backward + AdamW)",
        "",
        "| system | tokens | ms | x PEFT LoRA (median per-round ratio [95% interval]) | peak extra MiB | error |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['tokens']} | {_fmt(r['ms'])} | {_fmt(r.get('x_peft_lora'), 2)}{_interval(r.get('x_peft_lora_ci'), 2)} | "
            f"{_fmt(r.get('peak_extra_mb'), 0)} | {(r.get('error') or '')[:200]} |"
        )
    return lines + [""]


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark: {meta['device_name']} ({meta['date']})",
        "",
        f"Profile `{meta['profile']}`; torch {meta['torch']}, triton {meta['triton']}, transformers "
        f"{meta['transformers']}, peft {meta['peft']}; {meta['num_adapters']} adapters, r={meta['rank']}, "
        f"top-{meta['top_k']}; {meta.get('seconds', '?')} s. Medians; ratios in brackets.",
        "",
    ]
    if results.get("layer"):
        lines += ["## Decoder layer (7 projections with their base GEMMs)", ""] + layer_tables(results["layer"])
    if results.get("model"):
        lines += ["## Whole model", ""] + model_tables(results["model"])
    if results.get("train"):
        lines += ["## Training", ""] + train_table(results["train"])
    if results.get("targets"):
        lines += [
            "## Targets",
            "",
            "| target | section | where | metric | worst | limit | met |",
            "|---|---|---|---|---:|---:|---|",
        ]
        for name, t in results["targets"].items():
            where = ", ".join(f"{k}={v}" for k, v in t["where"].items())
            lines.append(
                f"| {name} | {t['section']} | {where} | {t['metric']} | {_fmt(t['worst'])}{_interval(t.get('worst_ci'))} | "
                f"{t['limit']} | {t['met']} |"
            )
    return "\n".join(lines) + "\n"


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat metrics (MLflow): every time and ratio, and each target's worst case and whether it is met."""
    flat: dict[str, float] = {}

    def put(name: str, row: dict, keys: tuple[str, ...]) -> None:
        flat.update({f"{name}.{k}": row[k] for k in keys if isinstance(row.get(k), (int, float))})

    for c in results.get("layer", []):
        put(
            f"layer.{c['model']}.{c['dtype']}.{c['routing']}.T{c['tokens']}.{c['strategy']}",
            c,
            ("ms", "x_single", "x_peft", "ms_graph", "x_single_graph", "x_peft_graph", "err"),
        )
    for r in results.get("model", []):
        put(f"model.{r['system']}.{r['phase']}.b{r['batch']}.{r['mode']}", r, ("ms", "x_bare", "x_peft_lora"))
    for r in results.get("train", []):
        put(f"train.{r['system']}.T{r['tokens']}", r, ("ms", "x_peft_lora", "peak_extra_mb"))
    for name, t in results.get("targets", {}).items():
        if t["worst"] is not None:
            flat[f"target.{name}.worst"] = t["worst"]
            flat[f"target.{name}.met"] = float(bool(t["met"]))
    return flat
