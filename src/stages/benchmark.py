"""Stage benchmark: time the mixture-of-LoRA forward strategies (issue 5, the paper's Figure 5).

A thin wrapper around :mod:`meteora.benchmark` (which needs no Hydra, DVC or MLflow, so the same timing
code runs on the GPU machine: scripts/gpu_benchmark.sh). The Hydra group `benchmark` picks the profile:
`cpu` (default; the CPU strategies at the base model's own shapes), `tiny` (CI), `gpu` (LLaMA shapes).
Writes reports/benchmark/<benchmark.report> and logs every timing, ratio and target to MLflow.
Run: `python -m stages.benchmark [benchmark=tiny benchmark.layer.tokens=[1,16] ...]`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from omegaconf import OmegaConf

from meteora.benchmark import BenchConfig, run, to_markdown
from stages.common import load_config, seed_everything, start_run, write_json


def metrics(results: dict) -> dict[str, float]:
    """Flat MLflow metrics: every layer/train/model time and ratio, and each target's worst case."""
    flat: dict[str, float] = {}
    for cell in results.get("layer", []):
        name = f"layer.{cell['model']}.{cell['dtype']}.{cell['routing']}.T{cell['tokens']}.{cell['strategy']}"
        for key in ("ms", "x_single", "ms_graph", "x_single_graph", "err"):
            if cell.get(key) is not None:
                flat[f"{name}.{key}"] = cell[key]
    for row in results.get("train", []):
        for key in ("ms", "x_single", "ms_graph", "x_single_graph"):
            if row.get(key) is not None:
                flat[f"train.{row['strategy']}.{key}"] = row[key]
    for row in results.get("model", []):
        name = f"model.{row['system']}.{row['phase']}.b{row['batch']}.{'graphs' if row['graphs'] else 'eager'}"
        for key in ("ms", "x_bare"):
            if row.get(key) is not None:
                flat[f"{name}.{key}"] = row[key]
    for name, target in results.get("targets", {}).items():
        if target["worst"] is not None:
            flat[f"target.{name}.worst"] = target["worst"]
            flat[f"target.{name}.met"] = float(bool(target["met"]))
    return flat


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(argv)
    seed_everything(int(cfg.seed))
    settings = OmegaConf.to_container(cfg.benchmark, resolve=True)
    bench = BenchConfig.from_dict({**settings, "seed": int(cfg.seed)})
    out = Path(cfg.paths.reports) / "benchmark" / (bench.report or f"{bench.profile}.json")
    with start_run(cfg, "benchmark", params={"benchmark": settings}):
        results = run(bench, log=lambda line: print(line, flush=True), save=lambda partial: write_json(out, partial))
        write_json(out, results)
        mlflow.log_metrics(metrics(results))
        mlflow.log_text(to_markdown(results), "benchmark/summary.md")
        mlflow.log_artifact(str(out))
        mlflow.set_tag("outputs", str(out))
    print(to_markdown(results))
    return out


if __name__ == "__main__":
    main()
