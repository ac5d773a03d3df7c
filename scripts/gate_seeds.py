"""Run-to-run variation of MeteoRA: retrain the gates with other seeds and evaluate each, beside the
pipeline's own run (same adapters, LoRA-B, baselines and test prompts; only the gates' seed differs).

Each seed runs `python -m stages.train_gates seed=S ...` and `python -m stages.evaluate seed=S ...` in
its own workspace (artifacts/seeds/S with links to the pipeline's model and adapters,
reports/seeds/S with a copy of the baselines), then the spread over all seeds (the pipeline's included)
is written to reports/eval/seeds.{json,md}. Run after `dvc repro` (about 12 minutes a seed on the
2-core CPU box):

    .venv/bin/python scripts/gate_seeds.py 1 2 [override ...]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from workspace import ROOT, side_workspace

LINKED = ("model", "adapters", "lora_b")


def workspace(seed: int) -> tuple[Path, Path]:
    artifacts, reports = side_workspace("seeds", str(seed), LINKED)
    (reports / "eval").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "reports" / "eval" / "baselines.json", reports / "eval" / "baselines.json")
    return artifacts, reports


def run_seed(seed: int, overrides: list[str]) -> Path:
    artifacts, reports = workspace(seed)
    settings = [f"seed={seed}", f"paths.artifacts={artifacts}", f"paths.reports={reports}", *overrides]
    for stage in ("train_gates", "evaluate"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}", *settings], cwd=ROOT, check=True)
    return reports / "eval" / "summary.json"


def headline(summary: dict) -> dict[str, float]:
    """The numbers whose spread is reported: MeteoRA's Table 1 rows, routing, chained averages."""
    out = {f"table1.{m}": v for m, v in summary["table1"].items() if m.startswith("meteora_top")}
    out["routing_accuracy"] = 100 * summary.get("routing_accuracy", float("nan"))
    out |= {f"chained.{n}.meteora": v["meteora"] for n, v in summary.get("chained", {}).items() if "meteora" in v}
    return out


def spread(per_seed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted(set.intersection(*(set(v) for v in per_seed.values())))
    out = {}
    for key in keys:
        values = [v[key] for v in per_seed.values()]
        out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    return out


def main(argv: list[str]) -> None:
    seeds = [int(a) for a in argv if a.lstrip("-").isdigit()]
    overrides = [a for a in argv if not a.lstrip("-").isdigit()]
    pipeline_seed = int(yaml.safe_load((ROOT / "params.yaml").read_text())["seed"])
    summaries = {pipeline_seed: ROOT / "reports" / "eval" / "summary.json"}
    summaries |= {seed: run_seed(seed, overrides) for seed in seeds}
    per_seed = {str(s): headline(json.loads(p.read_text())) for s, p in summaries.items()}
    result = {"seeds": list(per_seed), "per_seed": per_seed, "spread": spread(per_seed),
              "command": "python scripts/gate_seeds.py " + " ".join(argv)}
    (ROOT / "reports" / "eval" / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {' | '.join(f'{per_seed[s][k]:.2f}' for s in per_seed)} | {v['mean']:.2f} | {v['sd']:.2f} |"
                     for k, v in result["spread"].items())
    header = f"| number | {' | '.join(f'seed {s}' for s in per_seed)} | mean | sd |\n|---|{'---:|' * (len(per_seed) + 2)}"
    (ROOT / "reports" / "eval" / "seeds.md").write_text(
        f"**Gate seeds.** MeteoRA retrained with {len(per_seed)} seeds on the same adapters and test prompts "
        f"(`{result['command']}`).\n\n{header}\n{rows}\n")
    print(f"wrote {ROOT / 'reports' / 'eval' / 'seeds.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
