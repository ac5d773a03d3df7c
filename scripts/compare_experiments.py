"""Compare MeteoRA runs of a sweep on the same test examples: each run's Table 1 score with its 95%
bootstrap interval, and the paired interval of its difference to a reference run (same prompts: the
baselines and test splits of a sweep are shared, checked here by task and example count).

A run is `LABEL=REV[:METHOD]`: REV a git revision holding reports/eval/results.json (a DVC experiment's
commit from `dvc exp list -A --sha-only`, `HEAD`, or `workspace` for the file on disk), METHOD a Table 1 row (default
`meteora_top2`). The first run is the reference. Writes OUT.md and OUT.json:

    .venv/bin/python scripts/compare_experiments.py --out reports/eval/topk_sweep \\
        k=2=HEAD:meteora_top2 k=1=<exp commit>:meteora_top1 k=3=<exp commit>:meteora_top3
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from stages.stats import bootstrap, paired

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "reports/eval/results.json"


def load_results(rev: str) -> dict:
    """reports/eval/results.json at git revision ``rev`` (``workspace``: the file on disk)."""
    if rev == "workspace":
        return json.loads((ROOT / RESULTS).read_text())
    shown = subprocess.run(["git", "show", f"{rev}:{RESULTS}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"compare_experiments: no {RESULTS} at revision {rev!r}: {shown.stderr.strip()}")
    return json.loads(shown.stdout)


def per_example(results: dict, method: str, rev: str) -> dict[str, list[float]]:
    """Per task, the method's per-example primary scores (task order as written)."""
    if method not in results["per_task"]:
        raise SystemExit(f"compare_experiments: {rev!r} has no method {method!r}; it has {sorted(results['per_task'])}")
    return {task: row["per_example"] for task, row in results["per_task"][method].items()}


def parse_run(spec: str) -> tuple[str, str, str]:
    label, sep, rest = spec.rpartition("=")
    if not sep or not label:
        raise SystemExit(f"compare_experiments: {spec!r} is not LABEL=REV[:METHOD]")
    rev, _, method = rest.partition(":")
    return label, rev, method or "meteora_top2"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=REV[:METHOD]; the first is the reference")
    parser.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, rev, method = parse_run(spec)
        results = load_results(rev)
        runs.append({"label": label, "rev": rev, "method": method, "scores": per_example(results, method, rev),
                     "routing": results["routing"]["overall"]})
    reference = runs[0]
    rows = []
    for run in runs:
        row = {"label": run["label"], "rev": run["rev"], "method": run["method"], "routing": run["routing"],
               "score": bootstrap(run["scores"]).to_dict()}
        if run is not reference:
            row["minus_reference"] = paired(run["scores"], reference["scores"]).to_dict()
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"reference": reference["label"], "rows": rows}, indent=2) + "\n")
    lines = [f"Table 1 average per run (95% bootstrap interval over the test examples) and the paired interval of "
             f"its difference to `{reference['label']}` (same examples).", "",
             "| run | revision | method | average [95% CI] | minus reference [95% CI] | holds | routing top-1 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        s = row["score"]
        diff = row.get("minus_reference")
        d_text = f"{diff['estimate']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]" if diff else "-"
        holds = ("yes" if diff["low"] > 0 or diff["high"] < 0 else "no") if diff else "-"
        routing = f"{100 * row['routing']:.1f}%"
        lines.append(f"| {row['label']} | `{row['rev']}` | {row['method']} | {s['estimate']:.2f} [{s['low']:.2f}, "
                     f"{s['high']:.2f}] | {d_text} | {holds} | {routing} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
