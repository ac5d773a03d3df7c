"""``python -m benchmarks --config conf/benchmark/gpu.yaml [--out FILE] [--sections layer,model] [key=value ...]``
runs the benchmark (overrides are OmegaConf dotlists, e.g. ``layer.tokens=[1,16]``) and writes the results
JSON and its Markdown beside it; ``python -m benchmarks --markdown FILE.json`` prints a results file's tables.
Needs torch, triton, transformers, peft and omegaconf; no Hydra, DVC or MLflow."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from meteora.io import atomic_write_json, atomic_write_text

from .config import load_config
from .report import to_markdown
from .run import run

SECTIONS = ("layer", "train", "model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="benchmark YAML, e.g. conf/benchmark/gpu.yaml")
    parser.add_argument("--out", help="results JSON (default: the config's `out`); the .md is written beside it")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--markdown", metavar="JSON", help="print the tables of a results JSON and exit")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist, e.g. layer.tokens=[1,16] model.layers=4")
    args = parser.parse_args(argv)
    if args.markdown:
        print(to_markdown(json.loads(Path(args.markdown).read_text(encoding="utf-8"))), end="")
        return
    if not args.config:
        parser.error("--config is required (or --markdown JSON)")
    cfg = load_config(args.config, args.overrides)
    if args.sections:
        keep = set(args.sections.split(","))
        if keep - set(SECTIONS):
            parser.error(f"--sections {args.sections!r}: expected some of {','.join(SECTIONS)}")
        for name in set(SECTIONS) - keep:
            setattr(cfg, name, None)
    out = Path(args.out or cfg.out)
    started = time.perf_counter()
    results = run(
        cfg,
        log=lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True),
        save=lambda partial: atomic_write_json(out, partial),
    )
    atomic_write_text(out.with_suffix(".md"), to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
