"""Stage benchmark: the MeteoRA op and model against one LoRA and PEFT (see the package ``benchmarks``).

Config in (the Hydra group ``benchmark``: ``cpu``, the default; ``tiny`` for CI; ``gpu`` for the device
runs of ``benchmarks/gpu_benchmark.sh``), one library call, JSON out to ``benchmark.out``; every time, ratio
and target goes to MLflow. Run: ``python -m stages.benchmark [benchmark=tiny benchmark.layer.tokens=[1,16] ...]``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.config import from_mapping
from benchmarks.report import metrics, to_markdown
from benchmarks.run import run
from stages.common import load_config, seed_everything, stage_run, write_json


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(argv)
    seed_everything(int(cfg.seed))
    settings = OmegaConf.to_container(cfg.benchmark, resolve=True)
    bench = from_mapping({**settings, "seed": int(cfg.seed)})
    out = Path(bench.out)
    with stage_run(cfg, "benchmark", params={"benchmark": settings}) as mlrun:
        results = run(bench, log=lambda line: print(line, flush=True), save=lambda partial: write_json(out, partial))
        mlrun.write_json(out, results)
        mlrun.log_metrics(metrics(results))
        mlrun.log_text(to_markdown(results), "benchmark/summary.md")
    print(to_markdown(results))
    return out


if __name__ == "__main__":
    main()
