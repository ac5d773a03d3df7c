"""The few-token kernels side by side on a GPU: the layer section (base, single LoRA, MeteoRA) at a handful
of token counts, once with the per-token gather kernel up to ``fused.GATHER_TOKENS`` tokens (top-k modes) and
once with the block kernel alone, in one process. Writes OUT.json (both runs' cells) and prints the medians:
    PYTHONPATH=src:. python3 -m benchmarks.few_tokens OUT.json [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from meteora.io import atomic_write_json
from meteora.kernels import fused

from .config import load_config
from .run import run

OVERRIDES = ["layer.tokens=[1,2,4,8,16,32,48]", "layer.routings=[random,skewed]",
             "layer.strategies=[base,single,meteora]", "layer.cuda_graphs=true"]


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    cfg_overrides = OVERRIDES + argv[1:]
    default_gather = fused.GATHER_TOKENS
    results = {}
    for name, gather_tokens in (("gather", 64), ("block", 0), ("default", default_gather)):
        cfg = load_config("conf/benchmark/gpu.yaml", cfg_overrides)
        cfg.model = cfg.train = None
        fused.GATHER_TOKENS = gather_tokens
        results[name] = run(cfg, log=lambda line: print(line, flush=True))
        atomic_write_json(out, results)
    fused.GATHER_TOKENS = default_gather
    print("| routing | tokens | gather eager | block eager | gather graph | block graph | base graph | single graph |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cells = {name: {(c["routing"], c["tokens"], c["strategy"]): c for c in r["layer"]} for name, r in results.items()}
    for (routing, tokens, strategy), cell in cells["gather"].items():
        if strategy != "meteora":
            continue
        block = cells["block"][(routing, tokens, strategy)]
        base, single = cells["gather"][(routing, tokens, "base")], cells["gather"][(routing, tokens, "single")]
        values = (cell["ms"], block["ms"], cell["ms_graph"], block["ms_graph"], base["ms_graph"], single["ms_graph"])
        print(f"| {routing} | {tokens} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    meta = results["gather"]["meta"]
    print(f"{meta['device_name']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}")


if __name__ == "__main__":
    main(sys.argv[1:])
