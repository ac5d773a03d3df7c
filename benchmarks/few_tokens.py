"""The few-token kernels side by side on a GPU: the layer section (base, single LoRA, MeteoRA) at a handful
of token counts, once with the per-token gather kernel up to ``fused.GATHER_TOKENS`` tokens (top-k modes) and
once with the block kernel alone, in one process. Writes OUT.json (both runs' cells) and prints the medians:
    PYTHONPATH=src:. python3 -m benchmarks.few_tokens OUT.json [--decode] [key=value ...]
``--decode`` also times whole-model compiled decode (``model`` section: bare and MeteoRA, torch.compile with a
static cache) once with each kernel, where the gather kernel is meant to pay off.
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


DECODE_OVERRIDES = ["model.systems=[bare,meteora]", "model.modes=[compiled]"]


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    decode = "--decode" in argv[1:]
    overrides = [arg for arg in argv[1:] if arg != "--decode"]
    default_gather = fused.GATHER_TOKENS
    results = {}
    runs = [(name, gather, "layer") for name, gather in (("gather", 64), ("block", 0), ("default", default_gather))]
    if decode:
        runs += [("decode_gather", default_gather, "model"), ("decode_block", 0, "model")]
    for name, gather_tokens, section in runs:
        cfg = load_config("conf/benchmark/gpu.yaml", (OVERRIDES if section == "layer" else DECODE_OVERRIDES) + overrides)
        cfg.train = None
        if section == "layer":
            cfg.model = None
        else:
            cfg.layer = None
        fused.GATHER_TOKENS = gather_tokens
        results[name] = run(cfg, log=lambda line: print(line, flush=True))
        atomic_write_json(out, results)
    fused.GATHER_TOKENS = default_gather
    print("| routing | tokens | gather eager | block eager | gather graph | block graph | base graph | single graph |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cells = {name: {(c["routing"], c["tokens"], c["strategy"]): c for c in r["layer"]} for name, r in results.items() if "layer" in r}
    for (routing, tokens, strategy), cell in cells["gather"].items():
        if strategy != "meteora":
            continue
        block = cells["block"][(routing, tokens, strategy)]
        base, single = cells["gather"][(routing, tokens, "base")], cells["gather"][(routing, tokens, "single")]
        values = (cell["ms"], block["ms"], cell["ms_graph"], block["ms_graph"], base["ms_graph"], single["ms_graph"])
        print(f"| {routing} | {tokens} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    if decode:
        print("| phase | batch | x bare, gather | x bare, block |")
        print("|---|---:|---:|---:|")
        for row in results["decode_gather"]["model"]:
            if row["system"] != "meteora":
                continue
            block = next(r for r in results["decode_block"]["model"]
                         if (r["system"], r["phase"], r["batch"]) == ("meteora", row["phase"], row["batch"]))
            values = (row.get("x_bare"), block.get("x_bare"))
            print(f"| {row['phase']} | {row['batch']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values)
                  + " |")
    meta = results["gather"]["meta"]
    print(f"{meta['device_name']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}")


if __name__ == "__main__":
    main(sys.argv[1:])
