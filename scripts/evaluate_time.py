"""The evaluate stage's Table 1 decoding (MeteoRA top-k greedy answers, batched, in eval.dtype) timed with
each way the project has had of running the mixture, side by side in one process on this machine:

* `loop`: one masked product per adapter (the original implementation's strategy), three-product layer;
* `fused, unstacked`: the operator's single mixture call after separate base, gate and A products;
* `fused, stacked` (the default, `auto` on CPU): one GEMM x [W; A; W_g]^T, then one mixture call (the C++
  extension of `meteora.kernels.cpu`);
* `fused, stacked, torch operations`: the same with the extension turned off (the mixture's ten or so
  tensor operations per projection, as before the extension);
* `bare`: the base model alone on the same prompts (the floor), and `merged LoRA`: one PEFT adapter
  merged into the weights (how the oracle row answers).

The first `--per-task` test prompts of every task, `--rounds` interleaved rounds, the median per system;
MeteoRA's answers of every variant are compared with the default's. Writes
reports/benchmark/evaluate_time.{json,md}. Run after `dvc repro`, on a quiet machine:

    PYTHONPATH=src .venv/bin/python scripts/evaluate_time.py [--per-task 8] [--rounds 3] [override ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from unittest import mock

import torch

from workspace import ROOT

sys.path.insert(0, str(ROOT / "src"))

TORCH_OPS = "meteora: fused, stacked, torch operations (no C++ extension)"


def main(argv: list[str]) -> None:
    from peft import PeftModel

    from meteora import attach_meteora
    from meteora.kernels import cpu as cpu_mix
    from stages.answers import DecodeSettings, Method, answer_tests
    from stages.common import load_config, set_threads
    from stages.setup import adapter_dir, decode_dtype, load_base, load_task_split, selected_tasks

    parser = argparse.ArgumentParser(prog="scripts/evaluate_time.py")
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides)
    set_threads(cfg)
    tasks, dtype = selected_tasks(cfg), decode_dtype(cfg)
    tests = {t: load_task_split(cfg, t, "test", args.per_task) for t in tasks}
    settings = DecodeSettings.tests(cfg.eval)
    top_k, temperature = int(cfg.eval.meteora_top_ks[-1]), float(cfg.meteora.temperature)

    def meteora(strategy: str, stack: bool) -> Method:
        model, tokenizer = load_base(cfg, dtype)
        model = attach_meteora(model, {t: adapter_dir(cfg, t) for t in tasks}, top_k=top_k, temperature=temperature,
                               strategy=strategy, stack_weights=stack)
        model.load_gates(Path(cfg.paths.artifacts) / "gates", use_manifest_settings=False, cast=True)
        return Method("meteora", model.eval(), tokenizer)

    bare, tokenizer = load_base(cfg, dtype)
    lora, _ = load_base(cfg, dtype)
    lora = PeftModel.from_pretrained(lora, str(adapter_dir(cfg, tasks[0])), adapter_name=tasks[0]).eval()
    systems = {
        "meteora: fused, stacked (default)": meteora("auto", True),
        TORCH_OPS: meteora("auto", True),
        "meteora: fused, unstacked": meteora("fused", False),
        "meteora: loop (the original's strategy)": meteora("loop", False),
        "bare model": Method("bare", bare, tokenizer),
        "merged LoRA (one adapter)": Method("lora", lora, tokenizer, adapter=tasks[0]),
    }
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    answers: dict[str, dict] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, method in systems.items():
                # the extension off: the layers' and the operator's CPU mixture in torch operations
                off = mock.patch.object(cpu_mix, "extension", lambda: None) if name == TORCH_OPS else contextlib.nullcontext()
                with off:
                    start = time.perf_counter()
                    answers[name] = answer_tests(method, tests, settings)
                    seconds[name].append(time.perf_counter() - start)
    default = next(iter(systems))
    prompts = sum(len(v) for v in tests.values())
    bare_s = statistics.median(seconds["bare model"])
    rows = {}
    for name, values in seconds.items():
        rows[name] = {"median_s": round(statistics.median(values), 2), "seconds": [round(v, 2) for v in values],
                      "x_bare": round(statistics.median(values) / bare_s, 3)}
        if name.startswith("meteora"):
            same = sum(a == b for t in tests for a, b in zip(answers[name][t], answers[default][t]))
            rows[name]["answers_as_default"] = f"{same}/{prompts}"
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype, "top_k": top_k,
            "prompts": prompts, "per_task": args.per_task, "rounds": args.rounds}
    out = ROOT / "reports" / "benchmark"
    (out / "evaluate_time.json").write_text(json.dumps({"meta": meta, "systems": rows}, indent=2) + "\n")
    lines = [f"**Table 1 decoding, MeteoRA top-{top_k}** ({prompts} test prompts, {dtype}, {meta['date']}, "
             f"{meta['cpu_count']} threads; median of {args.rounds} interleaved rounds; "
             "`scripts/evaluate_time.py`).", "",
             "| system | seconds | x bare | answers as the default |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['median_s']:.1f} | {r['x_bare']:.2f} | {r.get('answers_as_default', '')} |" for n, r in rows.items()]
    (out / "evaluate_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
