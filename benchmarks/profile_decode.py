"""Where the time of compiled static-cache decode goes (the benchmark's model section, mode ``compiled``):
per system, ms per decode token, whether Inductor's CUDA graphs ran or were skipped (and why), the CUDA
kernels and graph launches per decode token, and the kernels with the most device time (torch.profiler).
A diagnostic, printed, not a result; GPU only:
    PYTHONPATH=src:. python3 -m benchmarks.profile_decode [--config conf/benchmark/gpu.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from .config import DTYPES, load_config
from .model import _compile_kwargs, _generate, decode_ms_per_token
from .systems import build_system


def decode_profile(model, prompt: torch.Tensor, new_tokens: int, extra: dict) -> dict[str, collections.Counter]:
    """Counts and device ms of every CUDA kernel and runtime call of one generate of 1 + new_tokens minus
    one generate of 1 token, per decode token."""
    per_run = []
    for tokens in (1 + new_tokens, 1):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _generate(model, prompt, tokens, extra)()
            torch.cuda.synchronize()
        found = {"counts": collections.Counter(), "device_ms": collections.Counter(), "cpu_ms": collections.Counter()}
        for event in prof.key_averages():
            found["counts"][event.key] += event.count
            found["device_ms"][event.key] += event.device_time_total / 1e3
            found["cpu_ms"][event.key] += event.cpu_time_total / 1e3
        per_run.append(found)
    long, short = per_run
    return {name: collections.Counter({k: (v - short[name][k]) / new_tokens for k, v in long[name].items()})
            for name in long}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/benchmark/gpu.yaml")
    parser.add_argument("--systems", default="bare,meteora")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    section = cfg.model
    device = torch.device("cuda")
    shapes, dtype = cfg.shapes[section.model], DTYPES[section.dtype]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.randint(0, shapes.vocab, (args.batch, section.prompt_tokens), device=device, generator=gen)
    extra = _compile_kwargs()
    from torch._dynamo.utils import counters

    for name in args.systems.split(","):
        counters.clear()
        model = build_system(name, cfg, shapes, section.layers, dtype, device)
        decode_ms_per_token(model, prompt, section.new_tokens, extra, section.min_run_s, warmup=True)
        ms = decode_ms_per_token(model, prompt, section.new_tokens, extra, section.min_run_s)
        print(f"\n{name}: compiled decode b={args.batch}: {ms:.3f} ms/token")
        for group in ("inductor", "graph_break", "stats"):
            interesting = {k: v for k, v in counters[group].items() if "cudagraph" in k or group != "inductor"}
            if interesting:
                print(f"  counters[{group}]: {dict(interesting)}")
        found = decode_profile(model, prompt, section.new_tokens, extra)
        counts, device_ms = found["counts"], found["device_ms"]
        runtime = {k: v for k, v in counts.items() if k.startswith("cuda") and v > 0.5}
        print(f"  runtime calls per token: {dict(sorted(runtime.items(), key=lambda kv: -kv[1]))}")
        kernels = [(k, device_ms[k], counts[k]) for k in device_ms if device_ms[k] > 0]
        kernels.sort(key=lambda row: -row[1])
        print(f"  device ms per token {sum(r[1] for r in kernels):.3f} in {sum(r[2] for r in kernels):.0f} events")
        for key, kernel_ms, count in kernels[:60]:
            print(f"  {kernel_ms:8.4f} ms  {count:6.1f}x  {key[:110]}")
        print("  host ms per token (cpu_time_total, nested events overlap):")
        for key, cpu_ms in found["cpu_ms"].most_common(30):
            print(f"  {cpu_ms:8.4f} ms  {counts[key]:6.1f}x  {key[:110]}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
