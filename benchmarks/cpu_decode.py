"""Whole-model greedy ``generate`` on the CPU as the evaluate stage decodes, with the CPU mixture extension on
and off, side by side.

``PYTHONPATH=src:. python -m benchmarks.cpu_decode [--config conf/benchmark/cpu.yaml] [--out FILE.json]
[--layers 30] [--batch 16] [--prompt-tokens 128] [--new-tokens 16] [--rounds 5]``

The profile's model shapes with all their layers (SmolLM2-135M: 30), random weights, bfloat16 (the evaluate
stage's ``eval.dtype``), a batch of random prompts, greedy decoding of a fixed number of tokens; systems
``bare``, ``peft_lora`` (one LoRA), ``meteora`` (the profile's adapters, the extension) and
``meteora_torch_ops`` (the same model with the extension turned off: the mixture in torch operations).
Interleaved rounds; per system the median seconds per ``generate`` and the median per-round ratio to
``meteora_torch_ops`` and to ``bare`` with 95% bootstrap intervals, and in how many sequences the two MeteoRA
variants generated the same tokens. On random weights in bfloat16 that count says little: many gate logits
are near ties, so the two variants' rounding (each within bfloat16 of the other on one projection) flips some
tokens' adapters, and the random adapters are large; both are as far from a float64 run of the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from unittest import mock

import torch

from meteora.kernels import cpu as cpu_mix

from .config import load_config
from .systems import build_system
from .timing import paired_ratio

SYSTEMS = ("bare", "peft_lora", "meteora", "meteora_torch_ops")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="conf/benchmark/cpu.yaml")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(args.config)
    if cpu_mix.extension() is None:
        raise SystemExit("the CPU extension could not be built (see the warning above)")
    shapes, dtype, device = cfg.shapes[cfg.model.model], torch.bfloat16, torch.device("cpu")
    models = {name: build_system("meteora" if name == "meteora_torch_ops" else name, cfg, shapes, args.layers, dtype, device)
              for name in SYSTEMS}
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, shapes.vocab, (args.batch, args.prompt_tokens), generator=gen)

    def generate(name: str) -> torch.Tensor:
        off = mock.patch.object(cpu_mix, "extension", lambda: None) if name == "meteora_torch_ops" else contextlib.nullcontext()
        with off, torch.no_grad():
            return models[name].generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    seconds: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    tokens: dict[str, torch.Tensor] = {}
    for name in SYSTEMS:  # warm-up, untimed
        tokens[name] = generate(name)
    for _ in range(args.rounds):
        for name in SYSTEMS:
            start = time.perf_counter()
            generate(name)
            seconds[name].append(time.perf_counter() - start)
    rows = {}
    for name in SYSTEMS:
        row = {"median_s": round(statistics.median(seconds[name]), 3), "seconds": [round(s, 3) for s in seconds[name]]}
        for reference in ("meteora_torch_ops", "bare"):
            estimate, interval = paired_ratio(seconds[name], seconds[reference])
            row[f"x_{reference}"] = round(estimate, 3)
            row[f"x_{reference}_ci"] = None if interval is None else [round(v, 3) for v in interval]
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    same = (tokens["meteora"] == tokens["meteora_torch_ops"]).all(dim=1)
    print(f"meteora and meteora_torch_ops: the same tokens in {int(same.sum())} of {args.batch} sequences")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": cfg.model.model, "layers": args.layers,
        "dtype": "bfloat16", "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "num_adapters": cfg.num_adapters, "rank": cfg.rank, "top_k": cfg.top_k,
        "same_tokens": f"{int(same.sum())}/{args.batch}", "systems": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
