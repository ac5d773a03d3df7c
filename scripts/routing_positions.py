"""Where MeteoRA's routing errors sit in a prompt: top-1 routing accuracy (mean over modules) of the
pipeline's gates on the `[INST]` tokens that open every prompt (the same causal prefix for every task), on
the closing `[/INST]` tokens, on the task's own tokens in between, at each of the first positions, and in
decoder layer 0. Descriptive only (it chooses nothing): the first `--per-task` test prompts of each task,
decoded in eval.dtype. Writes reports/eval/routing_positions.json. Run after `dvc repro`:

    PYTHONPATH=src .venv/bin/python scripts/routing_positions.py [--per-task 24] [override ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from workspace import ROOT, trained_meteora

sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str]) -> None:
    from stages.common import load_config, set_threads
    from stages.data.examples import INST_CLOSE, INST_OPEN
    from stages.setup import decode_dtype, load_task_split, selected_tasks

    parser = argparse.ArgumentParser(prog="scripts/routing_positions.py")
    parser.add_argument("--per-task", type=int, default=24)
    parser.add_argument("--positions", type=int, default=8)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides)
    set_threads(cfg)
    tasks = selected_tasks(cfg)
    model, tokenizer = trained_meteora(cfg, tasks)
    model.keep_routing(True)
    names = list(model.meteora_layers())
    layer0 = [i for i, n in enumerate(names) if ".layers.0." in n]
    sums: dict[str, list[float]] = {}

    def add(key: str, hits: torch.Tensor) -> None:
        total = sums.setdefault(key, [0.0, 0])
        total[0] += float(hits.sum())
        total[1] += hits.numel()

    for label, task in enumerate(tasks):
        for record in load_task_split(cfg, task, "test", args.per_task):
            prompt = record["input"]
            if not (prompt.startswith(INST_OPEN) and prompt.rstrip().endswith(INST_CLOSE)):
                raise ValueError(f"{task}: a test prompt is not in the [INST] ... [/INST] format")
            opening = len(tokenizer(INST_OPEN, add_special_tokens=False)["input_ids"])
            closing = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - len(
                tokenizer(prompt[: prompt.rindex(INST_CLOSE)].rstrip(), add_special_tokens=False)["input_ids"])
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                model(input_ids=ids)
            hits = torch.stack([layer.last_routing.logits[0].argmax(-1) == label
                                for layer in model.meteora_layers().values()]).float()  # (modules, T)
            per_token = hits.mean(0)
            add("opening [INST]", per_token[:opening])
            add("task tokens", per_token[opening:-closing])
            add("closing [/INST]", per_token[-closing:])
            add("layer 0 (all tokens)", hits[layer0].flatten())
            add("all tokens", per_token)
            for position in range(min(args.positions, per_token.numel())):
                add(f"position {position}", per_token[position:position + 1])
    out = {key: {"accuracy": round(c / n, 4), "tokens": n} for key, (c, n) in sums.items()}
    out["settings"] = {"per_task": args.per_task, "tasks": tasks, "dtype": decode_dtype(cfg)}
    path = ROOT / "reports" / "eval" / "routing_positions.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for key, value in out.items():
        if key != "settings":
            print(f"{key:24s} {100 * value['accuracy']:5.1f}%  ({value['tokens']} tokens)")


if __name__ == "__main__":
    main(sys.argv[1:])
