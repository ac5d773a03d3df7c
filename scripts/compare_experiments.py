"""Compare MeteoRA runs of a sweep on the same test examples: each run's Table 1 score with its 95%
bootstrap interval, and the paired interval of its difference to a reference run (same prompts: the
baselines and test splits of a sweep are shared, checked here by task and example count).

A run is `LABEL=REV[:METHOD]`: REV a git revision holding reports/eval/results.json (a DVC experiment's
commit from `dvc exp list -A --sha-only`, `HEAD`, or `workspace` for the file on disk), METHOD a Table 1 row (default
`meteora_top2`). The first run is the reference; a run scored on other tasks than the reference (an
adapter-count sweep) gets no difference to it. `--within oracle lora_b` adds, per run, the paired
interval of the run's method minus those methods of the same run (same examples). Writes OUT.md and OUT.json:

    .venv/bin/python scripts/compare_experiments.py --out reports/eval/topk_sweep \\
        k=2=HEAD:meteora_top2 k=1=<exp commit>:meteora_top1 k=3=<exp commit>:meteora_top3
    .venv/bin/python scripts/compare_experiments.py --out reports/eval/adapters_sweep \\
        n=10=HEAD n=2=<exp commit> n=4=<exp commit> --within oracle lora_b
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
    parser.add_argument("--within", nargs="*", default=[], help="methods of each run to pair the run's method with")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, rev, method = parse_run(spec)
        results = load_results(rev)
        runs.append({"label": label, "rev": rev, "method": method, "scores": per_example(results, method, rev),
                     "within": {m: per_example(results, m, rev) for m in args.within},
                     "routing": results["routing"]["overall"]})
    reference = runs[0]
    rows = []
    for run in runs:
        row = {"label": run["label"], "rev": run["rev"], "method": run["method"], "routing": run["routing"],
               "score": bootstrap(run["scores"]).to_dict()}
        same_examples = ({t: len(v) for t, v in run["scores"].items()}
                         == {t: len(v) for t, v in reference["scores"].items()})
        if run is not reference and same_examples:
            row["minus_reference"] = paired(run["scores"], reference["scores"]).to_dict()
        row["tasks"] = len(run["scores"])
        row["within"] = {m: {"score": bootstrap(scores).to_dict(), "minus": paired(run["scores"], scores).to_dict()}
                         for m, scores in run["within"].items()}
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"reference": reference["label"], "rows": rows}, indent=2) + "\n")

    def text(ci: dict, sign: str = "") -> str:
        return f"{ci['estimate']:{sign}.2f} [{ci['low']:{sign}.2f}, {ci['high']:{sign}.2f}]"

    within_heads = "".join(f" {m} [95% CI] | minus {m} [paired 95% CI] |" for m in args.within)
    lines = [f"Table 1 average per run (95% bootstrap interval over the test examples) and the paired interval of "
             f"its difference to `{reference['label']}` (same examples; '-' where the run scored other tasks)"
             + (f", and to {', '.join(args.within)} of the same run" if args.within else "") + ".", "",
             f"| run | revision | method | tasks | average [95% CI] | minus reference [95% CI] | holds |{within_heads} routing top-1 |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(args.within) + "---:|"]
    for row in rows:
        diff = row.get("minus_reference")
        holds = ("yes" if diff["low"] > 0 or diff["high"] < 0 else "no") if diff else "-"
        within = "".join(f" {text(w['score'])} | {text(w['minus'], '+')} |" for w in row["within"].values())
        lines.append(f"| {row['label']} | `{row['rev']}` | {row['method']} | {row['tasks']} | {text(row['score'])} | "
                     f"{text(diff, '+') if diff else '-'} | {holds} |{within} {100 * row['routing']:.1f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
