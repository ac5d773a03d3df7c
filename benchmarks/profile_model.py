"""Where the time of one whole-model prefill goes (the benchmark's model section, eager): per system, the
forward's median ms, the summed device time of its kernels and their count, and the kernels that take the
most device time (torch.profiler). A diagnostic, printed, not a result; GPU only:
    PYTHONPATH=src:. python3 benchmarks/profile_model.py [--config conf/benchmark/gpu.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.config import DTYPES, load_config
from benchmarks.model import prefill_forward
from benchmarks.systems import build_system
from benchmarks.timing import time_ms


def kernel_table(fn, calls: int = 5) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(device ms per call, kernels per call, [(kernel, device ms per call, launches per call)] by time)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda row: -row[1])
    return sum(r[1] for r in rows), sum(r[2] for r in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/benchmark/gpu.yaml")
    parser.add_argument("--systems", default="bare,peft_lora,meteora")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    section = cfg.model
    device = torch.device("cuda")
    shapes, dtype = cfg.shapes[section.model], DTYPES[section.dtype]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.randint(0, shapes.vocab, (1, section.prefill_tokens), device=device, generator=gen)
    for name in args.systems.split(","):
        model = build_system(name, cfg, shapes, section.layers, dtype, device)
        forward = prefill_forward(model, prompt)
        with torch.no_grad():
            ms = time_ms(forward, device, cfg.warmup_ms, cfg.rep_ms)
            device_ms, kernels, rows = kernel_table(forward)
        print(f"\n{name}: prefill 1 x {section.prefill_tokens}: {ms:.3f} ms wall, {device_ms:.3f} ms in {kernels} kernels")
        for key, kernel_ms, count in rows[:14]:
            print(f"  {kernel_ms:8.3f} ms  {count:4d}x  {key[:110]}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
